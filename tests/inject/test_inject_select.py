"""Module selection: linear-like classes, LoRA adapters never, lm_head only by opt-in, zero matches is an error.

Run: python -m pytest tests/inject/test_inject_select.py -q
"""

import pytest
import torch
from torch import nn

from quarl.inject import InjectionSpec, attach, make_filter_fn, select_modules
from quarl.inject.select import block_index

NOISE = dict(error_type="relative_gaussian", error_scale=0.01)


class RowParallelLinear(nn.Module):
    """vLLM-style layer: not an nn.Linear, but a 2-D .weight and linear semantics."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i))

    def forward(self, x):
        return x @ self.weight.t()


def _names(model, **kw):
    return [fqn for fqn, _ in select_modules(model, InjectionSpec(**{**NOISE, **kw}))]


def test_llama_default_selects_all_projections_but_not_head_or_embeddings(llama):
    names = _names(llama)
    assert len(names) == 2 * 7  # q k v o gate up down per block
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_lm_head_needs_explicit_opt_in(llama):
    assert "lm_head" not in _names(llama, exclude=())  # removing the exclude is not an opt-in
    assert "lm_head" in _names(llama, quantize_lm_head=True)  # the opt-in overrides the default exclude


def test_lora_adapters_never_selected_and_base_layer_is(lora_llama):
    names = _names(lora_llama, targets=(".*",), exclude=())
    assert not any("lora_" in n for n in names)
    q = [n for n in names if "layers.0.self_attn.q_proj" in n]
    assert q == ["base_model.model.model.layers.0.self_attn.q_proj.base_layer"]  # the wrapper is not selected
    assert not any(n.endswith("lm_head") for n in names)


def test_target_layers_targets_and_classes(llama):
    assert all(block_index(n) == 1 for n in _names(llama, target_layers=(1,)))
    assert _names(llama, targets=(r"layers\.0\.mlp\.down_proj$",)) == ["model.layers.0.mlp.down_proj"]
    assert len(_names(llama, targets=("q_proj", "k_proj"))) == 4


def test_parallel_linear_matched_by_class_pattern():
    model = nn.Sequential(RowParallelLinear(8, 4), nn.ReLU())
    assert _names(model) == ["0"]
    assert _names(model, target_classes=("*ParallelLinear",)) == ["0"]
    inj = attach(model, InjectionSpec(**NOISE))
    model(torch.randn(2, 8))
    assert inj.stats()["0"]["fires"] == {"unset": 1} and inj.stats()["0"]["weight_computations"] == 1
    inj.detach()


def test_zero_matches_is_an_error_listing_candidates(llama):
    with pytest.raises(ValueError, match=r"matches zero modules.*q_proj"):
        select_modules(llama, InjectionSpec(**NOISE, targets=("no_such_module",)))
    with pytest.raises(ValueError, match="zero modules"):
        attach(llama, InjectionSpec(**NOISE, target_layers=(5,)))


def test_filter_fn_has_torchao_signature(llama):
    keep = make_filter_fn(InjectionSpec(**NOISE), llama)
    assert keep(llama.model.layers[0].self_attn.q_proj, "model.layers.0.self_attn.q_proj")
    assert not keep(llama.lm_head, "lm_head")
    assert not keep(llama.model.embed_tokens, "model.embed_tokens")


def test_block_index():
    assert block_index("model.layers.12.mlp.up_proj") == 12
    assert block_index("transformer.h.3.attn.c_attn") == 3
    assert block_index("lm_head") is None
