"""The repository stands alone: no file points at documents that are not in it; the README's links resolve.

Run: python -m pytest tests/test_docs.py -q

A reference such as "see the field notes §2", "issue 8 part D" or "../shared/STYLE.md" means nothing to a reader of
this repository; the fact it stood for belongs in the text itself or on a page under docs/. The patterns below are
the forms such references took. This file is exempt from its own scan (it has to spell the patterns out).
"""

import re
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("src/", "tests/", "docs/", "benchmarks/", "suites/", "README.md")
OUTSIDE_REFERENCES = {
    "notes kept outside the repository": re.compile(r"FIELD_NOTES|TRL_NOTES|VERL_NOTES|RL_TESTBED|FORMATS\.md"),
    "a style guide outside the repository": re.compile(r"\bSTYLE\b"),
    "a path into a sibling directory": re.compile(r"\.\./shared"),
    "an issue tracker entry": re.compile(r"\bissues? #?\d", re.IGNORECASE),
    "a part of an issue": re.compile(r"\bpart [A-H]\b"),
    "a person instead of a fact": re.compile(r"seed researcher", re.IGNORECASE),
    "a plan outside the repository": re.compile(r"\broadmap\b", re.IGNORECASE),
    "a configs/ directory that does not exist": re.compile(r"(?<!assets/)\bconfigs/"),
}
BINARY_SUFFIXES = {".png", ".safetensors", ".parquet", ".whl", ".gz", ".so", ".pt", ".bin", ".gguf"}


def _tracked_files() -> list[Path]:
    """Tracked files under the scanned paths (every file below them when this is not a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *SCANNED], cwd=ROOT, capture_output=True, check=True)
        paths = [ROOT / p for p in out.stdout.decode().split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for s in SCANNED for p in ([ROOT / s] if s.endswith(".md") else (ROOT / s).rglob("*"))]
    this = Path(__file__).resolve()
    return [p for p in paths if p.is_file() and p.suffix not in BINARY_SUFFIXES and p.resolve() != this]


def test_scan_sees_the_repository():
    files = {p.relative_to(ROOT).as_posix() for p in _tracked_files()}
    assert "README.md" in files and "src/quarl/__init__.py" in files and "tests/test_structure.py" in files


def test_no_references_to_documents_outside_the_repository():
    hits = []
    for path in _tracked_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for what, pattern in OUTSIDE_REFERENCES.items():
                if m := pattern.search(line):
                    hits.append(f"{path.relative_to(ROOT)}:{lineno}: {m.group(0)!r} ({what})")
    assert not hits, (f"{len(hits)} references to documents outside the repository; write the fact itself, or link "
                      "a page under docs/:\n" + "\n".join(hits))


def test_each_pattern_catches_its_form():
    examples = {
        "notes kept outside the repository": "see FIELD_NOTES §2 item 1",
        "a style guide outside the repository": "house style: STYLE §3.3",
        "a path into a sibling directory": "`../shared/x.md`",
        "an issue tracker entry": "(issue 8)",
        "a part of an issue": "issue 2 part D",
        "a person instead of a fact": "the seed researcher's table",
        "a plan outside the repository": "see the roadmap",
        "a configs/ directory that does not exist": 'train("configs/testbed.yaml")',
    }
    assert examples.keys() == OUTSIDE_REFERENCES.keys()
    for what, text in examples.items():
        assert OUTSIDE_REFERENCES[what].search(text), what
    # and the repository's real paths are not references
    for fine in ("src/quarl/assets/configs/testbed_w4a4.yaml", "GSM8K_STYLE = [", "part of the table"):
        assert not any(p.search(fine) for p in OUTSIDE_REFERENCES.values()), fine


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into docs/"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_fits_one_screen_and_a_bit():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_test_extra_covers_the_train_extra():
    """CI installs `.[test]`, users `.[train]`: whatever the main job needs must be in both."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    missing = sorted(set(extras["train"]) - set(extras["test"]))
    assert not missing, f"the test extra lacks what the train extra installs: {missing}"


def test_readme_layering_line_names_every_ranked_package():
    from test_structure import RANK

    line = next(ln for ln in (ROOT / "README.md").read_text().split("\n\n") if ln.startswith("Imports run one way"))
    missing = [name for name in RANK if not re.search(rf"(?<![\w.]){re.escape(name)}\b", line)]
    assert not missing, f"the README's layering line omits {missing}"


def test_example_config_variants_in_its_header_load():
    """Each `--set` variant the shipped example documents in its header is a valid override of it."""
    from quarl.rl.config import load_config

    path = ROOT / "src/quarl/assets/configs/testbed_w4a4.yaml"
    header = [ln for ln in path.read_text().splitlines() if ln.startswith("#")]
    variants = [re.findall(r"--set (\S+)", ln) for ln in header if "--set" in ln]
    assert variants, "the example documents its variants as --set overrides"
    for overrides in variants:
        cfg = load_config(path, overrides)
        for item in overrides:
            key, value = item.split("=", 1)
            block, field = key.split(".")
            assert str(getattr(getattr(cfg, block), field)) == value, item
