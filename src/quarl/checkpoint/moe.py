"""Mixture-of-experts models in compressed-tensors checkpoints: one quantized linear per expert, as vLLM loads them.

transformers 5 holds the routed experts fused (``gate_up_proj`` ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``), but
checkpoints on disk -- what ``save_pretrained`` writes, what llm-compressor quantizes and what vLLM's ``FusedMoE``
weight loader maps with ``make_expert_params_mapping`` -- keep one 2-D linear per expert and projection:
``…experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj`` (Qwen2-MoE, Qwen3-MoE, OLMoE) or ``…experts.<e>.w1`` /
``w3`` / ``w2`` (Mixtral, under ``block_sparse_moe``). The export therefore writes the state dict in that layout,
using transformers' own reverse weight conversion (``revert_weight_conversion``, the function ``save_pretrained``
uses), and quantizes every per-expert weight like any other linear:

- blocks along each expert's input dimension, one NVFP4 weight global scale per expert and projection, with gate
  and up of one expert sharing theirs (llm-compressor's fused gate/up rule, and what vLLM's NVFP4 MoE kernels
  require: one ``w13`` global scale per expert). That joint scale is exactly the one quarl's on-the-fly injection
  takes over ``gate_up_proj[e]``, so the checkpoint's experts equal the injected ones bit for bit;
- routers and gates (``mlp.gate``, ``shared_expert_gate``, ``router``) stay dense and are listed in ``ignore``
  (vLLM builds them unquantized);
- schemes with static input scales (NVFP4 W4A4, FP8) would need per-expert calibrated input scales; quarl does not
  calibrate those and refuses them for MoE models (weight-only schemes and MXFP4, whose inputs are dynamic, work);
- architectures that keep their experts fused on disk as well (GPT-OSS) are refused: no per-expert layout exists.

quarl's own loader (`quarl.checkpoint.load_checkpoint`) does not rebuild fused experts from such a checkpoint and
refuses it; vLLM serves it.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from quarl.inject.select import EXPERT_WEIGHTS, is_experts, is_router

from .codec import compress_weight, stored_bytes
from .schemes import CheckpointScheme

EXPERT_KEY = re.compile(r"^(?P<expert>.+\.experts\.\d+)\.(?P<proj>\w+)\.weight$")
FUSED_EXPERT_PAIRS = (("gate_proj", "up_proj"), ("w1", "w3"))  # gate / up of one expert share a global scale


def has_experts(model: nn.Module) -> bool:
    """True when the model holds transformers experts containers (fused 3-D expert weights)."""
    return any(is_experts(m) for m in model.modules())


def check_scheme(scheme: CheckpointScheme) -> None:
    """Refuse the schemes quarl cannot export for MoE experts (see the module docstring)."""
    if scheme.static_input:
        raise ValueError(f"{scheme.name} stores static input scales, which an MoE checkpoint needs per expert (the "
                         "tokens each expert receives); quarl does not calibrate per-expert input scales. Export "
                         "NVFP4A16, MXFP4A16, W4A16 or MXFP4 (dynamic inputs) instead")


def router_ignore(model: nn.Module) -> tuple[str, ...]:
    """``re:`` ignore entries for the model's routers with a linear-like weight (by leaf name: ``.gate``,
    ``.shared_expert_gate``...), so they stay dense whatever the on-disk prefix (``mlp`` / ``block_sparse_moe``)."""
    leaves = sorted({fqn.split(".")[-1] for fqn, m in model.named_modules()
                     if is_router(m, fqn) and isinstance(getattr(m, "weight", None), torch.Tensor)})
    return tuple(rf"re:.*\.{leaf}$" for leaf in leaves)


def on_disk_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` in the layout ``save_pretrained`` writes (per-expert 2-D weights).

    Raises:
        ValueError: the architecture keeps its experts fused on disk too (GPT-OSS: ``experts.gate_up_proj``
            ``(E, H, 2I)``), a layout the compressed-tensors presets quarl writes do not describe.
    """
    from transformers.core_model_loading import revert_weight_conversion

    state = dict(revert_weight_conversion(model, model.state_dict()))
    fused = [k for k, t in state.items() if t.dim() == 3 and k.rsplit(".", 1)[-1] in EXPERT_WEIGHTS]
    if fused:
        raise ValueError(f"{type(model).__name__} stores its experts fused on disk ({fused[0]}, 3-D); quarl writes "
                         "MoE checkpoints only in the per-expert linear layout (Qwen-MoE, Mixtral, OLMoE...)")
    return state


def disk_names(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{state-dict key: on-disk key}`` for one-to-one tensors (the linear weights)."""
    from transformers.core_model_loading import revert_weight_conversion

    out = {}
    for key in keys:
        renamed = list(revert_weight_conversion(model, {key: torch.empty(0)}))
        if len(renamed) != 1:
            raise ValueError(f"cannot map {key} to one on-disk tensor (got {renamed})")
        out[key] = renamed[0]
    return out


def expert_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The per-expert 2-D weights of an on-disk state dict."""
    return [k for k, t in state.items() if EXPERT_KEY.match(k) and t.dim() == 2]


def _joint_amax(state: dict[str, torch.Tensor], keys: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """The joint amax of each expert's gate and up weights (shared NVFP4 global scale); groups formed."""
    by_name = set(keys)
    joint: dict[str, torch.Tensor] = {}
    groups = 0
    for key in keys:
        m = EXPERT_KEY.match(key)
        for gate, up in FUSED_EXPERT_PAIRS:
            pair = [f"{m['expert']}.{gate}.weight", f"{m['expert']}.{up}.weight"]
            if m["proj"] == gate and all(p in by_name for p in pair):
                a = torch.stack([state[p].detach().abs().amax().to(torch.float32) for p in pair]).amax()
                joint.update({p: a.reshape(1) for p in pair})
                groups += 1
    return joint, groups


def compress_experts(state: dict[str, torch.Tensor], scheme: CheckpointScheme, fuse: bool
                     ) -> tuple[dict[str, torch.Tensor], list[str], int, int, int]:
    """Quantize every per-expert weight of an on-disk state dict.

    Returns:
        ``(tensors, quantized keys, params, packed bytes, fused groups)``; tensors use the on-disk names
        (``…experts.3.gate_proj.weight_packed`` ...).
    """
    keys = expert_keys(state)
    joint, groups = _joint_amax(state, keys) if fuse and scheme.weight_format == "nvfp4" else ({}, 0)
    tensors: dict[str, torch.Tensor] = {}
    params = packed = 0
    for key in keys:
        local = compress_weight(state[key], scheme, joint.get(key))
        packed += stored_bytes(local)
        params += state[key].numel()
        prefix = key.removesuffix(".weight")
        tensors.update({f"{prefix}.{k}": v for k, v in local.items()})
    return tensors, keys, params, packed, groups
