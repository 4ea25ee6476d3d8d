"""The testbed checkpoint shipped in the package: loads offline, has Llama's structure, round-trips text, answers.

Run: python -m pytest tests/models/test_shipped_testbed.py -q
"""

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from quarl import configio
from quarl.models.build import evaluate
from quarl.models import load as load_mod
from quarl.models.load import load_model
from quarl.models.testbed import DEFAULT_CONFIG, TestbedConfig, held_out

GSM8K_STYLE = (
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for her friends "
    "every day with four. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. How much in "
    "dollars does she make every day at the farmers' market?",
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day at the "
    "farmer's market.\n#### 18",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
    "Mia has 12 apples. Mia buys 7 more apples. How many apples does Mia have now?",
)


@pytest.fixture(scope="module")
def shipped():
    return load_model("testbed:tiny")


def test_shipped_files_and_config_match_the_build_defaults():
    d = load_mod.testbed_dir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "build_config.yaml", "build_report.md", "loss_curve.png", "report.md"):
        assert (d / name).is_file(), name
    # the checkpoint was built from exactly the config `quarl testbed build` uses now
    assert configio.load_yaml(TestbedConfig, d / "build_config.yaml") == DEFAULT_CONFIG
    assert sum(f.stat().st_size for f in d.iterdir()) < 8 * 2**20  # a few MB


def test_llama_structure_and_size(shipped):
    model, _ = shipped
    assert isinstance(model, LlamaForCausalLM)
    assert 0.5e6 <= model.num_parameters() <= 5e6
    names = {n for n, _ in model.named_modules()}
    for part in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert f"model.layers.0.{part}" in names, part
    assert type(model.model.layers[0].input_layernorm).__name__ == "LlamaRMSNorm"
    assert model.dtype == torch.float32


def test_tokenizer_round_trip_and_special_tokens(shipped):
    _, tok = shipped
    assert isinstance(tok, PreTrainedTokenizerFast)
    for s in GSM8K_STYLE:
        assert tok.decode(tok(s)["input_ids"]) == s
    assert tok.eos_token == "<eos>" and tok.pad_token == "<pad>" and tok.eos_token_id != tok.pad_token_id
    rendered = tok.apply_chat_template([{"role": "user", "content": "Q?"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "Q?\n"


def _tokens(tok, text):
    return len(tok(text, add_special_tokens=False)["input_ids"]) + 1  # + EOS


def test_greedy_answers_on_held_out_problems(shipped):
    """Fast: 12 held-out 1-2-step problems in one batch, completions capped just above the longest reference."""
    model, tok = shipped
    problems = [p for p in held_out(DEFAULT_CONFIG, 40) if p.meta["num_steps"] <= 2][:12]
    assert len(problems) == 12
    cap = max(_tokens(tok, p.answer) for p in problems) + 8  # room for a slightly longer wrong chain
    row = evaluate(model, tok, problems, batch_size=len(problems), max_new_tokens=cap)
    assert row.formatted == row.n  # every completion ends in '#### N' within the cap
    # report.md: 97% on 1-step and 71% on 2-step problems (~84% on this mix, 10/12 here); binomial(12, 0.84) falls
    # below 7 with probability < 1%
    assert row.correct >= 7, row


@pytest.mark.slow
def test_greedy_accuracy_on_200_held_out_problems(shipped):
    """Slow: 200 held-out problems of every length at the report's generation length."""
    model, tok = shipped
    row = evaluate(model, tok, held_out(DEFAULT_CONFIG, 200), batch_size=50)
    assert row.formatted >= 0.98 * row.n
    # report.md: 73.4% on 500; binomial(200, 0.734) falls below 0.62 with probability < 1e-3
    assert row.accuracy >= 0.62, row
