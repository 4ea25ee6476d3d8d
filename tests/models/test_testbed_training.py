"""Testbed building blocks on a miniature config: tokenizer, batching, LR schedule, deterministic training.

Run: python -m pytest tests/models/test_testbed_training.py -q
"""

import dataclasses
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from quarl.data.synthetic import Split, SyntheticConfig, generate
from quarl.eval.harness import build_prompt
from quarl.models.build import compare_checkpoints, save_checkpoint
from quarl.models.testbed import (
    ModelShape, TestbedConfig, TrainConfig, build_tokenizer, collate, encode_examples, format_prompt, lr_at, pretrain,
)

# Small enough to train in ~1 s; inner dims stay multiples of 32 like the real testbed.
MINI = TestbedConfig(model=ModelShape(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2),
                     train=TrainConfig(steps=6, schedule_steps=6, batch_size=4, warmup_steps=2,
                                       tokenizer_corpus=24))

GSM8K_STYLE = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 72",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How much did she earn?",
    "  Two  spaces,\ttabs and 1,234.50 dollars -- (yes!) #### -7",
]


@pytest.fixture(scope="module")
def corpus():
    problems = generate(SyntheticConfig(), 40, Split.TRAIN, seed=0)
    return [format_prompt(p.question) + "\n" + p.answer for p in problems]


def test_tokenizer_round_trips_any_ascii_text_through_autotokenizer(corpus, tmp_path):
    tok = build_tokenizer(corpus, vocab_size=200)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for s in GSM8K_STYLE + corpus[:5]:
        ids = loaded(s, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == s
        assert ids == tok(s, add_special_tokens=False)["input_ids"]
    digits = loaded.tokenize(" 1234")
    assert digits[-4:] == ["1", "2", "3", "4"]  # numbers are spelt digit by digit


def test_tokenizer_is_deterministic(corpus):
    a, b = build_tokenizer(corpus, 200), build_tokenizer(corpus, 200)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_collate_masks_prompt_and_padding(corpus):
    tok = build_tokenizer(corpus, 200)
    problems = generate(SyntheticConfig(), 3, Split.TRAIN, seed=0)
    examples = encode_examples(tok, problems)
    ids, labels = collate(examples, tok.pad_token_id)
    for b, (seq, n_prompt) in enumerate(examples):
        assert ids[b, : len(seq)].tolist() == seq
        assert (labels[b, :n_prompt] == -100).all() and (labels[b, len(seq):] == -100).all()
        assert labels[b, n_prompt : len(seq)].tolist() == seq[n_prompt:]
        assert seq[-1] == tok.eos_token_id
        # the prompt the model is trained on is exactly what the eval harness renders
        assert tok.decode(seq[:n_prompt]) == build_prompt(tok, problems[b].question)


def test_lr_schedule_endpoints():
    cfg = TrainConfig(steps=30, schedule_steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_at(110, cfg) == pytest.approx(1e-4)
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # stays at the floor past the horizon


def test_pretrain_is_bit_reproducible_and_learns(tmp_path):
    model_a, tok_a, losses_a, _ = pretrain(MINI)
    model_b, tok_b, losses_b, _ = pretrain(MINI)
    assert isinstance(model_a, LlamaForCausalLM)
    assert losses_a == losses_b
    assert losses_a[-1] < losses_a[0]
    for (name, pa), pb in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(pa, pb), name
    save_checkpoint(model_a, tok_a, tmp_path / "a")
    save_checkpoint(model_b, tok_b, tmp_path / "b")
    assert compare_checkpoints(tmp_path / "a", tmp_path / "b") == []
    torch.nn.init.zeros_(model_b.model.norm.weight)
    save_checkpoint(model_b, tok_b, tmp_path / "b")
    assert compare_checkpoints(tmp_path / "a", tmp_path / "b") == ["tensor model.norm.weight differs (max abs diff "
                                                                   f"{model_a.model.norm.weight.abs().max().item()})"]


def test_pretrain_restores_global_torch_state():
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    pretrain(TestbedConfig(model=MINI.model, train=TrainConfig(steps=1, batch_size=2, warmup_steps=1,
                                                               tokenizer_corpus=4, threads=2)))
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, det)


def test_stopping_early_is_a_prefix_of_a_longer_run():
    long = dataclasses.replace(MINI, train=dataclasses.replace(MINI.train, steps=6))
    short = dataclasses.replace(MINI, train=dataclasses.replace(MINI.train, steps=4))
    assert pretrain(short)[2] == pretrain(long)[2][:4]


def test_cli_build_from_config_yaml(tmp_path, capsys):
    """`quarl testbed build --config` trains exactly the YAML's TestbedConfig and records it as build_config.yaml."""
    from quarl import configio
    from quarl.cli import main

    cfg = dataclasses.replace(MINI, eval_problems=2)
    configio.dump_yaml(cfg, tmp_path / "mini.yaml")
    assert main(["testbed", "build", "--config", str(tmp_path / "mini.yaml"), "--out", str(tmp_path / "out")]) == 0
    assert configio.load_yaml(TestbedConfig, tmp_path / "out" / "build_config.yaml") == cfg
    model = LlamaForCausalLM.from_pretrained(tmp_path / "out")
    reference = pretrain(cfg)[0]
    for (name, pa), pb in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(pa, pb), name
    assert "# quarl testbed build report" in capsys.readouterr().out  # the CLI prints the short report
