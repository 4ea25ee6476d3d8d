"""Load a compressed-tensors checkpoint (quarl's or llm-compressor's) into a model with packed linear layers.

    model, tokenizer, info = load_checkpoint("out/nvfp4a16")
    info.scheme.name, info.packed_bytes, info.bf16_bytes

Recognition is by content, never by name: a directory is a compressed-tensors checkpoint when its ``config.json``
has a ``quantization_config`` with ``quant_method: compressed-tensors`` (`is_compressed_tensors_dir`), and the
scheme is read from that config's arguments (`schemes.scheme_from_config`).

Loading: the architecture is built from the config (``AutoModelForCausalLM.from_config``, quantization_config
removed so transformers' own compressed-tensors quantizer stays out of it); every ``nn.Linear`` that the config
targets (all but ``ignore``) is replaced by a `CompressedLinear` holding its stored tensors; the remaining dense
tensors (embeddings, norms, an untied head) are loaded as they are and tied weights re-tied. ``dense=True``
instead writes the dequantized weights into ordinary ``nn.Linear`` modules (frozen), for tools that quantize on
top of the checkpoint (``quarl diagnose``); the checkpoint's input quantization is then not applied.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from quarl.formats import dequantize

from .codec import weight_quantized
from .moe import EXPERT_KEY
from .packed import CompressedLinear
from .schemes import QUANT_METHOD, CheckpointScheme, scheme_from_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a loaded checkpoint holds (attached to the model as ``model.quarl_checkpoint``)."""

    path: str
    scheme: CheckpointScheme
    modules: int  # packed linear modules
    packed_bytes: int  # their stored bytes
    bf16_bytes: int  # the same weights in bf16
    ignore: tuple[str, ...]
    input_mode: str  # static | dynamic (see CompressedLinear)
    dense: bool  # loaded as dequantized nn.Linear weights

    def summary(self) -> str:
        """One line: scheme, modules, bytes packed vs bf16."""
        inputs = f", inputs {self.scheme.input_format} ({self.input_mode})" if self.scheme.input_format else ""
        mode = " [dense: dequantized weights, input quantization off]" if self.dense else ""
        return (f"compressed-tensors {self.scheme.name} ({self.scheme.ct_format}{inputs}): {self.modules} packed "
                f"linear modules, {self.packed_bytes / 2**20:.3f} MiB packed vs {self.bf16_bytes / 2**20:.3f} MiB "
                f"bf16 ({self.bf16_bytes / max(self.packed_bytes, 1):.2f}x){mode}")

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "scheme": self.scheme.name, "format": self.scheme.ct_format,
                "input_format": self.scheme.input_format, "input_mode": self.input_mode, "modules": self.modules,
                "packed_bytes": self.packed_bytes, "bf16_bytes": self.bf16_bytes, "ignore": list(self.ignore),
                "dense": self.dense}


def read_quantization_config(path: str | Path) -> dict[str, Any] | None:
    """The ``quantization_config`` of a model directory's config.json (None when absent)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("quantization_config")


def is_compressed_tensors_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory whose config declares ``quant_method: compressed-tensors``."""
    if not Path(path).is_dir():
        return False
    qcfg = read_quantization_config(path)
    return isinstance(qcfg, dict) and qcfg.get("quant_method") == QUANT_METHOD


def _ignored(fqn: str, ignore: list[str]) -> bool:
    """compressed-tensors ``ignore`` semantics: ``re:<regex>`` (``re.match``) or an exact module name / suffix."""
    for entry in ignore:
        if entry.startswith("re:"):
            if re.match(entry[3:], fqn):
                return True
        elif fqn == entry or fqn.endswith("." + entry):
            return True
    return False


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no *.safetensors file")
    return files


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in _safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def _build_model(path: Path, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # our loader, not transformers' compressed-tensors quantizer
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _module_tensors(tensors: dict[str, torch.Tensor], fqn: str) -> dict[str, torch.Tensor]:
    """Pop the stored tensors of one quantized module (local names), bias excluded."""
    prefix = fqn + "."
    local = {k[len(prefix):]: k for k in tensors if k.startswith(prefix) and "." not in k[len(prefix):]}
    return {name: tensors.pop(key) for name, key in local.items() if name != "bias"}


def load_checkpoint(path: str | Path, *, dtype: torch.dtype | None = None, device: str = "cpu",
                    input_mode: str = "static", cache_weight: bool = False, dense: bool = False
                    ) -> tuple[nn.Module, Any, CheckpointInfo]:
    """Load a compressed-tensors directory (see the module docstring).

    Args:
        path: the checkpoint directory.
        dtype: compute dtype of the dequantized weights and dense tensors (None: the config's ``dtype``).
        device: torch device.
        input_mode: ``static`` (stored input scales, as vLLM) or ``dynamic`` (per-forward, as quarl's injection).
        cache_weight: keep each dequantized weight between forwards (memory for speed).
        dense: plain ``nn.Linear`` modules holding the dequantized weights instead of packed modules.

    Returns:
        ``(model, tokenizer or None, CheckpointInfo)``; the model is in eval mode and has ``quarl_checkpoint``.

    Raises:
        ValueError: not a compressed-tensors checkpoint, an unsupported scheme, or tensors that do not match.
    """
    path = Path(path)
    qcfg = read_quantization_config(path)
    if not isinstance(qcfg, dict):
        raise ValueError(f"{path} has no quantization_config in config.json")
    scheme = scheme_from_config(qcfg)
    ignore = list(qcfg.get("ignore") or [])
    model = _build_model(path, dtype)
    dtype = next(model.parameters()).dtype
    tensors = _read_tensors(path)
    experts = sorted({m["expert"] for k in tensors if (m := EXPERT_KEY.match(k.rsplit(".", 1)[0] + ".weight"))
                      and not k.endswith(".weight")})
    if experts:
        raise ValueError(f"{path}: quantized MoE experts ({experts[0]} ...) in the per-expert layout vLLM serves; "
                         "quarl's loader does not rebuild fused experts from them (serve it with vLLM, or inject on "
                         "the unquantized model)")
    targets = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, nn.Linear) and not _ignored(fqn, ignore)]
    packed = bf16 = 0
    for fqn, linear in targets:
        local = _module_tensors(tensors, fqn)
        if "weight_scale" not in local:
            raise ValueError(f"{path}: module {fqn} is targeted by {scheme.name} but has no stored weight_scale")
        bias = tensors.pop(f"{fqn}.bias", None)
        module = CompressedLinear(linear.in_features, linear.out_features, scheme, local, bias, dtype, input_mode,
                                  cache_weight)
        packed += module.stored_bytes()
        bf16 += 2 * linear.in_features * linear.out_features
        if dense:
            linear.weight.data = module.dequantized_weight()
            if bias is not None:
                linear.bias.data = bias.to(dtype)
            module = linear
            module.requires_grad_(False)
        parent, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"{path}: tensors the model does not have: {unexpected[:8]}")
    expected = {f"{fqn}.{k}" for fqn, _ in targets for k in ("weight", "bias")} | set(_buffer_names(model))
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) | {"lm_head.weight"}
    left = [k for k in missing if k not in expected and not (k in tied and model.config.tie_word_embeddings)]
    if left:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {left[:8]}")
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device).eval()
    info = CheckpointInfo(str(path), scheme, len(targets), packed, bf16, tuple(ignore), input_mode, dense)
    model.quarl_checkpoint = info
    logger.info("loaded %s: %s", path, info.summary())
    return model, _tokenizer(path), info


def _buffer_names(model: nn.Module) -> list[str]:
    return [f"{fqn}.{name}" for fqn, m in model.named_modules() if isinstance(m, CompressedLinear)
            for name, _ in m.named_buffers(recurse=False)] + \
           [f"{fqn}.bias" for fqn, m in model.named_modules() if isinstance(m, CompressedLinear)]


def _tokenizer(path: Path) -> Any:
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def dequantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{fqn: dequantized weight}`` of every `CompressedLinear` (the interop tests compare these)."""
    return {fqn: dequantize(weight_quantized(dict(m.named_buffers()), m.scheme, (m.out_features, m.in_features),
                                             m.dtype))
            for fqn, m in model.named_modules() if isinstance(m, CompressedLinear)}
