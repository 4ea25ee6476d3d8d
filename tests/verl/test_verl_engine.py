"""quarl inside verl 0.9.1's real FSDP2 engine on CPU, loaded through ``external_lib``, at world size 1 and 2 (gloo).

Run: nox -s verl   (or, inside that environment: pytest tests/verl/test_verl_engine.py)

Each rank (tests/verl/_engine_run.py) builds verl's engine from a tiny random Qwen2 with LoRA r 8 under MXFP4 W4A4,
computes log-probs, runs one training step with a policy-gradient loss, and builds the reference engine. Here they
are compared with Hugging Face + PEFT + quarl on the same weights, and world size 1 with world size 2.
"""

import os

import pytest

pytest.importorskip("verl.workers")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _tiny_models import tiny_qwen2  # noqa: E402

import _engine_run  # noqa: E402

SPEC = "quarl:\n  injection: {scheme: MXFP4}\n"  # W4A4 MXFP4: no tensor-wide scale, so packing changes nothing
# packed (verl) vs padded (HF) batches run different matmul shapes: float reassociation only
ATOL = 2e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("verl_engine")
    tiny_qwen2(0).save_pretrained(work / "model")
    (work / "quarl.yaml").write_text(SPEC)
    old = os.environ.get("QUARL_VERL_CONFIG")
    os.environ["QUARL_VERL_CONFIG"] = str(work / "quarl.yaml")  # the seam: inherited by every rank
    try:
        out = {}
        for world in (1, 2):
            mp.start_processes(_engine_run.main, args=(world, str(work)), nprocs=world, join=True,
                               start_method="spawn")
            out[world] = [torch.load(work / f"ws{world}_rank{r}.pt", weights_only=False) for r in range(world)]
    finally:
        if old is None:
            os.environ.pop("QUARL_VERL_CONFIG")
        else:
            os.environ["QUARL_VERL_CONFIG"] = old
    return work, out


def _hf_reference(work, lora0):
    """HF Qwen2 + PEFT LoRA (the engine's initial adapter) + quarl: log-probs, one AdamW step, log-probs again."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from quarl.inject import InjectionSpec, attach

    model = AutoModelForCausalLM.from_pretrained(work / "model", attn_implementation="sdpa", dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", bias="none",
                                             task_type="CAUSAL_LM"))
    missing = set(lora0) - {n for n, _ in model.named_parameters()}
    assert not missing, f"adapter names differ from verl's: {sorted(missing)[:3]}"
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in lora0:
                p.copy_(lora0[name])
    inj = attach(model, InjectionSpec(scheme="MXFP4"), phase="training")
    data = _engine_run.batch(128)
    P = _engine_run.P

    def logp():
        logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"],
                       position_ids=data["position_ids"]).logits  # (B, P+R, V)
        lp = torch.log_softmax(logits[:, P - 1:-1].float(), -1)  # (B, R, V)
        return lp.gather(-1, data["input_ids"][:, P:].unsqueeze(-1)).squeeze(-1)  # (B, R)

    mask = data["response_mask"].float()
    lp0 = logp()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=_engine_run.LR, weight_decay=0.0)
    loss = -(lp0 * mask * data["advantages"]).sum() / mask.sum()
    loss.backward()
    opt.step()
    with torch.no_grad():
        lp1 = logp()
    lora1 = {n: p.detach().clone() for n, p in model.named_parameters() if n in lora0}
    return lp0.detach(), lp1, lora1, inj.modules, mask.bool()


def test_plugin_loads_through_external_lib_and_replaces_the_engine(runs):
    _, out = runs
    for world in (1, 2):
        for r in out[world]:
            assert not r["loaded_before"]  # quarl.verl was imported by verl's HFModelConfig, not by the test
            assert r["engine"] == r["ref_engine"] == "QuarlFSDPEngineWithLMHead"


def test_hooks_on_base_layer_never_on_lora(runs):
    _, out = runs
    hooked = out[1][0]["hooked"]
    assert len(hooked) == 2 * 7  # q k v o gate up down per block; lm_head never
    assert all(m.endswith(".base_layer") and "lora_" not in m for m in hooked)


def test_every_rank_holds_the_same_spec(runs):
    _, out = runs
    digests = out[2][0]["digests"]
    assert len(digests) == 2 and digests[0] == digests[1] == out[1][0]["digests"][0]


@pytest.mark.parametrize("world", [1, 2])
def test_logprobs_and_one_train_step_equal_hf_plus_quarl(runs, world):
    work, out = runs
    # verl draws LoRA A per world size (its RNG use differs), so each world is compared on its own initial adapter
    lora0 = out[world][0]["lora0"]
    for r in out[world]:
        assert all(torch.equal(r["lora0"][n], w) for n, w in lora0.items())  # ranks agree on the gathered adapter
    lp0, lp1, lora1, hf_hooked, mask = _hf_reference(work, lora0)
    assert [m.removeprefix("base_model.model.") for m in hf_hooked] == \
        [m.removeprefix("base_model.model.") for m in out[world][0]["hooked"]]
    for r in out[world]:
        torch.testing.assert_close(r["lp0"][mask], lp0[mask], atol=ATOL, rtol=0)
        torch.testing.assert_close(r["lp1"][mask], lp1[mask], atol=ATOL, rtol=0)
        assert (r["lp1"][mask] - r["lp0"][mask]).abs().max() > 1e-3  # the step moved the policy
        for name, w in lora1.items():
            torch.testing.assert_close(r["lora1"][name], w, atol=ATOL, rtol=0)
        assert r["metrics"]["quarl/actor/fires"] > 0 and r["metrics"]["quarl/actor/modules"] == 14


def test_reference_engine_is_injected_like_the_policy(runs):
    _, out = runs
    r = out[1][0]
    assert len(r["ref_hooked"]) == 14 and not any(m.endswith("base_layer") for m in r["ref_hooked"])  # no LoRA
    mask = _engine_run.batch(128)["response_mask"].bool()
    torch.testing.assert_close(r["ref_lp"][mask], r["lp0"][mask], atol=ATOL, rtol=0)  # LoRA B = 0 at init


def test_weight_cache_holds_a_full_size_copy_per_rank(runs):
    """The measured cost documented in docs/verl.md: sum over injected linears of out*in*element size, on every rank,
    while FSDP2 holds only 1/world of each parameter."""
    from transformers import AutoConfig

    _, out = runs
    cfg = AutoConfig.from_pretrained(runs[0] / "model")
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    per_layer = h * h * 2 + 2 * kv * h + 3 * h * i  # q, o; k, v; gate, up, down
    expected = cfg.num_hidden_layers * per_layer * 4  # fp32 weights here; bf16 would be 2 bytes each
    for world in (1, 2):
        for r in out[world]:
            assert r["cache_bytes"] == expected and len(r["cache_numel"]) == 14
    assert out[2][0]["shard_bytes"] < out[1][0]["shard_bytes"]  # the parameters are sharded, the cache is not
