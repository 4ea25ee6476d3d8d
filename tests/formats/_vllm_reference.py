"""A TRANSCRIPTION of vLLM's NVFP4 emulation reference, kept only as an oracle for cross-checking quarl.

Not quarl code and not a test module (leading underscore): `test_xcheck_vllm.py` imports it. vLLM cannot be
installed here (it needs CUDA wheels), so its CPU reference is transcribed step by step, independently of
`quarl.formats.nvfp4`, from vllm-project/vllm
``vllm/model_executor/layers/quantization/utils/nvfp4_emulation_utils.py``:

* ``get_reciprocal(t) = 1.0 / (t + (t == 0) * 1e8)``;
* ``cast_to_fp4(x)``: ``sign(x) * `` the magnitude bucketed by the threshold table below (applied in order, in place);
* ``ref_nvfp4_quant(x, global_scale, block_size)``: block amax ``vec_max``; ``scale = global_scale * (vec_max *
  FLOAT4_E2M1_MAX_RECIPROCAL)`` (a Python float 1/6); clamp to +-448; cast to ``float8_e4m3fn`` and back;
  ``output_scale = get_reciprocal(scale * get_reciprocal(global_scale))``; ``cast_to_fp4(clamp(x.float() *
  output_scale, -6, 6))``;
* ``ref_nvfp4_quant_dequant``: ``(x_fp4 * (scale / global_scale)).to(x.dtype)`` (the CPU branch; on CUDA vLLM runs a
  Triton kernel instead).

``global_scale`` is the fp32 ``(1,)`` encode factor compressed-tensors stores as ``input_global_scale``
(``2688 / amax``; vLLM's ``input_global_scale_inv``). Written with plain torch ops, no quarl imports.

Run: imported by `pytest tests/formats/test_xcheck_vllm.py`.
"""

from __future__ import annotations

import torch

_E2M1_MAX_RECIPROCAL = 1 / 6.0  # vLLM: 1 / scalar_types.float4_e2m1f.max(), a Python float


def get_reciprocal(t: torch.Tensor) -> torch.Tensor:
    """vLLM ``get_reciprocal`` (tensor branch)."""
    return 1.0 / (t + (t == 0) * 1e8)


def cast_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """vLLM ``cast_to_fp4``: RNE onto {0, .5, 1, 1.5, 2, 3, 4, 6} by thresholds, times ``sign(x)``."""
    sign = torch.sign(x)
    x = torch.abs(x)
    x[(x >= 0.0) & (x <= 0.25)] = 0.0
    x[(x > 0.25) & (x < 0.75)] = 0.5
    x[(x >= 0.75) & (x <= 1.25)] = 1.0
    x[(x > 1.25) & (x < 1.75)] = 1.5
    x[(x >= 1.75) & (x <= 2.5)] = 2.0
    x[(x > 2.5) & (x < 3.5)] = 3.0
    x[(x >= 3.5) & (x <= 5.0)] = 4.0
    x[x > 5.0] = 6.0
    return x * sign


def ref_nvfp4_quant(x: torch.Tensor, global_scale: torch.Tensor, block_size: int = 16):
    """vLLM ``ref_nvfp4_quant``: (fp4 values fp32 ``(m, n)``, e4m3 block scales as fp32 ``(m, n // block)``)."""
    assert global_scale.dtype == torch.float32
    assert x.ndim == 2
    m, n = x.shape
    x = torch.reshape(x, (m, n // block_size, block_size))
    vec_max = torch.max(torch.abs(x), dim=-1, keepdim=True)[0].to(torch.float32)
    scale = global_scale * (vec_max * _E2M1_MAX_RECIPROCAL)
    scale = torch.clamp(scale, max=448, min=-448)
    scale = scale.to(torch.float8_e4m3fn).to(torch.float32)
    output_scale = get_reciprocal(scale * get_reciprocal(global_scale))
    scaled_x = x.to(torch.float32) * output_scale
    clipped_x = torch.clamp(scaled_x, -6.0, 6.0).reshape(m, n)
    return cast_to_fp4(clipped_x), scale.squeeze(-1)


def ref_nvfp4_quant_dequant(x: torch.Tensor, global_scale: torch.Tensor, block_size: int = 16) -> torch.Tensor:
    """vLLM ``ref_nvfp4_quant_dequant``, CPU branch: fake-quantized ``x`` in ``x.dtype``."""
    x_m, x_k = x.shape
    output_dtype = x.dtype
    x_fp4, x_blockscale = ref_nvfp4_quant(x, global_scale, block_size)
    x_fp4 = x_fp4.reshape(x_m, x_k // block_size, block_size)
    x_blockscale = x_blockscale.unsqueeze(-1) / global_scale
    return (x_fp4 * x_blockscale).reshape(x_m, x_k).to(output_dtype)


def ct_input_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The ``input_global_scale`` compressed-tensors / llm-compressor store for a calibrated ``amax``
    (``generate_gparam``: ``448 * 6 / amax`` with a Python-float numerator, i.e. ``reciprocal(amax) * 2688``)."""
    return (2688.0 / amax.to(torch.float32)).reshape(1)
