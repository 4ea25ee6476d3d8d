"""Precision plans in `quarl diagnose`: the formats applied per module, and the ``--plan BUDGET`` proposal written
as a `quarl train` config that loads and applies.

Run: python -m pytest tests/diagnose/test_diagnose_plan.py -q
"""

import pytest

import quarl.models
from quarl.cli import main
from quarl.diagnose import diagnose
from quarl.diagnose.sensitivity import SensitivityRow, propose_plan
from quarl.inject import InjectionSpec, attach, select_modules
from quarl.inject.plan import parameter_share


@pytest.fixture
def fake_loader(monkeypatch, model, tokenizer):
    monkeypatch.setattr(quarl.models, "load_model", lambda spec, **kw: (model, tokenizer), raising=False)


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1 + 1 =", "reference": "2"}\n{"prompt": "2 + 3 =", "reference": "5"}\n')
    return path


def test_cli_plan_writes_a_train_config_that_applies(fake_loader, prompt_file, model, tmp_path, capsys):
    from quarl.rl.config import load_config

    out = tmp_path / "plan.yaml"
    rc = main(["diagnose", "--model", "testbed:tiny", "--scheme", "MXFP4", "--sensitivity", "--plan", "0.2",
               "--plan-out", str(out), "--prompts", str(prompt_file), "--no-grad-check"])
    text = capsys.readouterr().out
    assert rc == 0 and f"wrote {out}" in text
    cfg = load_config(out)  # quarl train's strict loader
    rules = cfg.injection.plan.rules
    assert cfg.model.name == "testbed:tiny" and cfg.injection.error_type == "mxfp4" and len(rules) == 1
    kept = [p.strip("^$").replace("\\", "") for p in rules[0].modules]
    selected = select_modules(model, InjectionSpec(scheme="MXFP4"))
    assert 0 < parameter_share(selected, set(kept)) <= 0.2
    with attach(model, cfg.injection) as inj:
        formats = inj.formats()
        assert not set(kept) & set(inj.modules) and len(inj.modules) == len(selected) - len(kept)
    assert all(formats[m].startswith("none (plan rule 0") for m in kept)
    # the most damaging module of the ranking printed above is kept whenever it fits the budget on its own
    assert f"plan: {len(kept)} modules in full precision" in text


def test_propose_plan_takes_modules_in_rank_order_while_they_fit(model):
    spec = InjectionSpec(scheme="W4A4")
    selected = select_modules(model, spec)
    names = [n for n, _ in selected]
    down, q = "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"  # 8192 and 4096 of 73728 (2 blocks)
    rows = [SensitivityRow(n, kl, 1.0, None, None) for n, kl in [(down, 3.0), (q, 2.0)]]
    rows += [SensitivityRow(n, 0.1, 1.0, None, None) for n in names if n not in (down, q)]
    plan, chosen, share = propose_plan(model, spec, rows, 0.06)  # down_proj (11.1%) does not fit; q_proj (5.6%) does
    assert chosen == [q] and share == pytest.approx(4096 / 73728)
    assert plan.rules[0].modules == (r"^model\.layers\.1\.self_attn\.q_proj$",) and plan.rules[0].format == "none"
    plan, chosen, _ = propose_plan(model, spec, rows, 0.17, "fp8_e4m3")  # 16.7%; no 2.8% k/v fits
    assert chosen == [down, q] and plan.rules[0].format == "fp8_e4m3"
    with pytest.raises(ValueError, match="fits no module"):
        propose_plan(model, spec, rows, 0.01)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        propose_plan(model, spec, rows, 1.5)


def test_diagnose_shows_the_format_applied_per_module(model, tokenizer):
    spec = InjectionSpec(scheme="NVFP4", plan={"rules": [{"layers": [0], "format": "none"},
                                                         {"kinds": ["down_proj"], "layers": [1], "format": "fp8_e4m3"}]})
    report = diagnose(model, spec, tokenizer=tokenizer, check_gradients=False, sensitivity="layer")
    assert report.formats["model.layers.0.mlp.up_proj"].startswith("none (plan rule 0")
    assert report.formats["model.layers.1.mlp.down_proj"] == "fp8_e4m3"
    rows = {r.module: r for r in report.layers}
    assert rows["model.layers.1.mlp.down_proj"].format == "fp8_e4m3" and rows["model.layers.1.mlp.up_proj"].format \
        == "nvfp4" and "model.layers.0.mlp.up_proj" not in rows
    table = report.table()
    assert "formats applied (precision plan): fp8_e4m3 on 1 modules, none on 7 modules, nvfp4 on 6 modules" in table
    assert len(report.sensitivity) == 14  # the scan sets the plan aside: every selected module in nvfp4


def test_diagnose_names_the_rotation(model, tokenizer):
    report = diagnose(model, InjectionSpec(scheme="MXFP4", rotation="block"), tokenizer=tokenizer,
                      check_gradients=True)
    assert report.ok and "use_ste=True, rotation=block)" in report.table()  # the STE gradient flows through R
