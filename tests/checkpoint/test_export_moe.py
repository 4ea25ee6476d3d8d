"""MoE export: per-expert compressed-tensors linears in vLLM's on-disk layout, routers dense, the experts equal to
quarl's on-the-fly per-expert injection bit for bit; static-input schemes refused clearly.

Run: OMP_NUM_THREADS=1 python -m pytest tests/checkpoint/test_export_moe.py -q
"""

import json

import pytest
import torch
from _tiny_moe import experts_of, tiny_moe
from safetensors import safe_open

from quarl.checkpoint import export_checkpoint, get_scheme, load_checkpoint, weight_quantized
from quarl.cli import main
from quarl.formats import dequantize, fake_quantize


def _tensors(out):
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize(("arch", "scheme", "names"), [
    ("qwen2_moe", "NVFP4A16", ("mlp.experts", "gate_proj", "up_proj", "down_proj")),
    ("mixtral", "MXFP4", ("block_sparse_moe.experts", "w1", "w3", "w2")),
])
def test_experts_written_per_expert_and_equal_to_the_injection(tmp_path, arch, scheme, names):
    model = tiny_moe(arch)
    ckpt = get_scheme(scheme)
    report = export_checkpoint(model, None, ckpt, tmp_path / "out", progress=False)
    stored = _tensors(tmp_path / "out")
    assert not any(t.dim() == 3 for t in stored.values())  # no fused 3-D experts on disk
    fmt = ckpt.weight_fmt
    container, gate, up, down = names
    for layer, (_, experts) in enumerate(experts_of(model)):
        inter = experts.down_proj.shape[-1]
        for e in range(experts.num_experts):
            prefix = f"model.layers.{layer}.{container}.{e}"
            want = {gate: fake_quantize(experts.gate_up_proj[e].detach(), fmt)[:inter],  # one scale over gate+up
                    up: fake_quantize(experts.gate_up_proj[e].detach(), fmt)[inter:],
                    down: fake_quantize(experts.down_proj[e].detach(), fmt)}
            for proj, w in want.items():
                local = {k.rsplit(".", 1)[1]: v for k, v in stored.items() if k.startswith(f"{prefix}.{proj}.")}
                assert "weight_packed" in local and "weight" not in local
                got = dequantize(weight_quantized(local, ckpt, tuple(w.shape), torch.float32))
                assert torch.equal(got, w), (prefix, proj)
    routers = [k for k in stored if k.endswith(("gate.weight", "shared_expert_gate.weight"))
               and ".experts." not in k]
    assert len(routers) == (4 if arch == "qwen2_moe" else 2)  # dense, under the on-disk prefix
    ignore = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["ignore"]
    assert "lm_head" in ignore and r"re:.*\.gate$" in ignore
    per_layer = 3 * 4 + 4 + (3 if arch == "qwen2_moe" else 0)  # expert linears + attention + shared expert
    assert report.modules == 2 * per_layer
    if scheme == "NVFP4A16":
        assert report.fused_groups == 2 * (1 + 4 + 1)  # q/k/v, each expert's gate/up, the shared expert's gate/up
    with pytest.raises(ValueError, match="quantized MoE experts"):
        load_checkpoint(tmp_path / "out")


def test_static_input_schemes_refused_for_moe(tmp_path):
    model = tiny_moe("qwen3_moe")
    for scheme in ("NVFP4", "FP8"):
        with pytest.raises(ValueError, match="per-expert input scales"):
            export_checkpoint(model, None, get_scheme(scheme), tmp_path / scheme, calibration=[], progress=False)
        assert not (tmp_path / scheme).exists()
    with pytest.raises(ValueError, match="stores its experts fused on disk"):  # GPT-OSS: no per-expert layout
        export_checkpoint(tiny_moe("gpt_oss"), None, get_scheme("MXFP4A16"), tmp_path / "oss", progress=False)
    assert not (tmp_path / "oss").exists()


def test_cli_quantize_moe(tmp_path, capsys):
    from transformers import AutoTokenizer

    from quarl.models.load import testbed_dir

    tok = AutoTokenizer.from_pretrained(testbed_dir())
    src = tmp_path / "moe"
    tiny_moe("qwen2_moe", vocab_size=len(tok)).save_pretrained(src)
    tok.save_pretrained(src)
    assert main(["quantize", str(src), "--scheme", "NVFP4", "--out", str(tmp_path / "a"), "--calibration-n", "2",
                 "--no-progress"]) == 2
    assert "per-expert input scales" in capsys.readouterr().err
    assert main(["quantize", str(src), "--scheme", "MXFP4A16", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert "quantized 38 linear modules" in capsys.readouterr().out
