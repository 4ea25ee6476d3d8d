"""Export a model as a compressed-tensors checkpoint (what llm-compressor writes and vLLM serves).

    report = export_checkpoint(model, tokenizer, get_scheme("NVFP4A16"), "out/dir", calibration=batches)

Steps:

1. select the ``nn.Linear`` modules to quantize: every one except the ``ignore`` regexes (default: ``lm_head``,
   which compressed-tensors' presets and quarl's injection both leave in full precision; embeddings are not
   linear and stay dense);
2. static input scales (NVFP4's ``input_global_scale``, FP8's ``input_scale``) are calibrated like llm-compressor's
   ``static_minmax`` observer: the amax of each module's input over all ``calibration`` batches (forward hooks,
   no gradient), then ``input_global_scale = reciprocal(amax) * 2688`` (quarl's compressed-tensors NVFP4 formula)
   or ``input_scale = amax / 448``;
3. NVFP4 weight global scales are fused like llm-compressor's ``update_fused_layer_weight_global_scales``: q/k/v of
   one attention block and gate/up of one MLP share the smallest encode factor, i.e. the one of their joint amax
   (``reciprocal`` is monotone, so ``min(gs_i) == gs(max amax_i)`` exactly); ``fuse_global_scales=False`` keeps
   one per module (then every weight equals ``fake_quantize(W)`` of on-the-fly injection);
4. quantize module by module (`codec.compress_weight`, a tqdm bar per layer): only one weight's fp32 temporaries
   exist at a time, and the packed results are about a quarter of the bf16 size, so memory stays bounded by the
   model itself plus its packed copy;
5. write ``model.safetensors`` (non-quantized tensors as they are; a tied ``lm_head.weight`` is dropped as
   ``save_pretrained`` does), ``config.json`` with ``quantization_config`` (`CheckpointScheme.quantization_config`),
   the generation config and the tokenizer.

Mixture-of-experts models (transformers' fused 3-D experts) are written in the per-expert on-disk layout vLLM loads,
every expert quantized as its own linear layer and the routers kept dense; see `quarl.checkpoint.moe`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from quarl.formats import quantize

from . import moe
from .codec import compress_weight, stored_bytes
from .schemes import CheckpointScheme

logger = logging.getLogger(__name__)
DEFAULT_IGNORE = ("lm_head",)
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # llm-compressor FUSED_LAYER_NAMES


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote."""

    out: Path
    scheme: str
    modules: int  # quantized linear modules
    params: int  # parameters of those modules' weights
    packed_bytes: int  # their stored bytes (codes + scales + global scales)
    bf16_bytes: int  # the same weights in bf16
    checkpoint_bytes: int  # model.safetensors tensors in total (dense parts included)
    checkpoint_bf16_bytes: int  # the whole model in bf16
    fused_groups: int  # q/k/v and gate/up groups sharing one NVFP4 global scale

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def quantizable_modules(model: nn.Module, ignore: Sequence[str] = DEFAULT_IGNORE) -> list[tuple[str, nn.Linear]]:
    """``(fqn, module)`` of every ``nn.Linear`` whose name matches none of the ``ignore`` regexes (``re.search``;
    compressed-tensors also accepts bare names: ``lm_head`` matches ``lm_head`` only as a whole name part)."""
    pats = [re.compile(p[3:]) if p.startswith("re:") else re.compile(rf"(^|\.){re.escape(p)}$") for p in ignore]
    return [(fqn, m) for fqn, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(p.search(fqn) for p in pats)]


@torch.no_grad()
def calibrate_input_amax(model: nn.Module, modules: list[tuple[str, nn.Module]],
                         batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-module fp32 amax ``(1,)`` of the linear inputs over all batches (``model(**batch)`` each)."""
    amax: dict[str, torch.Tensor] = {}
    handles = []

    def hook(fqn: str):
        def record(module: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().amax().to(torch.float32).reshape(1)
            amax[fqn] = torch.maximum(amax[fqn], a) if fqn in amax else a
        return record

    for fqn, module in modules:
        handles.append(module.register_forward_pre_hook(hook(fqn)))
    try:
        n = 0
        for batch in batches:
            model(**batch)
            n += 1
    finally:
        for h in handles:
            h.remove()
    missing = [fqn for fqn, _ in modules if fqn not in amax]
    if not n or missing:
        raise ValueError(f"calibration ran {n} batches and never reached {len(missing)} modules "
                         f"({', '.join(missing[:5])}); static input scales need calibration data that reaches them")
    return amax


def fused_weight_amax(modules: list[tuple[str, nn.Linear]]) -> tuple[dict[str, torch.Tensor], int]:
    """Joint weight amax of each complete q/k/v and gate/up sibling group (llm-compressor's fusion rule)."""
    by_name = dict(modules)
    joint: dict[str, torch.Tensor] = {}
    groups = 0
    parents = {fqn.rpartition(".")[0] for fqn in by_name}
    for parent in sorted(parents):
        prefix = f"{parent}." if parent else ""
        for names in FUSED_GROUPS:
            members = [prefix + n for n in names]
            if all(m in by_name for m in members):
                a = torch.stack([by_name[m].weight.detach().abs().amax().to(torch.float32) for m in members]).amax()
                joint.update({m: a.reshape(1) for m in members})
                groups += 1
    return joint, groups


def _input_tensors(scheme: CheckpointScheme, amax: torch.Tensor) -> dict[str, torch.Tensor]:
    if scheme.input_format == "nvfp4":
        probe = torch.zeros(scheme.input_fmt.block_size)
        return {"input_global_scale": quantize(probe, scheme.input_fmt, global_amax=amax).global_scale.reshape(1)}
    scale = amax / _E4M3_MAX
    return {"input_scale": torch.where(scale == 0, torch.full_like(scale, _FP32_EPS), scale)}


_E4M3_MAX = 448.0
_FP32_EPS = torch.finfo(torch.float32).eps  # compressed-tensors _get_dtype_eps(float32): scale 0 -> eps


def export_checkpoint(model: nn.Module, tokenizer: Any, scheme: CheckpointScheme, out: str | Path, *,
                      calibration: Iterable[dict[str, torch.Tensor]] | None = None,
                      ignore: Sequence[str] = DEFAULT_IGNORE, fuse_global_scales: bool | None = None,
                      progress: bool = True) -> ExportReport:
    """Quantize ``model`` with ``scheme`` and write a compressed-tensors directory (see the module docstring).

    Args:
        model: a Hugging Face causal LM (``model.config``, ``save_pretrained``-style state dict).
        tokenizer: saved next to the weights (None: none saved).
        scheme: from `quarl.checkpoint.get_scheme`.
        out: a new or empty directory.
        calibration: batches of model kwargs (``input_ids``, ``attention_mask``) for static input scales; required
            when ``scheme.static_input``.
        ignore: module-name patterns left in full precision (compressed-tensors ``ignore``).
        fuse_global_scales: share NVFP4 weight global scales over q/k/v and gate/up (default: the scheme's rule).
        progress: show a per-layer progress bar.

    Returns:
        ExportReport with the bytes written.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; checkpoints are never overwritten")
    experts = moe.has_experts(model)
    if experts:
        moe.check_scheme(scheme)
        state = moe.on_disk_state(model)  # the per-expert layout (raises for experts fused on disk)
        ignore = tuple(ignore) + tuple(p for p in moe.router_ignore(model) if p not in ignore)
    targets = quantizable_modules(model, ignore)
    if not targets:
        raise ValueError(f"no nn.Linear module to quantize in {type(model).__name__} (ignore={list(ignore)})")
    input_amax = {}
    if scheme.static_input:
        if calibration is None:
            raise ValueError(f"{scheme.name} stores static input scales: pass calibration batches")
        input_amax = calibrate_input_amax(model, targets, calibration)
    fuse = scheme.fused_global_scales if fuse_global_scales is None else fuse_global_scales
    joint, n_groups = fused_weight_amax(targets) if fuse and scheme.weight_format == "nvfp4" else ({}, 0)
    tensors, packed_bytes, params = {}, 0, 0
    weights = [f"{fqn}.weight" for fqn, _ in targets]
    disk = moe.disk_names(model, weights) if experts else {w: w for w in weights}  # Mixtral: mlp -> block_sparse_moe
    for fqn, module in tqdm(targets, desc=f"quantize {scheme.name}", disable=not progress, unit="layer"):
        local = compress_weight(module.weight, scheme, joint.get(fqn))
        packed_bytes += stored_bytes(local)
        params += module.weight.numel()
        if fqn in input_amax:
            local.update(_input_tensors(scheme, input_amax[fqn]))
        prefix = disk[f"{fqn}.weight"].removesuffix(".weight")
        tensors.update({f"{prefix}.{k}": v for k, v in local.items()})
    quantized = set(disk.values())
    state = state if experts else model.state_dict()
    n_modules = len(targets)
    if experts:
        expert_tensors, keys, expert_params, expert_bytes, expert_groups = moe.compress_experts(state, scheme, fuse)
        tensors.update(expert_tensors)
        quantized |= set(keys)
        n_modules, params, packed_bytes = n_modules + len(keys), params + expert_params, packed_bytes + expert_bytes
        n_groups += expert_groups
    seen: dict[int, str] = {}
    dense_params = 0
    for name, tensor in state.items():
        if name in quantized:
            continue
        ptr = tensor.data_ptr()
        if ptr in seen:  # tied weights (lm_head = embed_tokens): stored once, as save_pretrained does
            logger.info("%s shares storage with %s; not stored twice", name, seen[ptr])
            continue
        seen[ptr] = name
        tensors[name] = tensor.detach().contiguous()
        dense_params += tensor.numel() if tensor.is_floating_point() else 0
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_config(model, scheme, out, ignore)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    report = ExportReport(out, scheme.name, n_modules, params, packed_bytes, 2 * params,
                          stored_bytes(tensors), 2 * (params + dense_params), n_groups)
    logger.info("exported %s: %d modules, %d weight bytes packed vs %d bf16 (%.2fx); file %d bytes",
                scheme.name, report.modules, packed_bytes, 2 * params, 2 * params / packed_bytes,
                report.checkpoint_bytes)
    return report


def _write_config(model: nn.Module, scheme: CheckpointScheme, out: Path, ignore: Sequence[str]) -> None:
    """config.json = the model config + quantization_config (the generation config as save_pretrained writes it)."""
    model.config.save_pretrained(out)
    path = out / "config.json"
    data = json.loads(path.read_text())
    data["quantization_config"] = scheme.quantization_config(list(ignore))
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(out)
