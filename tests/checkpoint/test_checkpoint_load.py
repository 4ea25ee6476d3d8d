"""Loading: recognition by content, packed frozen modules, weight cache, dense mode, load_model integration.

Run: pytest tests/checkpoint/test_load.py
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from quarl.checkpoint import CompressedLinear, is_compressed_tensors_dir, load_checkpoint
from quarl.checkpoint.load import dequantized_state


def test_recognized_by_its_config_not_its_name(tiny_export, tmp_path):
    renamed = tmp_path / "plain-llama"  # nothing in the name says "quantized"
    shutil.copytree(tiny_export("NVFP4A16"), renamed)
    assert is_compressed_tensors_dir(renamed)
    stripped = tmp_path / "nvfp4-model"  # a quantized-sounding name, but no quantization_config
    shutil.copytree(renamed, stripped)
    cfg = json.loads((stripped / "config.json").read_text())
    del cfg["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(cfg))
    assert not is_compressed_tensors_dir(stripped)
    assert not is_compressed_tensors_dir(tmp_path / "missing")


def test_load_model_returns_packed_frozen_modules(tiny_export, caplog):
    from quarl.models import load_model

    with caplog.at_level("INFO", logger="quarl"):
        model, tok = load_model(str(tiny_export("MXFP4")))
    assert tok is None  # the tiny export has no tokenizer
    info = model.quarl_checkpoint
    assert info.scheme.name == "MXFP4" and info.modules == 14
    assert "MiB packed vs" in caplog.text  # bytes packed vs bf16 are logged at load
    packed = [m for m in model.modules() if isinstance(m, CompressedLinear)]
    assert len(packed) == 14
    assert all(p.dtype == torch.uint8 for m in packed for p in (m.weight_packed, m.weight_scale))
    assert not any(p.requires_grad for m in packed for p in m.parameters())
    assert not any(isinstance(m, torch.nn.Linear) and n != "lm_head" for n, m in model.named_modules())
    assert info.packed_bytes < info.bf16_bytes / 3.5  # FP4 codes + one E8M0 byte per 32 weights


def test_state_dict_is_the_stored_checkpoint(tiny_export):
    path = tiny_export("NVFP4")
    model, _, _ = load_checkpoint(path)
    stored = load_file(str(path / "model.safetensors"))
    state = model.state_dict()
    for key, tensor in stored.items():
        assert state[key].dtype == tensor.dtype and torch.equal(state[key].view(torch.uint8) if tensor.dtype ==
                                                                torch.float8_e4m3fn else state[key],
                                                                tensor.view(torch.uint8) if tensor.dtype ==
                                                                torch.float8_e4m3fn else tensor), key


def test_weight_cache_follows_the_buffers(tiny_export):
    model, _, _ = load_checkpoint(tiny_export("NVFP4A16"), cache_weight=True)
    module = model.get_submodule("model.layers.0.mlp.down_proj")
    w0 = module.dequantized_weight()
    assert module.dequantized_weight() is w0  # cached
    module.weight_packed[0, 0] ^= 0x11  # in-place write bumps the buffer version
    w1 = module.dequantized_weight()
    assert w1 is not w0 and not torch.equal(w1[0, :2], w0[0, :2]) and torch.equal(w1[1:], w0[1:])


def test_dense_mode_holds_the_dequantized_weights(tiny_export):
    path = tiny_export("FP8")
    packed, _, _ = load_checkpoint(path, input_mode="dynamic")
    dense, _, info = load_checkpoint(path, dense=True)
    assert info.dense and "input quantization off" in info.summary()
    want = dequantized_state(packed)
    for fqn, w in want.items():
        linear = dense.get_submodule(fqn)
        assert type(linear) is torch.nn.Linear and not linear.weight.requires_grad
        assert torch.equal(linear.weight, w)


def test_checkpoint_with_a_missing_module_is_an_error(tiny_export, tmp_path):
    from safetensors.torch import save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_export("NVFP4A16"), broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("model.layers.1.mlp.up_proj.")}
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj"):
        load_checkpoint(broken)


def test_export_refuses_a_used_directory_and_missing_calibration(tiny, tmp_path):
    from quarl.checkpoint import export_checkpoint, get_scheme

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("")
    with pytest.raises(FileExistsError):
        export_checkpoint(tiny, None, get_scheme("NVFP4A16"), tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="calibration"):
        export_checkpoint(tiny, None, get_scheme("NVFP4"), tmp_path / "y", progress=False)
