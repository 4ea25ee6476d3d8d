"""KV cache and attention in low precision, through transformers' attention-function registry.

``InjectionSpec(kv_cache=..., attention=...)`` (see `quarl.inject.kvspec` for the formats, scale granularities and
the engines they match) is installed by `install` when the `Injector` attaches:

1. one attention function per injector is registered with ``transformers.AttentionInterface.register`` (and the
   model's mask function under the same name with ``AttentionMaskInterface``); it quantizes its inputs and calls the
   model's own implementation (``sdpa``, flash, flex) -- or quarl's `eager_attention` when the model ran ``eager``
   or when the probabilities are quantized (the stock kernels never expose them);
2. the model is switched to it with ``set_attn_implementation`` (every HF architecture that dispatches through
   ``ALL_ATTENTION_FUNCTIONS`` gets it; no model code is patched) and switched back by ``Injector.detach``, which
   also removes the registered names;
3. a forward pre-hook on each attention module reads the KV cache it was given, so that keys and values are
   quantized the way a deployed cache stores them: once, when the token is written.

Why the cache is written in place. The attention function receives the keys *after* the cache update: the
cached prefix followed by the new tokens. Quantizing that whole tensor at every decode step costs O(T) per layer
per step; instead, with no gradient to build and a ``DynamicLayer`` whose stored tensors are the very tensors
received, the new tokens are quantized and written back into the cache (``copy_``), so the cache holds exactly what
an FP8 / FP4 cache holds and each token is quantized once. Any other case -- training (a gradient through the
straight-through estimator), sliding-window or static cache layers, a cache filled before attach or during a
skipped phase (logged once) -- quantizes the whole received K / V out of place. Every granularity is a function of
each token alone (static or per-token scales, blocks along head_dim), so both paths give the same values, and
cached decoding equals recomputing the full sequence under the same quantization.

Phases, gradients, telemetry: as for the linears (`quarl.inject.injector`): the phase gate, one fire per logical
forward (a checkpoint recompute is injected but not counted), the identity STE (`pass_through`) unless
``use_ste=False``; per attention module the roles ``key`` / ``value`` (the newly written tokens), ``query`` and
``probs`` get rel-error / SQNR statistics. The states live in the injector's module table under the attention
module's name, so ``stats()``, ``never_fired()`` and ``check_fired()`` report them: a model switched back to another
attention implementation behind quarl's back shows up there as an injection that never fired.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from fnmatch import fnmatch
from typing import Any

import torch
from torch import nn

from quarl.inject.errors import pass_through
from quarl.inject.kvspec import STATIC, Calibration, KVScale
from quarl.inject.telemetry import ModuleTelemetry, stats_row

logger = logging.getLogger(__name__)
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks")  # eager variants quarl's eager attention does not implement


# --- quantization of one (B, H, T, D) role ----------------------------------------------------------------------------
class TensorQuantizer:
    """``x -> e(x)`` for a ``(B, H, T, D)`` key / value / query tensor at one `KVScale`, with its static amax.

    Static scales: ``s = T / elem_max`` (``T`` one value, or one per head ``(1, H, 1, 1)``), ``e(x) = round(x / s) * s``
    on the format's element grid (RNE, saturating: quarl.formats' rounding), the FP8 KV cache's
    ``fp8(x / k_scale) * k_scale``. NVFP4 blocks get ``T`` as their static ``global_amax``.
    """

    def __init__(self, fmt_name: str, scale: KVScale, calibration: Calibration | None, options: dict,
                 use_ste: bool, name: str) -> None:
        from quarl.formats import fake_quantizer, get_format

        self.fmt = get_format(fmt_name, **options)
        self.scale = scale
        self.calibration = calibration
        self.use_ste = use_ste
        self.name = name
        self.nvfp4 = self.fmt.family.value == "nvfp4"
        self.amax: torch.Tensor | None = None  # static T (tensor / head / NVFP4 tensor scale), set once
        self._scale: torch.Tensor | None = None  # T / elem_max, derived once
        native = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
        elem_name = getattr(self.fmt.elem, "name", "")
        self._native_dtype = (native.get(elem_name) if self.fmt.family.value == "scaled"
                              and self.fmt.rounding.value == "rne" else None)
        self._fq = None
        if scale in (KVScale.TOKEN, KVScale.HEAD_TOKEN):
            self._fq = fake_quantizer(get_format(fmt_name, granularity="per_token", **options))
        elif scale is KVScale.BLOCK and not self.nvfp4:
            self._fq = fake_quantizer(self.fmt)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``e(x)`` with the identity STE (``use_ste``) or no gradient."""
        y = self.values(x)
        return pass_through(x, y) if self.use_ste else y

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """``e(x)`` without autograd, same shape and dtype."""
        with torch.no_grad():
            x = x.detach()
            if self.scale is KVScale.TOKEN:  # one scale per token over all heads: rows of (B, T, H*D)
                b, h, t, d = x.shape
                y = self._fq(x.transpose(1, 2).reshape(b, t, h * d))
                return y.reshape(b, t, h, d).transpose(1, 2)
            if self._fq is not None:  # head_token (rows of D) and MX / NF4 blocks along D
                return self._fq(x)
            amax = self.static_amax(x)
            if self.nvfp4:
                from quarl.formats import fake_quantize

                return fake_quantize(x, self.fmt, global_amax=amax)
            if self.calibration is Calibration.UNIT:  # scale 1.0: x / 1 and q * 1 are exact, skip them
                return self._round(x.float()).to(x.dtype)
            if self._scale is None or self._scale.device != x.device:
                s = amax / self.fmt.elem_max
                self._scale = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float32).eps), s)
            return self._round(x.float() / self._scale).mul_(self._scale).to(x.dtype)

    def write_(self, x: torch.Tensor) -> None:
        """``x.copy_(e(x))`` in place (a slice of the KV cache, no autograd). FP8 at unit scale takes two kernels
        and the copy (``copy_`` widens the FP8 codes itself): it runs for every layer at every decode step."""
        if self._native_dtype is not None and self.calibration is Calibration.UNIT and x.dtype == torch.float32:
            m = self.fmt.elem_max
            x.copy_(x.clamp(-m, m).to(self._native_dtype))
        else:
            x.copy_(self.values(x))

    def _round(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (fp32) onto the element grid, RNE and saturating. FP8 uses torch's own cast after a clamp and INT
        ``torch.round`` (half to even) after a clamp: the same values as quarl.formats' ``round_elem`` (the tests
        check the cast against it), in 3 kernels instead of ~15 -- this runs per layer per decode step."""
        elem, m = self.fmt.elem, self.fmt.elem_max
        if self._native_dtype is not None:
            return v.clamp(-m, m).to(self._native_dtype).float()
        integer = self.fmt.family.value == "scaled" and getattr(elem, "step", 0) == 1.0
        if integer and self.fmt.rounding.value == "rne":
            return v.clamp(elem.qmin, elem.qmax).round().add_(0.0)  # + 0.0: an integer zero is +0.0
        from quarl.formats.rounding import round_elem

        return round_elem(v, elem, self.fmt.rounding)

    def static_amax(self, x: torch.Tensor) -> torch.Tensor:
        """The static ``T`` (fp32 on x's device): fixed by the first call (``first_forward``) or ``unit``."""
        if self.amax is None:
            if self.calibration is Calibration.UNIT:
                unit = self.fmt.elem_max * (448.0 if self.nvfp4 else 1.0)  # NVFP4: fp32 tensor scale 1
                amax = torch.tensor(unit, dtype=torch.float32, device=x.device)
            elif self.scale is KVScale.HEAD:
                amax = x.abs().float().amax(dim=(0, 2, 3), keepdim=True)  # (1, H, 1, 1)
            else:
                amax = x.abs().float().amax()
            if not bool(torch.isfinite(amax).all()):
                raise ValueError(f"quarl.inject: {self.name}: non-finite amax {amax.tolist()} in the calibration "
                                 "forward; a static KV scale cannot be set from it")
            self.amax = amax
            if self.calibration is Calibration.FIRST_FORWARD:
                logger.info("quarl.inject: %s static amax fixed from the first forward: %s", self.name,
                            [round(v, 6) for v in amax.reshape(-1).tolist()])
        return self.amax.to(x.device)


# --- eager attention (the stock formula, plus quantized probabilities) ------------------------------------------------
def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hkv * n_rep, T, D), each KV head repeated for its query heads (transformers' repeat_kv)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _masked(scores: torch.Tensor, mask: torch.Tensor | None, module: nn.Module) -> torch.Tensor:
    """Apply an additive float mask (eager), a boolean keep-mask (sdpa) or, with none, the causal rule of sdpa's
    ``is_causal`` aligned to the last key (the query tokens are the last ones)."""
    if mask is not None:
        if mask.dtype == torch.bool:
            return scores.masked_fill(~mask[..., : scores.shape[-1]], torch.finfo(scores.dtype).min)
        return scores + mask[..., : scores.shape[-1]]
    tq, tk = scores.shape[-2:]
    if not getattr(module, "is_causal", True) or tq == 1:
        return scores
    keep = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(diagonal=tk - tq)  # (Tq, Tk)
    return scores.masked_fill(~keep, torch.finfo(scores.dtype).min)


def eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    probs_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Transformers' eager attention (Llama's ``eager_attention_forward``, bit for bit with a float mask), optionally
    with the probabilities rounded by ``probs_fn`` before ``P V``.

    Args:
        query: (B, H, Tq, D); key, value: (B, Hkv, Tk, D); attention_mask: float (added), bool (keep) or None.
        probs_fn: maps the unnormalised ``P~ = exp(S - rowmax S)`` (fp32, in (0, 1]) to its rounded values; the
            output is then ``(e(P~) V) / sum(P~)`` (see `quarl.inject.kvspec`).

    Returns:
        (B, Tq, H, D) attention output and the (B, H, Tq, Tk) probabilities.
    """
    bad = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
    if bad:
        raise ValueError(f"quarl eager attention does not implement {bad} (this model's own eager attention does); "
                         "drop injection.attention.probs for it")
    n_rep = getattr(module, "num_key_value_groups", 1)
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = _masked(torch.matmul(query, key.transpose(2, 3)) * scaling, attention_mask, module)  # (B, H, Tq, Tk)
    if probs_fn is None:
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = nn.functional.dropout(probs, p=dropout, training=module.training)
        out = torch.matmul(probs, value)  # (B, H, Tq, D)
    else:
        s = scores.float()
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))  # (B, H, Tq, Tk), P~ in (0, 1]
        denom = p.sum(dim=-1, keepdim=True)  # (B, H, Tq, 1), from the unrounded P~ (kept in fp32 by the kernels)
        probs = nn.functional.dropout(probs_fn(p), p=dropout, training=module.training)
        out = (torch.matmul(probs.to(value.dtype), value).float() / denom).to(value.dtype)
        probs = (probs / denom).to(query.dtype)
    return out.transpose(1, 2).contiguous(), probs


def _probs_quantizer(spec: Any, use_ste: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``P~ -> e(P~ * probs_scale) / probs_scale`` (scaled formats: a static scale) or MX blocks along the keys."""
    from quarl.formats import fake_quantizer, get_format
    from quarl.formats.rounding import round_elem

    fmt = get_format(spec.format, **spec.options)
    if fmt.family.value == "mx":
        fq = fake_quantizer(fmt)
        values = lambda p: fq(p.detach())  # noqa: E731
    else:
        scale = spec.probs_scale
        values = lambda p: round_elem(p.detach() * scale, fmt.elem, fmt.rounding) / scale  # noqa: E731
    if use_ste:
        return lambda p: pass_through(p, values(p))
    return values


# --- the per-module state and the registered function -----------------------------------------------------------------
class AttentionInjection:
    """Quantizers, cache bookkeeping and telemetry of one attention module (an entry of ``Injector._modules``)."""

    weight = None  # the Injector's module table expects a weight cache attribute; attention has none

    def __init__(self, injector: Any, fqn: str, base: Callable, use_eager: bool) -> None:
        spec = injector.spec
        self.injector = injector
        self.fqn = fqn
        self.base = base
        self.use_eager = use_eager
        self.telemetry = ModuleTelemetry()
        kv, att = spec.kv_cache, spec.attention
        make = lambda s, role: TensorQuantizer(s.format, s.scale, s.calibration, s.options, spec.use_ste,  # noqa: E731
                                               f"{fqn} {role}")
        self.key = make(kv, "key") if kv else None
        self.value = make(kv, "value") if kv else None
        self.query = make(att, "query") if att and att.query else None
        self.probs = _probs_quantizer(att, spec.use_ste) if att and att.probs else None
        self._cache: Any = None  # the cache passed to the module's current forward (pre-hook)
        self._written: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # DynamicLayer -> tokens quantized
        self._calls = 0
        self._warned = False
        self._dynamic_layer = _dynamic_layer_class()

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._cache = kwargs.get("cache", kwargs.get("past_key_values"))

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self._cache = None

    def __call__(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        from quarl.inject.injector import in_backward

        phase, active = self.injector._gate()
        counted = not in_backward()
        if not active:
            if counted:
                self.telemetry.skipped[phase] += 1
            return self.base(module, query, key, value, attention_mask, **kwargs)
        measure = False
        if counted:
            self.telemetry.fires[phase] += 1
            self._calls += 1
            every = self.injector.stats_every
            measure = every > 0 and (self._calls - 1) % every == 0
        if self.key is not None:
            key, value = self._quantize_kv(module, query.shape[-2], key, value, measure)
        if self.query is not None:
            q = self.query(query)
            if measure:
                self.telemetry.measure("query", query, q)
            query = q
        if self.probs is None:
            return self.base(module, query, key, value, attention_mask, **kwargs)
        return eager_attention(module, query, key, value, attention_mask, probs_fn=self._probs_fn(measure), **kwargs)

    def _probs_fn(self, measure: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        if not measure:
            return self.probs

        def fn(p: torch.Tensor) -> torch.Tensor:
            q = self.probs(p)
            self.telemetry.measure("probs", p, q)
            return q

        return fn

    def _quantize_kv(self, module: nn.Module, new: int, key: torch.Tensor, value: torch.Tensor,
                     measure: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """K / V as the cache stores them: the new tokens written back quantized (fast path), or all out of place."""
        layer = self._cache_layer(module, key, value)
        if layer is not None and not (torch.is_grad_enabled() and (key.requires_grad or value.requires_grad)):
            done, total = self._written.get(layer), key.shape[-2]
            start = 0 if done is None and total == new else (done if done is not None and total == done + new
                                                             else None)
            if start is not None:
                for x, quant, role in ((key, self.key, "key"), (value, self.value, "value")):
                    fresh = x[..., start:, :]  # the cache now stores what a quantized KV cache stores
                    if measure:
                        q = quant.values(fresh)
                        self.telemetry.measure(role, fresh, q)
                        fresh.copy_(q)
                    else:
                        quant.write_(fresh)
                self._written[layer] = total
                return key, value
            if not self._warned:
                self._warned = True
                logger.warning("quarl.inject: %s: the KV cache holds %d tokens that were not written under this "
                               "injection (filled before attach or in a skipped phase); the whole cache is "
                               "quantized out of place at every step from now on (slower)", self.fqn, total - new)
        kq, vq = self.key(key), self.value(value)
        if measure:  # the tokens of this forward (the rest of the cache was measured when it was written)
            self.telemetry.measure("key", key[..., -new:, :], kq[..., -new:, :])
            self.telemetry.measure("value", value[..., -new:, :], vq[..., -new:, :])
        return kq, vq

    def _cache_layer(self, module: nn.Module, key: torch.Tensor, value: torch.Tensor) -> Any:
        """The cache's ``DynamicLayer`` whose stored tensors ARE ``key`` / ``value`` (append-only), else None."""
        layers = getattr(self._cache, "layers", None)
        idx = getattr(module, "layer_idx", None)
        if layers is None or not isinstance(idx, int) or idx >= len(layers):
            return None
        layer = layers[idx]
        if type(layer) is not self._dynamic_layer or layer.keys is not key or layer.values is not value:
            return None
        return layer

    def static_scales(self) -> dict[str, list[float]]:
        """The static amax ``T`` of each role that has one (empty before the first forward with first_forward)."""
        out = {}
        for role in ("key", "value", "query"):
            quant = getattr(self, role)
            if quant is not None and quant.amax is not None:
                out[role] = quant.amax.reshape(-1).tolist()
        return out


def _dynamic_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    return DynamicLayer


class _Registration:
    """Owns the registered attention / mask names and the model's previous implementation; ``remove()`` restores."""

    def __init__(self, model: nn.Module, name: str, previous: str) -> None:
        self.model = model
        self.name = name
        self.previous = previous
        self.active = True

    def remove(self) -> None:
        if not self.active:
            return
        self.active = False
        current = self.model.config._attn_implementation
        if current == self.name:
            self.model.set_attn_implementation(self.previous)
        else:
            logger.warning("quarl.inject: the model's attention implementation was changed to %r while quarl's %r "
                           "was attached; left as it is (not restored to %r)", current, self.name, self.previous)
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        for registry in (AttentionInterface, AttentionMaskInterface):
            registry._global_mapping.pop(self.name, None)  # register() has no public inverse


def _hf_model(model: nn.Module) -> nn.Module:
    """The outermost module with ``set_attn_implementation`` (the HF model itself, or the one inside a PEFT wrap)."""
    for module in model.modules():
        if hasattr(module, "set_attn_implementation") and hasattr(module, "config"):
            return module
    raise ValueError("injection.kv_cache / attention need a transformers model that dispatches attention through "
                     "its AttentionInterface (set_attn_implementation); this model has none")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every attention module: class ``*Attention`` with a ``layer_idx`` (the cache index)."""
    return [(fqn, m) for fqn, m in model.named_modules()
            if fnmatch(type(m).__name__, "*Attention") and isinstance(getattr(m, "layer_idx", None), int)]


def install(injector: Any) -> list[Any]:
    """Register quarl's attention function for ``injector`` and switch its model to it; returns the handles
    (hooks and the registration) for ``injector._handles``, and adds one `AttentionInjection` per attention module
    to ``injector._modules``.

    Raises:
        ValueError: no attention module, or a model without a dispatchable attention implementation.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    hf = _hf_model(injector.model)
    previous = hf.config._attn_implementation or "sdpa"
    if previous.startswith("quarl_"):
        raise ValueError(f"the model already runs quarl's attention function {previous!r} (another injector with "
                         "kv_cache / attention is attached); detach it first")
    modules = attention_modules(injector.model)
    if not modules:
        raise ValueError("injection.kv_cache / attention: no attention module (class *Attention with a layer_idx) "
                         "in this model")
    spec = injector.spec
    probs = spec.attention is not None and spec.attention.probs
    use_eager = previous == "eager" or probs
    base = eager_attention if previous == "eager" else ALL_ATTENTION_FUNCTIONS[previous]
    states: dict[nn.Module, AttentionInjection] = {}
    handles: list[Any] = []
    for fqn, module in modules:
        state = AttentionInjection(injector, fqn, base, use_eager)
        states[module] = state
        injector._modules[fqn] = state
        handles.append(module.register_forward_pre_hook(state.pre, with_kwargs=True))
        handles.append(module.register_forward_hook(state.post, with_kwargs=True, always_call=True))

    def quarl_attention(module: nn.Module, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        state = states.get(module)
        if state is None:
            raise RuntimeError(f"quarl.inject: attention module {type(module).__name__} was not found at attach "
                               "time, so its KV cache quantization is undefined")
        return state(module, *args, **kwargs)

    name = f"quarl_{id(injector):x}"
    AttentionInterface.register(name, quarl_attention)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    registration = _Registration(hf, name, previous)
    try:
        hf.set_attn_implementation(name)
    except Exception:
        registration.active = False
        for handle in handles:
            handle.remove()
        for registry in (AttentionInterface, AttentionMaskInterface):
            registry._global_mapping.pop(name, None)
        raise
    handles.append(registration)
    kv, att = spec.kv_cache, spec.attention
    logger.info("quarl.inject: attention %r -> %s on %d modules (kv_cache %s, attention %s%s)", previous, name,
                len(modules), f"{kv.format}/{kv.scale.value}" if kv else "off",
                f"{att.format}/q={att.query}/p={att.probs}" if att else "off", ", eager" if use_eager else "")
    return handles
