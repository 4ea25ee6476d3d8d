"""Harness mechanics on a tiny random Llama built in the test: batching/padding, EOS, sampling, prompts, run_eval.

Run: python -m pytest tests/eval/test_harness.py -q
"""

import dataclasses

import pytest

from quarl import configio
from quarl.data.gsm8k import VERL_GSM8K_INSTRUCTION
from quarl.data.records import Problem
from quarl.eval.gsm8k import Scorer
from quarl.eval.harness import EvalConfig, GenerationConfig, PromptStyle, build_prompt, generate, run_eval
from quarl.inject import Phase
from _tiny_lm import tiny_model, tiny_tokenizer

PROMPTS = [
    "Tom has 3 apples . how many ?",
    "Ann buys 12 more books then gives away 5 . how many books does Ann have ?",
    "1 + 2 =",
    "let's think step by step",
    "Tom has 7 books",
]
GREEDY = GenerationConfig(max_new_tokens=12, batch_size=5)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    m = tiny_model(len(tok))
    # A frequent word is an extra EOS, so rows stop at different steps (the padded rows keep decoding after).
    m.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("s")]
    return m


def _ids(tok, completions):
    return [[tok(c.text, add_special_tokens=False)["input_ids"] for c in row] for row in completions]


def test_batched_equals_unbatched_greedy(model, tok):
    batched = generate(model, tok, PROMPTS, GREEDY)
    single = [generate(model, tok, [p], dataclasses.replace(GREEDY, batch_size=1))[0] for p in PROMPTS]
    assert _ids(tok, batched) == _ids(tok, single)
    assert [c[0].n_tokens for c in batched] == [c[0].n_tokens for c in single]
    assert [c[0].finished for c in batched] == [c[0].finished for c in single]
    lengths = {c[0].n_tokens for c in batched}
    assert len(lengths) > 1, "rows should stop at different steps for this test to exercise padding after EOS"
    assert any(c[0].finished for c in batched) and any(not c[0].finished for c in batched)


def test_greedy_matches_hf_generate(model, tok):
    ours = generate(model, tok, PROMPTS, GREEDY)
    for prompt, row in zip(PROMPTS, ours):
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=12, do_sample=False,
                             eos_token_id=model.generation_config.eos_token_id, pad_token_id=tok.pad_token_id)
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        assert len(new) == row[0].n_tokens
        body = new[:-1] if new[-1] in model.generation_config.eos_token_id else new  # HF keeps the EOS token
        assert tok.decode(body, skip_special_tokens=True) == row[0].text


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model, tok):
    cfg = GenerationConfig(max_new_tokens=10, batch_size=5, samples=3, temperature=1.0, seed=7)
    a, b = generate(model, tok, PROMPTS, cfg), generate(model, tok, PROMPTS, cfg)
    assert a == b and all(len(row) == 3 for row in a)
    other = generate(model, tok, PROMPTS, dataclasses.replace(cfg, seed=8))
    assert other != a
    assert len({c.text for row in a for c in row}) > len(PROMPTS)  # temperature 1 on a random model: diverse
    nucleus = generate(model, tok, PROMPTS, dataclasses.replace(cfg, top_p=1e-6))  # keeps only the top token
    greedy = generate(model, tok, PROMPTS, dataclasses.replace(GREEDY, max_new_tokens=10))
    assert all(c.text == g[0].text for row, g in zip(nucleus, greedy) for c in row)


def test_generation_config_validation():
    with pytest.raises(ValueError, match="identical"):
        GenerationConfig(samples=4)
    with pytest.raises(ValueError):
        GenerationConfig(top_p=0.0, temperature=1.0)
    with pytest.raises(ValueError, match="EvalConfig.scorer must be one of 'strict', 'flexible', 'numeric'"):
        EvalConfig(scorer="lenient")
    with pytest.raises(ValueError, match="prompt_style must be one of 'auto', 'chat', 'plain'.*did you mean 'chat'"):
        EvalConfig(prompt_style="chats")
    with pytest.raises(ValueError, match="EvalConfig.phase must be one of 'rollout', 'training'"):
        EvalConfig(phase="eval")
    members = EvalConfig(scorer=Scorer.NUMERIC, prompt_style=PromptStyle.PLAIN, phase=Phase.TRAINING)
    assert members == EvalConfig(scorer="numeric", prompt_style="plain", phase="training")  # stored as values
    with pytest.raises(ValueError, match="did you mean 'scorer'"):
        EvalConfig.from_dict({"scorr": "strict"})
    cfg = EvalConfig(generation=GenerationConfig(samples=4, temperature=0.7), scorer="numeric")
    assert configio.load_yaml(EvalConfig, configio.dump_yaml(cfg)) == cfg  # YAML is the serialized dataclass


def test_build_prompt_chat_and_plain():
    plain_tok = tiny_tokenizer()
    assert build_prompt(plain_tok, "Q ?") == f"Q ? {VERL_GSM8K_INSTRUCTION}"
    chat_tok = tiny_tokenizer(chat_template="{% for m in messages %}<bos> {{ m['content'] }} ={% endfor %}")
    assert build_prompt(chat_tok, "Q ?") == f"<bos> Q ? {VERL_GSM8K_INSTRUCTION} ="
    assert build_prompt(chat_tok, "Q ?", style=PromptStyle.PLAIN) == f"Q ? {VERL_GSM8K_INSTRUCTION}"
    assert build_prompt(plain_tok, "Q ?", suffix="") == "Q ?"


def test_run_eval_records_and_metrics(model, tok):
    problems = [Problem(q, "#### 3", "3", "openai/gsm8k", f"p{i}") for i, q in enumerate(PROMPTS)]
    cfg = EvalConfig(generation=dataclasses.replace(GREEDY, batch_size=2))
    model.train()
    result = run_eval(model, tok, problems, cfg, progress=False)
    assert model.training, "run_eval must restore the caller's train/eval mode"
    assert result.quantization is None
    assert [s.id for s in result.samples] == [p.id for p in problems]
    expected = generate(model, tok, [s.prompt for s in result.samples], GREEDY)
    assert [s.completion for s in result.samples] == [row[0].text for row in expected]
    acc = sum(s.correct_strict for s in result.samples) / len(problems)
    assert result.metrics["verl"]["val-core/openai/gsm8k/acc/mean@1"] == acc
    block = result.metrics["by_source"]["openai/gsm8k"]
    assert block["strict"]["mean@1"]["value"] == acc and block["n_problems"] == 5


def test_run_eval_under_injection_records_telemetry(model, tok):
    from quarl.inject import InjectionSpec

    problems = [Problem(q, "#### 3", "3", "openai/gsm8k", f"p{i}") for i, q in enumerate(PROMPTS[:3])]
    cfg = EvalConfig(generation=dataclasses.replace(GREEDY, batch_size=2))
    clean = run_eval(model, tok, problems, cfg, progress=False)
    forwards = []
    handle = model.register_forward_hook(lambda *a: forwards.append(1))
    quant = run_eval(model, tok, problems, cfg, spec=InjectionSpec(scheme="W4A4", apply_during="rollout"),
                     progress=False)
    handle.remove()
    q = quant.quantization
    assert q["phase"] == "rollout" and q["spec"]["error_type"] == "mxfp4" and q["spec"]["injection_point"] == "both"
    assert q["modules_injected"] == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down); lm_head excluded
    assert q["hook_fires"] == q["modules_injected"] * len(forwards)  # every module fired on every model forward
    assert set(q["roles"]) == {"weight", "input"} and 5 < q["roles"]["weight"]["sqnr_db_mean"] < 40
    assert run_eval(model, tok, problems, cfg, progress=False).samples == clean.samples  # detached: bit-identical


def test_run_eval_fails_when_claimed_spec_never_fires(model, tok):
    from quarl.inject import InjectionSpec

    problems = [Problem(PROMPTS[0], "#### 3", "3", "openai/gsm8k", "p0")]
    spec = InjectionSpec(scheme="W4A4", apply_during="training")  # gated off in the rollout phase
    with pytest.raises(RuntimeError, match="never fired"):
        run_eval(model, tok, problems, EvalConfig(generation=GREEDY), spec=spec, progress=False)
    assert not model._forward_pre_hooks and not model.model.layers[0].self_attn.q_proj._forward_pre_hooks


@pytest.mark.gpu
def test_batched_equals_unbatched_greedy_cuda(tok):
    m = tiny_model(len(tok)).to("cuda")
    m.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("s")]
    batched = generate(m, tok, PROMPTS, GREEDY)
    single = [generate(m, tok, [p], dataclasses.replace(GREEDY, batch_size=1))[0] for p in PROMPTS]
    assert _ids(tok, batched) == _ids(tok, single)
