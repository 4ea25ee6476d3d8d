"""KV cache and attention in low precision (``InjectionSpec(kv_cache=..., attention=...)``) on tiny HF models.

K and V entering attention lie on the format's grid (FP8 against torch's native E4M3 cast); cached decoding stores
and reads the same K / V as recomputing the whole sequence; the function adds nothing when its error is off;
telemetry per phase; the STE; bit-exact detach; quarl's eager attention equals transformers' eager.

Run: python -m pytest tests/inject/test_inject_attention.py -q
"""

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.models.llama.modeling_llama import eager_attention_forward

from _tiny_models import TINY, tiny_llama, tiny_qwen2
from quarl.formats import fake_quantize
from quarl.inject import InjectionSpec, attach
from quarl.formats.rounding import round_elem
from quarl.inject.attention import AttentionInjection, TensorQuantizer, eager_attention
from quarl.inject.kvspec import Calibration, KVScale

ATTN = "model.layers.0.self_attn"
KV_CASES = [  # (kv_cache, reference quantizer of one (B, H, T, D) tensor, given its calibration amax T)
    ("fp8_e4m3", lambda x, t: x.clamp(-448, 448).to(torch.float8_e4m3fn).float()),  # unit scale: the plain cast
    ({"format": "fp8_e4m3", "scale": "tensor", "calibration": "first_forward"},
     lambda x, t: ((x / (t / 448)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * (t / 448))),
    ({"format": "fp8_e4m3", "scale": "head", "calibration": "first_forward"},
     lambda x, t: ((x / (t.view(1, -1, 1, 1) / 448)).clamp(-448, 448).to(torch.float8_e4m3fn).float()
                   * (t.view(1, -1, 1, 1) / 448))),
    ({"format": "int8", "scale": "head_token"}, lambda x, t: fake_quantize(x, "int8", granularity="per_token")),
    ({"format": "int8", "scale": "token"},
     lambda x, t: fake_quantize(x.transpose(1, 2).flatten(2), "int8", granularity="per_token")
     .view(x.shape[0], x.shape[2], x.shape[1], x.shape[3]).transpose(1, 2)),
    ({"format": "nvfp4"}, lambda x, t: fake_quantize(x, "nvfp4", global_amax=t)),
    ({"format": "mxfp4"}, lambda x, t: fake_quantize(x, "mxfp4")),
]
IDS = [str(c[0]) if isinstance(c[0], str) else "-".join(str(v) for v in c[0].values()) for c in KV_CASES]


def _ids(t=10, seed=1):
    return torch.randint(0, TINY["vocab_size"], (2, t), generator=torch.Generator().manual_seed(seed))


class _Spy:
    """Records the (query, key, value) each attention module hands to the stock implementation, then calls it."""

    def __init__(self, inj):
        self.calls = {}
        for fqn, state in inj._modules.items():
            if isinstance(state, AttentionInjection):
                state.base = self._wrap(fqn, state.base)

    def _wrap(self, fqn, base):
        def fn(module, query, key, value, mask, **kw):
            self.calls.setdefault(fqn, []).append((query.clone(), key.clone(), value.clone()))
            return base(module, query, key, value, mask, **kw)
        return fn


def _decode(model, ids, prefill):
    """Logits of a prefill of ``prefill`` tokens then one-token cached steps, (B, T, V)."""
    out = model(ids[:, :prefill], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    return torch.cat(steps, dim=1), cache


@pytest.mark.parametrize("kv,reference", KV_CASES, ids=IDS)
def test_kv_entering_attention_lies_on_the_format_grid(kv, reference):
    model, ids = tiny_llama(), _ids()
    inj = attach(model, InjectionSpec(kv_cache=kv), phase="rollout")
    spy = _Spy(inj)
    with torch.no_grad():
        with inj.bypassed():
            model(ids)  # raw K / V (the bypass hands them through unquantized)
        model(ids)
    (_, k_raw, v_raw), (_, k_q, v_q) = spy.calls[ATTN]  # layer 0: its input does not depend on other layers
    amax = inj._modules[ATTN].key.amax
    assert not torch.equal(k_q, k_raw)
    assert torch.equal(k_q, reference(k_raw, amax))
    assert torch.equal(v_q, reference(v_raw, inj._modules[ATTN].value.amax))
    if kv == "fp8_e4m3":  # every layer: on the E4M3 grid itself
        for _, k, v in (calls[-1] for calls in spy.calls.values()):
            for x in (k, v):
                assert torch.equal(x, x.to(torch.float8_e4m3fn).float())
    inj.detach()


@pytest.mark.parametrize("kv,reference", KV_CASES, ids=IDS)
def test_cache_stores_and_reads_what_full_recomputation_reads(kv, reference):
    """The same raw K / V (RoPE'd) fed once whole, and as a prefill plus one-token steps through a real
    DynamicCache: the K / V the attention reads at the last step, and the cache's contents, are bit-identical."""
    model = tiny_llama()
    inj = attach(model, InjectionSpec(kv_cache=kv, attention={"format": "fp8_e4m3", "scale": "head_token"}),
                 phase="rollout")
    state, module, spy = inj._modules[ATTN], model.model.layers[0].self_attn, _Spy(inj)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 10, 16, generator=g) * 3 for h in (4, 2, 2))  # (B, H, T, D)
    with torch.no_grad():
        state(module, q, k.clone(), v.clone(), None, scaling=0.25)  # no cache: the full sequence
        cache = DynamicCache(config=model.config)
        state.pre(module, (), {"cache": cache})
        for lo, hi in [(0, 6)] + [(t, t + 1) for t in range(6, 10)]:
            keys, values = cache.update(k[:, :, lo:hi].clone(), v[:, :, lo:hi].clone(), 0)
            state(module, q[:, :, lo:hi], keys, values, None, scaling=0.25)
    (q_full, k_full, v_full), *_, (q_last, k_last, v_last) = spy.calls[ATTN]
    assert torch.equal(k_last, k_full) and torch.equal(v_last, v_full) and torch.equal(q_last, q_full[:, :, -1:])
    assert torch.equal(cache.layers[0].keys, k_full) and torch.equal(cache.layers[0].values, v_full)
    assert torch.equal(k_full, reference(k, state.key.amax))


@pytest.mark.parametrize("build", [tiny_llama, tiny_qwen2], ids=["llama", "qwen2"])
@pytest.mark.parametrize("kv", [c[0] for c in KV_CASES], ids=IDS)
def test_cached_generation_matches_full_recomputation(kv, build):
    model, ids = build(), _ids()
    inj = attach(model, InjectionSpec(kv_cache=kv), phase="rollout")
    spy = _Spy(inj)
    with torch.no_grad():
        full = model(ids).logits
        inc, cache = _decode(model, ids, prefill=6)
    (_, k_full, v_full), *_, (_, k_last, v_last) = spy.calls[ATTN]
    # the raw K / V of a prefill or a one-token step come from smaller GEMMs, which may round the last bit
    # differently from the full-sequence GEMM (unquantized too), so at model level K / V agree to within a
    # quantization step; test_cache_stores_and_reads_what_full_recomputation_reads feeds identical raw K / V
    torch.testing.assert_close(k_last, k_full, rtol=0, atol=0.05)  # < one quantization step of these K / V
    torch.testing.assert_close(v_last, v_full, rtol=0, atol=0.05)
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-3)
    assert torch.equal(cache.layers[0].keys, k_last)  # the cache itself stores the quantized values
    assert inj.stats()[ATTN]["fires"] == {"rollout": 1 + 1 + (ids.shape[1] - 6)}
    inj.detach()


def test_cache_filled_before_attach_is_quantized_out_of_place(caplog):
    model, ids = tiny_llama(), _ids()
    with torch.no_grad():
        cache = model(ids[:, :6], use_cache=True).past_key_values  # unquantized prefix
        inj = attach(model, InjectionSpec(kv_cache="fp8_e4m3"), phase="rollout")
        spy = _Spy(inj)
        with caplog.at_level("WARNING"):
            model(ids[:, 6:7], cache=cache, use_cache=True)
    _, k, _ = spy.calls[ATTN][-1]
    assert torch.equal(k, k.to(torch.float8_e4m3fn).float())  # the old tokens are quantized too
    assert "not written under this injection" in caplog.text
    inj.detach()


def test_generate_fires_in_prefill_and_decode():
    model, ids = tiny_llama(), _ids(t=5)
    inj = attach(model, InjectionSpec(kv_cache={"format": "nvfp4"}), phase="rollout")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        full = model(out[:, :-1]).logits[:, -4:].argmax(-1)  # greedy tokens, recomputed under the same cache format
    assert torch.equal(out[:, 5:], full)
    assert inj.stats()[ATTN]["fires"]["rollout"] == 4 + 1  # prefill + 3 decode steps, then the recomputation
    inj.check_fired("rollout")
    inj.detach()


def test_logits_unchanged_when_the_error_is_off():
    model, ids = tiny_llama(), _ids()
    with torch.no_grad():
        ref = model(ids).logits
        inj = attach(model, InjectionSpec(kv_cache="fp8_e4m3", attention={"probs": True},
                                          apply_during="training"), phase="rollout")
        assert model.config._attn_implementation.startswith("quarl_")
        assert torch.equal(model(ids).logits, ref)  # through quarl's function, which then adds nothing
    assert inj.stats()[ATTN]["skipped"] == {"rollout": 1} and inj.never_fired() == inj.modules
    inj.detach()


def test_telemetry_counts_per_phase_and_a_switched_model_is_caught():
    model, ids = tiny_llama(), _ids()
    inj = attach(model, InjectionSpec(kv_cache={"format": "mxfp4"}, attention={"format": "fp8_e4m3", "probs": True}),
                 stats_every=1)
    with inj.phase("rollout"), torch.no_grad():
        model(ids)
        model(ids)
    with inj.phase("training"):
        model(ids).logits.sum().backward()
    stats = inj.stats()
    assert set(stats) == {f"model.layers.{i}.self_attn" for i in range(TINY["num_hidden_layers"])}
    for row in stats.values():
        assert row["fires"] == {"rollout": 2, "training": 1}
        assert all(row[role]["measured"] == 3 and 5 < row[role]["sqnr_db"] < 60
                   for role in ("key", "value", "query", "probs"))
    inj.check_fired("training")
    inj.reset_stats()
    model.set_attn_implementation("sdpa")  # behind quarl's back: the hooks can no longer fire
    with inj.phase("rollout"), torch.no_grad():
        model(ids)
    with pytest.raises(RuntimeError, match="never fired"):
        inj.check_fired("rollout")
    inj.detach()
    assert model.config._attn_implementation == "sdpa"


def test_detach_restores_bit_exactly_and_unregisters():
    model, ids = tiny_qwen2(), _ids()
    with torch.no_grad():
        ref = model(ids).logits
        inj = attach(model, InjectionSpec(scheme="NVFP4", kv_cache="fp8_e4m3", attention="fp8_e4m3"))
        name = model.config._attn_implementation
        assert name in AttentionInterface._global_mapping
        assert not torch.equal(model(ids).logits, ref)
        inj.detach()
        inj.detach()  # idempotent
        assert torch.equal(model(ids).logits, ref)
    assert model.config._attn_implementation == "sdpa" and name not in AttentionInterface._global_mapping


@pytest.mark.parametrize("use_ste", [True, False])
def test_training_gradient_goes_through_the_ste(use_ste):
    model, ids = tiny_llama(), _ids()
    inj = attach(model, InjectionSpec(kv_cache={"format": "nvfp4"}, use_ste=use_ste), phase="training")
    model(ids, use_cache=False).logits.square().mean().backward()
    k_grad = model.model.layers[0].self_attn.k_proj.weight.grad
    if use_ste:
        assert k_grad is not None and k_grad.abs().sum() > 0
    else:  # the quantized K is detached: no gradient reaches k_proj through attention
        assert k_grad is None
    inj.detach()


def test_quarl_eager_attention_equals_transformers_eager():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 16, generator=g) for h in (4, 2, 2))
    future = torch.ones(7, 7, dtype=torch.bool).triu(1)
    mask = torch.zeros(2, 1, 7, 7).masked_fill(future, torch.finfo(torch.float32).min)
    ours = eager_attention(attn, q, k, v, mask, scaling=0.25)
    theirs = eager_attention_forward(attn, q, k, v, mask, scaling=0.25)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    # no mask: the causal rule (sdpa's is_causal), and a boolean keep-mask, give the same probabilities
    torch.testing.assert_close(eager_attention(attn, q, k, v, None, scaling=0.25)[1], theirs[1], rtol=0, atol=0)
    keep = ~torch.ones(7, 7, dtype=torch.bool).triu(1)
    assert torch.equal(eager_attention(attn, q, k, v, keep[None, None], scaling=0.25)[1], theirs[1])


def test_quantized_probabilities_lie_on_the_scaled_grid():
    model = tiny_llama()
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 5, 16, generator=g) for h in (4, 2, 2))
    seen = {}

    def record(p):
        seen["p"] = p
        seen["q"] = (p * 448).clamp(max=448).to(torch.float8_e4m3fn).float() / 448  # P~ in (0, 1]: E4M3 at scale 448
        return seen["q"]

    out, probs = eager_attention(attn, q, k, v, None, scaling=0.25, probs_fn=record)
    denom = seen["p"].sum(-1, keepdim=True)
    assert torch.equal(probs, seen["q"] / denom)
    expected = torch.matmul(seen["q"], v.repeat_interleave(2, dim=1)) / denom
    assert torch.equal(out, expected.transpose(1, 2).contiguous())
    # and the model path applies exactly that rounding
    inj = attach(model, InjectionSpec(attention={"format": "fp8_e4m3", "query": False, "probs": True}),
                 phase="rollout")
    p = torch.rand(1, 4, 5, 5)
    assert torch.equal(inj._modules[ATTN].probs(p), (p * 448).to(torch.float8_e4m3fn).float() / 448)
    inj.detach()


def test_kv_only_spec_touches_no_linear_and_round_trips_yaml():
    spec = InjectionSpec(kv_cache={"format": "int8", "scale": "head_token"}, attention={"probs": True})
    assert spec.error_type is None
    assert InjectionSpec.from_yaml(spec.to_yaml()) == spec
    model = tiny_llama()
    inj = attach(model, spec, phase="rollout")
    assert inj.modules == [f"model.layers.{i}.self_attn" for i in range(TINY["num_hidden_layers"])]
    inj.detach()


@pytest.mark.parametrize("bad,match", [
    ({"format": "fp8_e4m3", "scale": "dynamic"}, "no KV cache works that way"),
    ({"format": "int8", "calibration": "unit"}, "first_forward"),
    ({"format": "mxfp4", "scale": "token"}, "takes scale in"),
    ({"format": "fp8_e4m3", "scale": "token", "calibration": "unit"}, "no static scale"),
    ({"format": "fp8_e4m3", "options": {"rounding": "stochastic"}}, "stochastic"),
    ({"format": "fp8_e4m3", "options": {"granularity": "per_token"}}, "scale granularity"),
    ({"formt": "fp8_e4m3"}, "did you mean 'format'"),
])
def test_spec_refuses_what_no_kv_cache_does(bad, match):
    with pytest.raises(ValueError, match=match):
        InjectionSpec(kv_cache=bad)


def test_second_attention_injector_is_refused_and_a_failed_attach_leaves_no_trace():
    model, ids = tiny_llama(), _ids()
    with torch.no_grad():
        ref = model(ids).logits
    inj = attach(model, InjectionSpec(kv_cache="fp8_e4m3"))
    with pytest.raises(ValueError, match="already runs quarl's attention"):
        attach(model, InjectionSpec(scheme="MXFP4", kv_cache="fp8_e4m3"))
    inj.detach()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # the refused attach's linear hooks were removed too


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "int8", "int4"])
def test_static_scale_rounding_is_quarl_formats_rounding_bit_for_bit(fmt):
    """The static-scale path rounds with torch's cast / round (3 kernels per decode step) instead of round_elem."""
    quant = TensorQuantizer(fmt, KVScale.TENSOR, Calibration.FIRST_FORWARD, {}, True, "k")
    g = torch.Generator().manual_seed(0)
    top = quant.fmt.elem_max
    grid = torch.linspace(-1.2 * top, 1.2 * top, 40001)  # every binade, ties included, and saturation
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 2.0 ** -10, -2.0 ** -12, 0.5, -2.5])
    v = torch.cat([grid, torch.randn(10000, generator=g) * top / 4, special])
    ours, ref = quant._round(v), round_elem(v, quant.fmt.elem, quant.fmt.rounding)
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan)  # NaN stays NaN (its payload bits are the cast's own)
    assert torch.equal(ours[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # bits: the sign of zero too


def test_quarl_train_runs_with_a_quantized_kv_cache(tmp_path):
    """GRPO + LoRA (PEFT) under MXFP4 W4A4 + FP8 KV: the KV injection fires in HF generation and in the STE forward."""
    from quarl.rl import load_config
    from quarl.rl.run import _build

    tiny = ["grpo.steps=1", "grpo.prompts_per_step=4", "grpo.generations=2", "grpo.max_new_tokens=24",
            "data.train_n=16", "eval.n=4", "eval.batch_size=4", "eval.every=10", "run.checkpoint_every=1"]
    cfg = load_config("injection: {scheme: MXFP4, kv_cache: fp8_e4m3}\n", tiny)
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, model = _build(cfg, tmp_path, 0)
    trainer.train()
    recorder.close()
    attn = {k: v for k, v in attached.injector.stats().items() if k.endswith("self_attn")}
    assert len(attn) == 6 and all(k.startswith("base_model.model.") for k in attn)  # inside the PEFT wrap
    assert all(v["fires"].get("rollout", 0) > 0 and v["fires"].get("training", 0) > 0 for v in attn.values())
    assert all(25 < v["key"]["sqnr_db"] < 40 for v in attn.values())  # E4M3: ~31 dB


@pytest.mark.parametrize("kv", ["fp8_e4m3", {"format": "fp8_e4m3", "calibration": "first_forward"}, "nvfp4"])
def test_in_place_cache_write_equals_the_quantizer(kv):
    spec = InjectionSpec(kv_cache=kv).kv_cache
    quant = TensorQuantizer(spec.format, spec.scale, spec.calibration, spec.options, True, "k")
    x = torch.randn(2, 2, 9, 32, generator=torch.Generator().manual_seed(0)) * 50
    quant.values(x)  # fixes a first_forward scale from clean values
    x[0, 0, 5, :4] = torch.tensor([1e4, -1e4, float("nan"), -0.0])  # saturation, NaN, the sign of zero
    expected = quant.values(x)
    cache = x.clone()
    quant.write_(cache[:, :, 3:, :])  # a strided slice, as the new tokens of a DynamicLayer are
    assert torch.equal(cache[:, :, :3], x[:, :, :3])  # the prefix is untouched
    got, want = cache[:, :, 3:], expected[:, :, 3:]
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()].view(torch.int32), want[~want.isnan()].view(torch.int32))
