"""quarl.checkpoint -- pre-quantized compressed-tensors checkpoints: the QeRL path (quantize once, freeze, LoRA).

QeRL does not fake-quantize every forward: it quantizes the base once (NVFP4A16 via llm-compressor), loads it
frozen, trains LoRA in high precision and rolls out on vLLM's 4-bit kernels. This package writes and reads that
format with quarl's bit-exact numerics, so the pre-quantized path and on-the-fly injection are comparable::

    from quarl.checkpoint import get_scheme, export_checkpoint, load_checkpoint
    report = export_checkpoint(model, tok, get_scheme("NVFP4A16"), "ckpt/")      # compressed-tensors directory
    model, tok, info = load_checkpoint("ckpt/")                                  # packed CompressedLinear modules
    spec = info.scheme.injection_spec()      # the on-the-fly InjectionSpec that computes the same thing

Schemes (compressed-tensors preset names): ``NVFP4A16``, ``NVFP4``, ``MXFP4A16``, ``MXFP4``, ``W4A16`` (INT4 g128),
``FP8``; see `schemes.py` for the on-disk tensors and `packed.py` for the forward.
"""

from .codec import compress_weight, pack_int4, unpack_int4, weight_quantized
from .export import DEFAULT_IGNORE, ExportReport, export_checkpoint, quantizable_modules
from .load import CheckpointInfo, dequantized_state, is_compressed_tensors_dir, load_checkpoint
from .packed import INPUT_MODES, CompressedLinear, lora_custom_modules, lora_targets
from .schemes import SCHEMES, CheckpointScheme, get_scheme, scheme_from_config

__all__ = [
    "DEFAULT_IGNORE",
    "INPUT_MODES",
    "SCHEMES",
    "CheckpointInfo",
    "CheckpointScheme",
    "CompressedLinear",
    "ExportReport",
    "compress_weight",
    "dequantized_state",
    "export_checkpoint",
    "get_scheme",
    "is_compressed_tensors_dir",
    "load_checkpoint",
    "lora_custom_modules",
    "lora_targets",
    "pack_int4",
    "quantizable_modules",
    "scheme_from_config",
    "unpack_int4",
    "weight_quantized",
]
