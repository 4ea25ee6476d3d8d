"""The embedded testbed: a ~0.7M-parameter Llama trained from scratch on quarl's synthetic GSM8K-format task.

What: a decoder-only ``LlamaForCausalLM`` (RMSNorm + SwiGLU MLP + rotary attention, exactly the module structure of
Llama/Qwen, so injection patterns, AQN on RMSNorm gains and LoRA target modules work unchanged) with a BPE tokenizer
over ASCII characters, trained by supervised next-token prediction on ``quarl.data.synthetic`` problems, then shipped
in ``quarl/assets/testbed/`` (safetensors + config + tokenizer + report) so tests and demos never retrain it.

Why this size and length of training: it must be a faithful miniature of a real LLM under 4-bit quantization.
An under-trained model is fragile, an over-trained one saturates (the issue's prototype: 88% greedy loses ~15 points
under MXFP4 W4A4, trained to 97% it loses only ~4). :data:`DEFAULT_CONFIG` is a narrow, deep model (hidden 96,
6 layers, 3 heads, ~0.69M parameters) trained 700 steps of 64 problems with a full cosine decay and no weight decay.
It lands at 73% greedy accuracy; MXFP4 W4A4 costs ~17 points (most on 1- and 2-step problems), MXFP4 W4A16 ~4,
NVFP4 W4A16 ~1 and NVFP4 W4A4 ~4 (short of the ~7 the prototype lost). The earlier wider, shallower default
(hidden 128, 4 layers, 800 of 1000 cosine steps, weight decay 0.01) reached 82% but lost only ~6 points under
MXFP4 W4A4. Which change (depth, width, full decay, no weight decay) matters most was not isolated; a plausible
reason is that more layers inject quantization error more times per token. Measured table: ``assets/testbed/report.md``.

Prompt format (what the model sees at train and eval time): verl's GSM8K prompt, i.e. the question, a space and
``Let's think step by step and output the final answer after "####".`` as one user message, rendered by the shipped
chat template (the message content followed by a newline); the completion is the chain of thought, ``#### N`` and
``<eos>``. The loss is on completion tokens only.

Tokenizer: BPE whose alphabet is every printable ASCII character and whose decoder concatenates tokens
(``decoders.Fuse``); the pre-tokenizer isolates single digits, so numbers are always spelt digit by digit.
``decode(encode(s)) == s`` holds for any printable-ASCII text (checked in tests); it is saved as ``tokenizer.json``
with ``tokenizer_class = PreTrainedTokenizerFast`` so ``AutoTokenizer`` never rebuilds it as a byte-level BPE
(the Qwen2-config trap, which silently drops spaces).

Determinism: a fixed torch thread count, ``torch.use_deterministic_algorithms(True)``, seeded init and a seeded
data stream make two builds on the same machine bit-identical. Across CPUs, float reductions may be blocked
differently (AVX2 vs AVX-512 kernels), so bit-exactness is only promised per machine (see ``tests/models``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import string
import time
from collections.abc import Callable, Iterator

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quarl.data.gsm8k import VERL_GSM8K_INSTRUCTION as PROMPT_SUFFIX
from quarl.data.records import Problem
from quarl.data.synthetic import Split, SyntheticConfig, generate
from quarl.eval.harness import build_prompt

log = logging.getLogger(__name__)

CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}\n{% endfor %}"
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")
# Words (with their leading space), '#' runs, single digits, other single characters, whitespace.
_PRETOKEN_PATTERN = r" ?[A-Za-z]+| ?#+|\d| ?[^\sA-Za-z\d#]|\s"


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Llama hyper-parameters of the testbed (all inner dims are multiples of 32, the MXFP4 block)."""

    hidden_size: int = 96
    intermediate_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 3  # head_dim 32
    num_key_value_heads: int = 3
    max_position_embeddings: int = 256
    vocab_size: int = 320  # upper bound for the BPE trainer; the real size is what it learns


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the from-scratch pre-training run."""

    steps: int = 700  # optimizer steps (~1 s each on one core: ~12 min; 17 min on the busy 2-core build machine)
    batch_size: int = 64  # problems per step
    lr: float = 3e-3  # peak AdamW learning rate
    warmup_steps: int = 50  # linear warm-up, then cosine decay to lr * min_lr_ratio at schedule_steps
    min_lr_ratio: float = 0.1
    schedule_steps: int = 700  # cosine horizon; training may stop earlier (a prefix of a longer run = a shorter run)
    weight_decay: float = 0.0  # none: like the prototype; decay would shrink the outliers 4-bit formats trip on
    seed: int = 0  # model init and data stream
    threads: int = 1  # torch intra-op threads; part of the determinism contract (1: same result on any core count)
    tokenizer_corpus: int = 5000  # problems used to learn the BPE merges


@dataclasses.dataclass(frozen=True)
class TestbedConfig:
    """Everything ``quarl testbed build`` needs to reproduce the shipped checkpoint."""

    __test__ = False  # not a pytest class despite the name

    model: ModelShape = ModelShape()
    train: TrainConfig = TrainConfig()
    data: SyntheticConfig = SyntheticConfig()
    eval_problems: int = 500  # held-out problems for the accuracy report
    eval_seed: int = 1234


DEFAULT_CONFIG = TestbedConfig()


def format_prompt(question: str) -> str:
    """verl's GSM8K user message: the question, a space, then the step-by-step suffix."""
    return f"{question} {PROMPT_SUFFIX}"


def render_prompt(tokenizer: PreTrainedTokenizerFast, question: str) -> str:
    """The exact text the model is conditioned on (chat template applied to the verl prompt)."""
    return build_prompt(tokenizer, question, PROMPT_SUFFIX)  # the eval harness's own renderer: train == eval


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Learn the BPE merges on ``corpus`` (deterministic for a given corpus) and wrap them for transformers."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(_PRETOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=list(string.printable), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False, chat_template=CHAT_TEMPLATE,
                                   model_max_length=ModelShape.max_position_embeddings)


def build_model(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama of ``shape`` sized to ``tokenizer`` (seeded)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu", attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def encode_examples(tokenizer: PreTrainedTokenizerFast, problems: list[Problem]) -> list[tuple[list[int], int]]:
    """Token ids of prompt + completion + eos, and the prompt length (loss starts after it)."""
    out = []
    for p in problems:
        prompt = tokenizer(render_prompt(tokenizer, p.question), add_special_tokens=False)["input_ids"]
        completion = tokenizer(p.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((prompt + completion, len(prompt)))
    return out


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad a batch: input ids (B, T) and labels (B, T) with -100 on prompt and padding."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), T), -100, dtype=torch.long)  # (B, T)
    for b, (ids, n_prompt) in enumerate(examples):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        labels[b, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, labels


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``lr * min_lr_ratio`` at ``schedule_steps``.

    The schedule does not depend on ``steps`` (where training stops), so stopping a run at step n gives exactly the
    checkpoint a run configured with ``steps=n`` gives.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.schedule_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fix the thread count and use deterministic kernels inside the block; restores both on exit."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def train(model: LlamaForCausalLM, examples: list[tuple[list[int], int]], cfg: TrainConfig, pad_id: int,
          on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Supervised pre-training; ``examples`` are consumed in order, ``batch_size`` per step.

    Args:
        model: the model to train in place (fp32).
        examples: at least ``steps * batch_size`` encoded examples (see :func:`encode_examples`).
        cfg: optimisation settings.
        pad_id: padding token id.
        on_step: called with (step, loss) after every step (progress bars live in the CLI).

    Returns:
        The per-step training loss.
    """
    if len(examples) < cfg.steps * cfg.batch_size:
        raise ValueError(f"need {cfg.steps * cfg.batch_size} examples, got {len(examples)}")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        input_ids, labels = collate(examples[step * cfg.batch_size : (step + 1) * cfg.batch_size], pad_id)
        loss = model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    model.eval()
    return losses


def pretrain(cfg: TestbedConfig, on_step: Callable[[int, float], None] | None = None
             ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, list[float], float]:
    """Build tokenizer and model from ``cfg`` and train them; returns (model, tokenizer, losses, seconds)."""
    t0 = time.perf_counter()
    n_train = cfg.train.steps * cfg.train.batch_size
    # one seeded stream: the tokenizer learns on its first tokenizer_corpus problems, training consumes the first
    # n_train, so the tokenizer does not depend on how long training runs
    problems = generate(cfg.data, max(n_train, cfg.train.tokenizer_corpus), Split.TRAIN, seed=cfg.train.seed)
    corpus = [format_prompt(p.question) + "\n" + p.answer for p in problems[: cfg.train.tokenizer_corpus]]
    problems = problems[:n_train]
    tokenizer = build_tokenizer(corpus, cfg.model.vocab_size)
    with deterministic(cfg.train.threads):
        model = build_model(cfg.model, tokenizer, cfg.train.seed)
        log.info("testbed: %d parameters, vocab %d, %d training problems", model.num_parameters(), len(tokenizer),
                 n_train)
        losses = train(model, encode_examples(tokenizer, problems), cfg.train, tokenizer.pad_token_id, on_step)
    return model, tokenizer, losses, time.perf_counter() - t0


def held_out(cfg: TestbedConfig, n: int | None = None) -> list[Problem]:
    """The held-out evaluation problems (test split: disjoint from training by construction)."""
    return generate(cfg.data, n or cfg.eval_problems, Split.TEST, seed=cfg.eval_seed)
