"""Project structure rules: one-way imports, the 500-line cap, no rtol >= 1.

Run: pytest tests/test_structure.py
"""

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "quarl"

# Lower rank may never import higher rank; same-rank packages may not import each other either.
# formats, data, configio and mdtable are leaves: they import nothing from quarl (configio, mdtable) or only configio.
RANK = {
    "configio": 0,
    "mdtable": 0,  # the one Markdown table renderer (a leaf, so every package may use it)
    "formats": 1,
    "data": 1,
    "inject": 2,
    "noise": 3,
    "diagnose": 3,
    "checkpoint": 3,  # compressed-tensors export/load of pre-quantized bases (formats, inject)
    "eval": 4,
    "models": 5,
    "runs": 5,  # experiment registry, tables, plots, suites (reads run directories)
    "rl": 6,  # GRPO + LoRA on TRL (models, runs, eval, noise, inject)
    "verl": 6,  # quarl inside verl: engine, vLLM worker extension, reward, migration (eval, noise, inject)
    "cli": 7,
    "__main__": 8,
}


def _quarl_imports(path: Path) -> set[str]:
    """Top-level quarl subpackages imported by a module (absolute or relative imports)."""
    tree = ast.parse(path.read_text())
    pkg_parts = path.relative_to(SRC.parent).with_suffix("").parts  # ('quarl', 'inject', 'weights')
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(pkg_parts[: len(pkg_parts) - node.level])
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
                if node.module == "quarl":
                    names = [f"quarl.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "quarl" and len(parts) > 1:
                found.add(parts[1])
    return found


def _package_of(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def test_imports_run_one_way():
    bad = []
    for path in SRC.rglob("*.py"):
        if path.parent == SRC and path.name == "__init__.py":
            continue
        own = _package_of(path)
        assert own in RANK, f"{path}: new top-level module {own!r}; give it a rank in tests/test_structure.py"
        for dep in _quarl_imports(path) - {own}:
            assert dep in RANK, f"{path} imports unknown quarl.{dep}"
            if RANK[dep] >= RANK[own]:
                bad.append(f"{path.relative_to(SRC)} (rank {RANK[own]}) imports quarl.{dep} (rank {RANK[dep]})")
    assert not bad, "imports must run one way:\n" + "\n".join(bad)


def test_formats_imports_only_torch_and_stdlib():
    allowed = {"torch", "numpy", "math", "dataclasses", "enum", "typing", "functools", "__future__", "collections",
               "os", "logging", "warnings", "struct", "threading", "quarl", "itertools", "contextlib", "difflib",
               "triton", "pathlib", "tempfile", "zlib", "hashlib",
               "ctypes", "subprocess", "shutil", "time"}  # formats/native.py: builds its C kernel once, loads it
    for path in (SRC / "formats").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [(node.module or "").split(".")[0]]
            else:
                continue
            for m in mods:
                assert m in allowed, f"{path}: quarl.formats is pure numerics and may not import {m!r}"


def test_files_are_at_most_500_lines():
    root = SRC.parents[1]
    too_long = []
    for path in list(SRC.rglob("*.py")) + list((root / "tests").rglob("*.py")) + list((root / "benchmarks").rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > 500:
            too_long.append(f"{path.relative_to(root)}: {n} lines")
    assert not too_long, "split these by concept (500-line cap):\n" + "\n".join(too_long)


def test_no_vacuous_rtol():
    root = SRC.parents[1]
    pattern = re.compile(r"rtol\s*=\s*([0-9.eE+-]+)")
    offenders = []
    for path in (root / "tests").rglob("*.py"):
        for m in pattern.finditer(path.read_text()):
            try:
                if float(m.group(1)) >= 1:
                    offenders.append(f"{path.name}: rtol={m.group(1)}")
            except ValueError:
                pass
    assert not offenders, f"rtol >= 1 makes a check vacuous: {offenders}"


def test_library_code_does_not_print():
    offenders = []
    for path in SRC.rglob("*.py"):
        if _package_of(path) in ("cli", "__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not offenders, f"library code logs, never prints: {offenders}"
