"""The compressed-tensors schemes quarl exports: what each stores on disk and its on-the-fly equivalent.

Each :class:`CheckpointScheme` ties together (compressed-tensors 0.20 ``quant_scheme.py``):

* the quarl format that produces the numbers (always the ``compressed_tensors`` profile where one exists);
* the ``QuantizationArgs`` dicts written to ``config.json`` (exactly what compressed-tensors' own ``update_config``
  writes for that preset, checked in ``tests/checkpoint/test_ct_interop.py``);
* the compressed-tensors ``format`` (which tensors sit in the safetensors file):

  ======================  ==================================================================================
  ``nvfp4-pack-quantized``  ``weight_packed`` uint8 [out, in/2] (even column in the low nibble), ``weight_scale``
                            E4M3 [out, in/16], ``weight_global_scale`` fp32 [1] (encode factor ``2688 / amax``);
                            NVFP4 (W4A4) adds the static ``input_global_scale`` fp32 [1]
  ``mxfp4-pack-quantized``  ``weight_packed`` as above, ``weight_scale`` uint8 E8M0 [out, in/32]
  ``pack-quantized``        ``weight_packed`` int32 [out, ceil(in/8)] (eight ``int4 + 8`` nibbles per word, element
                            ``k`` at bits ``4k``), ``weight_scale`` [out, ceil(in/128)], ``weight_shape`` int64 [2]
  ``float-quantized``       ``weight`` float8_e4m3fn [out, in], ``weight_scale`` fp32 [1], ``input_scale`` fp32 [1]
  ======================  ==================================================================================

* the :class:`~quarl.inject.InjectionSpec` that fake-quantizes the same way on the fly, so the two paths can be
  compared (``tests/checkpoint/test_equivalence.py``).

Naming: ``W4A16`` here is compressed-tensors' preset (INT4, group 128, symmetric), which is what the name means in a
checkpoint. quarl's *injection* scheme ``W4A16`` defaults to MXFP4 instead (see ``quarl.inject.spec``); the
injection equivalent of this checkpoint scheme is ``InjectionSpec(scheme="W4A16", error_type="int4",
format_options={"group_size": 128})``. Likewise the MX checkpoints use compressed-tensors' EVEN scale rounding, so
their injection equivalent passes ``format_options={"profile": "compressed_tensors"}`` (quarl's injection default
for ``mxfp4`` is the OCP FLOOR rule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from quarl.formats import QFormat, get_format
from quarl.inject import InjectionSpec

CT_VERSION = "0.20.0"  # the compressed-tensors release whose on-disk format this module writes
QUANT_METHOD = "compressed-tensors"


def _fp4_args(strategy: str, group: int, scale_dtype: str, **extra: Any) -> dict[str, Any]:
    return {"dynamic": False, "group_size": group, "num_bits": 4, "scale_dtype": scale_dtype, "strategy": strategy,
            "symmetric": True, "type": "float", **extra}


_NV_W = _fp4_args("tensor_group", 16, "torch.float8_e4m3fn")
_NV_A = _fp4_args("tensor_group", 16, "torch.float8_e4m3fn", dynamic="local", observer="static_minmax")
_MX_W = _fp4_args("group", 32, "torch.uint8")
_MX_A = _fp4_args("group", 32, "torch.uint8", dynamic=True)
_INT4_W = {"dynamic": False, "group_size": 128, "num_bits": 4, "strategy": "group", "symmetric": True, "type": "int"}
_FP8_W = {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": "tensor", "symmetric": True,
          "type": "float"}
_FP8_A = {**_FP8_W, "observer": "static_minmax"}


@dataclass(frozen=True)
class CheckpointScheme:
    """One exportable compressed-tensors scheme (see the module docstring)."""

    name: str  # the compressed-tensors preset name (NVFP4A16, NVFP4, MXFP4A16, MXFP4, W4A16, FP8)
    ct_format: str  # compressed-tensors CompressionFormat value
    weight_format: str  # quarl.formats name for the weights
    weights_args: dict[str, Any]  # compressed-tensors QuantizationArgs for the weights (config.json)
    weight_options: dict[str, Any] = field(default_factory=dict)  # get_format options for the weights
    input_format: str | None = None  # quarl.formats name for the linear inputs (None: A16)
    input_options: dict[str, Any] = field(default_factory=dict)
    input_args: dict[str, Any] | None = None  # compressed-tensors QuantizationArgs for the inputs
    static_input: bool = False  # a calibrated per-tensor input scale is stored (NVFP4, FP8)
    fused_global_scales: bool = False  # llm-compressor shares weight global scales over q/k/v and gate/up
    injection: dict[str, Any] = field(default_factory=dict)  # InjectionSpec kwargs of the on-the-fly equivalent

    @property
    def weight_fmt(self) -> QFormat:
        """The quarl format of the stored weights."""
        return get_format(self.weight_format, **self.weight_options)

    @property
    def input_fmt(self) -> QFormat | None:
        """The quarl format the linear inputs are fake-quantized in (None for weight-only schemes)."""
        return get_format(self.input_format, **self.input_options) if self.input_format else None

    @property
    def packs_fp4(self) -> bool:
        """True for the FP4 formats whose codes are packed two per byte."""
        return self.ct_format in ("nvfp4-pack-quantized", "mxfp4-pack-quantized")

    def injection_spec(self) -> InjectionSpec:
        """The on-the-fly injection that fake-quantizes exactly as this checkpoint stores (weights) and runs
        (inputs, with a dynamic per-tensor scale where the checkpoint stores a static one)."""
        return InjectionSpec(**self.injection)

    def quantization_config(self, ignore: list[str]) -> dict[str, Any]:
        """The ``config.json`` ``quantization_config`` compressed-tensors writes for this scheme."""
        group = {"format": self.ct_format, "input_activations": self.input_args, "output_activations": None,
                 "targets": ["Linear"], "weights": self.weights_args}
        return {"config_groups": {"group_0": group}, "format": self.ct_format, "global_compression_ratio": None,
                "ignore": list(ignore), "kv_cache_scheme": None, "moe_sparsity_config": None,
                "quant_method": QUANT_METHOD, "quantization_status": "compressed", "sparsity_config": {},
                "transform_config": {}, "version": CT_VERSION}


_CT = {"profile": "compressed_tensors"}
SCHEMES: dict[str, CheckpointScheme] = {
    "NVFP4A16": CheckpointScheme("NVFP4A16", "nvfp4-pack-quantized", "nvfp4", _NV_W, dict(_CT),
                                 fused_global_scales=True, injection={"scheme": "NVFP4A16"}),
    "NVFP4": CheckpointScheme("NVFP4", "nvfp4-pack-quantized", "nvfp4", _NV_W, dict(_CT), "nvfp4", dict(_CT),
                              _NV_A, static_input=True, fused_global_scales=True, injection={"scheme": "NVFP4"}),
    "MXFP4A16": CheckpointScheme("MXFP4A16", "mxfp4-pack-quantized", "mxfp4", _MX_W, dict(_CT),
                                 injection={"scheme": "MXFP4A16", "format_options": dict(_CT)}),
    "MXFP4": CheckpointScheme("MXFP4", "mxfp4-pack-quantized", "mxfp4", _MX_W, dict(_CT), "mxfp4", dict(_CT), _MX_A,
                              injection={"scheme": "MXFP4", "format_options": dict(_CT)}),
    "W4A16": CheckpointScheme("W4A16", "pack-quantized", "int4", _INT4_W, {"group_size": 128},
                              injection={"scheme": "W4A16", "error_type": "int4",
                                         "format_options": {"group_size": 128}}),
    "FP8": CheckpointScheme("FP8", "float-quantized", "fp8_e4m3", _FP8_W, {}, "fp8_e4m3", {}, _FP8_A,
                            static_input=True, injection={"scheme": "FP8"}),
}


def get_scheme(name: str) -> CheckpointScheme:
    """The scheme called ``name`` (case-sensitive preset name); ValueError listing the valid ones otherwise."""
    if name not in SCHEMES:
        from quarl.configio import unknown_key_error

        raise unknown_key_error(name, SCHEMES, "checkpoint scheme")
    return SCHEMES[name]


def scheme_from_config(qcfg: dict[str, Any]) -> CheckpointScheme:
    """Recognize which scheme a ``quantization_config`` describes (quarl's or llm-compressor's), from its content.

    Only single-group configs targeting ``Linear`` are understood; the weights/inputs arguments are compared on the
    fields that change the numerics (``num_bits``, ``type``, ``strategy``, ``group_size``, ``symmetric``,
    ``dynamic``), so observer names and other calibration details do not matter.

    Raises:
        ValueError: anything else (several groups, sparsity, unknown arguments), with the reason.
    """
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"quant_method is {qcfg.get('quant_method')!r}, not {QUANT_METHOD!r}")
    groups = qcfg.get("config_groups") or {}
    if len(groups) != 1:
        raise ValueError(f"quarl reads single-group compressed-tensors configs, got {len(groups)} groups")
    group = next(iter(groups.values()))
    if group.get("output_activations") or qcfg.get("kv_cache_scheme"):
        raise ValueError("output-activation and KV-cache quantization are not supported")
    fmt = group.get("format") or qcfg.get("format")
    for scheme in SCHEMES.values():
        if (fmt == scheme.ct_format and _same_args(group.get("weights"), scheme.weights_args)
                and _same_args(group.get("input_activations"), scheme.input_args)):
            return scheme
    raise ValueError(f"unsupported compressed-tensors group (format {fmt!r}, weights {group.get('weights')}, "
                     f"inputs {group.get('input_activations')}); quarl reads {', '.join(SCHEMES)}")


_KEY_FIELDS = ("num_bits", "type", "strategy", "group_size", "symmetric", "dynamic")


def _same_args(found: dict[str, Any] | None, want: dict[str, Any] | None) -> bool:
    if found is None or want is None:
        return found is None and want is None
    return all(found.get(k) == want.get(k) for k in _KEY_FIELDS)
