"""`CompressedLinear`: a frozen linear layer that keeps its compressed-tensors weight packed.

    y = q_in(x) @ dequantize(weight_packed, weight_scale, ...)^T + bias

* The weight stays in its stored form (persistent buffers with the compressed-tensors names, so ``state_dict()``
  is the checkpoint's own layout); it is dequantized with ``quarl.formats.dequantize`` on every forward, or once
  per buffer version with ``cache_weight=True`` (memory for speed). Buffers are never parameters: the base cannot
  be trained or picked up by an optimizer; LoRA adapters go on top (`lora_custom_modules`).
* ``q_in`` exists for the schemes that quantize activations (NVFP4, MXFP4, FP8) and is
  ``quarl.formats.fake_quantize`` in the checkpoint's input format, whose straight-through estimator passes the
  gradient to ``x`` (LoRA below this layer keeps learning). Input scales (``input_mode``):

  - ``"static"`` (default; what vLLM runs): NVFP4 uses the stored ``input_global_scale`` (as the per-tensor amax
    that reproduces it exactly, `_amax_for_global_scale`), FP8 the stored ``input_scale``
    (``e4m3(clamp(x / s, +-448)) * s`` through torch's saturating E4M3 cast, equal to quarl's E4M3 grid on
    torch >= 2.13, with an identity gradient). MXFP4 inputs are dynamic by definition.
  - ``"dynamic"``: the per-tensor scale is recomputed from each input, as quarl's on-the-fly injection does; with it
    a checkpoint and ``attach(model, scheme.injection_spec())`` give the same logits bit for bit.

``calls`` counts forwards (the evaluation reports it as the quantization actually applied).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from quarl.formats import Family, dequantize, fake_quantize, quantize
from quarl.inject.errors import pass_through

from .codec import weight_quantized
from .schemes import CheckpointScheme

logger = logging.getLogger(__name__)
INPUT_MODES = ("static", "dynamic")
_E4M3_MAX = 448.0


class CompressedLinear(nn.Module):
    """Linear layer over a packed compressed-tensors weight (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, scheme: CheckpointScheme, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32, input_mode: str = "static",
                 cache_weight: bool = False) -> None:
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.dtype, self.input_mode, self.cache_weight = scheme, dtype, input_mode, cache_weight
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.bias = nn.Parameter(bias.to(dtype), requires_grad=False) if bias is not None else None
        self.calls = 0
        self._cache: tuple[tuple, torch.Tensor] | None = None
        self._input_amax: torch.Tensor | None = None
        if scheme.static_input and scheme.input_format == "nvfp4" and "input_global_scale" in tensors:
            self._input_amax = _amax_for_global_scale(tensors["input_global_scale"], scheme)
        self.quantizes_input = scheme.input_format is not None
        weight = weight_quantized(dict(self.named_buffers()), scheme, (out_features, in_features), dtype)  # validates
        del weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme.name}, input_mode={self.input_mode}")

    # --- weight -----------------------------------------------------------------------------------------------------
    def dequantized_weight(self) -> torch.Tensor:
        """The weight ``(out, in)`` in ``self.dtype``, dequantized from the stored tensors (no gradient)."""
        key = tuple((b._version, b.data_ptr()) for b in self.buffers())
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        q = weight_quantized(dict(self.named_buffers()), self.scheme, (self.out_features, self.in_features),
                             self.dtype)
        w = dequantize(q)
        if self.cache_weight:
            self._cache = (key, w)
        return w

    @property
    def weight(self) -> torch.Tensor:
        """Read-only dequantized weight (for code that reads ``.weight``: shapes, dtype, device, diagnostics)."""
        return self.dequantized_weight()

    def stored_bytes(self) -> int:
        """Bytes of the stored weight tensors (packed codes and scales; bias excluded)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    # --- input ------------------------------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the low-precision GEMM sees it (identity for weight-only schemes); STE gradient."""
        fmt = self.scheme.input_fmt
        if fmt is None:
            return x
        if self.input_mode == "dynamic" or not self.scheme.static_input:
            return fake_quantize(x, fmt)
        if fmt.family is Family.NVFP4:
            return fake_quantize(x, fmt, global_amax=self._input_amax)
        return pass_through(x, _fp8_static(x, self.input_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        self.calls += 1
        w = self.dequantized_weight()
        return nn.functional.linear(self.quantize_input(x), w, self.bias)


def _fp8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' static FP8 fake quantization: ``e4m3(clamp(x / s, +-448)) * s`` (fp32, x's dtype)."""
    with torch.no_grad():
        s = scale.to(torch.float32)
        q = (x.to(torch.float32) / s).clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)
        return (q * s).to(x.dtype)


def _amax_for_global_scale(global_scale: torch.Tensor, scheme: CheckpointScheme) -> torch.Tensor:
    """The per-tensor amax whose NVFP4 encode factor (``reciprocal(amax) * 2688``) is exactly ``global_scale``.

    quarl.formats takes a static NVFP4 scale as an amax; ``2688 / gs`` can be off by an ulp after the round trip,
    so the neighbours are searched until quarl reproduces the stored factor bit for bit. A factor no amax produces
    (a hand-edited file) keeps the nearest one, with a warning.
    """
    fmt = scheme.input_fmt
    gs = global_scale.to(torch.float32).reshape(1)
    probe = torch.zeros(fmt.block_size)
    amax = (2688.0 / gs.double()).float()
    best = amax
    for _ in range(8):
        got = quantize(probe, fmt, global_amax=amax).global_scale.reshape(1)
        if torch.equal(got, gs):
            return amax
        # a larger amax gives a smaller factor: step towards the stored one
        amax = torch.nextafter(amax, torch.full_like(amax, float("inf") if got > gs else 0.0))
    logger.warning("input_global_scale %s is not reproduced exactly by any nearby amax; using %s", gs.item(),
                   best.item())
    return best


def lora_targets(model: nn.Module) -> list[str]:
    """Leaf names of the model's `CompressedLinear` modules (``q_proj``, ...), for ``LoraConfig(target_modules=)``:
    PEFT's ``"all-linear"`` only matches ``nn.Linear``, so on a pre-quantized base it would find no projection."""
    return sorted({fqn.rpartition(".")[2] for fqn, m in model.named_modules() if isinstance(m, CompressedLinear)})


def lora_custom_modules() -> dict[type, Any]:
    """PEFT mapping that lets LoRA wrap `CompressedLinear` with PEFT's generic ``lora.Linear``.

    Use: ``config = LoraConfig(...); config._register_custom_module(lora_custom_modules())`` before
    ``get_peft_model``. The adapter runs in full precision on the unquantized input; the base forward (packed
    weight, input quantization) is unchanged.
    """
    from peft.tuners.lora import Linear as LoraLinear

    return {CompressedLinear: LoraLinear}
