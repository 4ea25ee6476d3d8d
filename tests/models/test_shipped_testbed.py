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


def test_greedy_answers_on_held_out_problems(shipped):
    model, tok = shipped
    problems = held_out(DEFAULT_CONFIG, 24)
    row = evaluate(model, tok, problems, batch_size=24)
    assert row.formatted == row.n  # every completion ends in '#### N'
    # the shipped model scores ~80% on 500 held-out problems; 24 problems at p=0.8 fall below 12 with prob < 1e-4
    assert row.correct >= 12, row
