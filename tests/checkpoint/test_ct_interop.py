"""Interop with the compressed-tensors 0.20.0 library: it reads quarl's checkpoints, and its own compressor
writes the same bytes.

Run: pytest tests/checkpoint/test_ct_interop.py
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from _ckpt_models import ckpt_llama
from quarl.checkpoint import SCHEMES, get_scheme, load_checkpoint
from quarl.checkpoint.export import calibrate_input_amax, fused_weight_amax, quantizable_modules
from quarl.checkpoint.load import dequantized_state

ct = pytest.importorskip("compressed_tensors")


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("name", list(SCHEMES))
def test_config_parses_as_the_compressed_tensors_preset(name, tiny_export):
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    qcfg = json.loads((tiny_export(name) / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qcfg)
    preset = preset_name_to_scheme(name, ["Linear"])
    group = parsed.config_groups["group_0"]
    dump = lambda args: args.model_dump() if args is not None else None  # noqa: E731 (what config.json holds)
    assert dump(group.weights) == dump(preset.weights)
    assert dump(group.input_activations) == dump(preset.input_activations)
    assert parsed.format == get_scheme(name).ct_format and parsed.ignore == ["lm_head"]
    assert parsed.quantization_status == "compressed"


def _ct_decompress_fp32(name, local, preset):
    """compressed-tensors' decompression in fp32: its stock ``decompress`` unpacks FP4 into bf16, so for FP4 the
    same library steps (``unpack_fp4_from_uint8``, scale decoding, ``dequantize``) run with ``dtype=float32``."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    if not get_scheme(name).packs_fp4:
        if name == "FP8":  # its decompressor multiplies in the scale's dtype; keep quarl's fp32 scale
            local = {**local, "weight_scale": local["weight_scale"].to(torch.float32)}
        return BaseCompressor.get_value_from_registry(get_scheme(name).ct_format).decompress(local, preset)["weight"]
    packed = local["weight_packed"]
    codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    scale = local["weight_scale"]
    scale = decompress_mx_scale(scale).to(torch.float32) if scale.dtype == torch.uint8 else scale.to(torch.float32)
    return dequantize(x_q=codes, scale=scale, args=preset.weights, global_scale=local.get("weight_global_scale"),
                      dtype=torch.float32)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_compressed_tensors_decompresses_to_quarl_values(name, tiny_export):
    """The library's decompression of quarl's tensors gives quarl's dequantized weights bit for bit (fp32), and its
    stock bf16 ``decompress`` gives them rounded to bf16."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import preset_name_to_scheme

    path = tiny_export(name)
    stored = load_file(str(path / "model.safetensors"))
    model, _, _ = load_checkpoint(path)
    ours = dequantized_state(model)
    preset = preset_name_to_scheme(name, ["Linear"])
    compressor = BaseCompressor.get_value_from_registry(get_scheme(name).ct_format)
    assert len(ours) == 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head ignored
    for fqn, want in ours.items():
        local = {k[len(fqn) + 1:]: v for k, v in stored.items() if k.startswith(fqn + ".")}
        assert torch.equal(_ct_decompress_fp32(name, local, preset).to(torch.float32), want), fqn
        stock = compressor.decompress(local, preset)["weight"]
        if stock.dtype == torch.bfloat16:
            assert torch.equal(stock, want.to(torch.bfloat16)), fqn


def _ct_reference(name, calib, fuse):
    """compressed-tensors' own path: apply the preset, set qparams with its helpers, compress_model."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.offload import update_offload_parameter
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    model = ckpt_llama(seed=0)
    targets = quantizable_modules(model)
    input_amax = calibrate_input_amax(model, targets, calib) if get_scheme(name).static_input else {}
    joint, _ = fused_weight_amax(targets) if fuse else ({}, 0)
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(name, ["Linear"])}, ignore=["lm_head"])
    apply_quantization_config(model, qc)
    for fqn, m in targets:
        args = m.quantization_scheme.weights
        w = m.weight.data
        gs = None
        if args.strategy == "tensor_group":
            amax = joint.get(fqn, w.abs().amax().reshape(1))  # llm-compressor: min over the fused global scales
            gs = generate_gparam(-amax, amax)
            update_offload_parameter(m, "weight_global_scale", gs)
        if args.group_size:
            chunks = torch.split(w, args.group_size, dim=1)
            mn = torch.stack([c.amin(1) for c in chunks], 1)
            mx = torch.stack([c.amax(1) for c in chunks], 1)
        else:
            mn, mx = w.amin().reshape(1), w.amax().reshape(1)
        scale, _ = calculate_qparams(mn, mx, args, global_scale=gs)
        update_offload_parameter(m, "weight_scale", scale.to(m.weight_scale.dtype))
        if fqn in input_amax:
            a = input_amax[fqn]
            iargs = m.quantization_scheme.input_activations
            if iargs.strategy == "tensor_group":
                update_offload_parameter(m, "input_global_scale", generate_gparam(-a, a))
            else:
                update_offload_parameter(m, "input_scale", calculate_qparams(-a, a, iargs)[0].to(m.input_scale.dtype))
    ModelCompressor.from_pretrained_model(model).compress_model(model)
    return model.state_dict()


@pytest.mark.parametrize("name,fuse", [(n, None) for n in SCHEMES] + [("NVFP4A16", False)])
def test_compressed_tensors_compressor_writes_the_same_bytes(name, fuse, calib, tiny_export):
    ref = _ct_reference(name, calib, fuse if fuse is not None else get_scheme(name).fused_global_scales)
    ours = load_file(str(tiny_export(name, fuse) / "model.safetensors"))
    assert set(ref) == set(ours)
    differ = [k for k in ref if ref[k].dtype != ours[k].dtype or not torch.equal(_bits(ref[k]), _bits(ours[k]))]
    assert not differ, differ[:5]
