"""The evaluation harness: batched KV-cache generation for HF causal LMs, scoring, metrics, result files.

What: :func:`run_eval` renders each problem as verl renders GSM8K (question + " " + verl's ``####`` instruction as
one user message, through the tokenizer's chat template when it has one, plain text otherwise), generates ``k``
completions per problem with :func:`generate`, grades each with :mod:`quarl.eval.gsm8k`, and summarizes with
:mod:`quarl.eval.results` — optionally under an ``InjectionSpec`` (phase ``rollout`` by default).

Generation (:func:`generate`) is an explicit loop rather than ``model.generate``, so that nothing but the configured
sampling rule shapes the output (``model.generate`` silently merges a checkpoint's ``generation_config.json`` —
e.g. Qwen's top_k=20, repetition_penalty=1.05 — into any unset field):

    prefill   logits = f(prompt_ids, mask)                 # (B, T) left-padded, position_ids = cumsum(mask) - 1
    decode    tok_t = greedy: argmax(logits)               # temperature == 0
                      sample: top_p(softmax(logits / temperature))   # nucleus (Holtzman et al. 2020)
              feed tok_t with the KV cache; a row is done after its first EOS; stop when all rows are done

Left padding + explicit position ids make a padded row compute the same function as that prompt alone (up to
float reduction order), which ``tests/eval/test_harness.py`` checks token-for-token against unbatched generation.

Quantization: with a spec, the model is wrapped by ``quarl.inject.attach`` for the duration of generation and the
``rollout`` phase (or ``EvalConfig.phase``) is entered; afterwards the injector's telemetry — not the config — is
recorded as the quantization applied, and if its hooks never fired the evaluation raises instead of reporting
unquantized accuracy as quantized (an evaluation that silently ran without its quantization is a known failure of
hand-rolled setups). All model perturbations enter through one context manager, :func:`_perturbations`, so a new one
(e.g. noise) is one more field of :class:`EvalConfig` handled there and call sites of :func:`run_eval` do not change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from quarl import configio
from quarl.data.gsm8k import VERL_GSM8K_INSTRUCTION
from quarl.data.records import Problem
from quarl.eval.gsm8k import Scorer
from quarl.eval.results import Sample, score_sample, summarize
from quarl.inject.spec import Phase

logger = logging.getLogger(__name__)


class PromptStyle(enum.Enum):
    """How a question becomes model input."""

    AUTO = "auto"  # CHAT when the tokenizer has a chat template, else PLAIN
    CHAT = "chat"  # apply_chat_template([{"role": "user", "content": question + " " + suffix}], add_generation_prompt)
    PLAIN = "plain"  # question + " " + suffix, tokenized with the tokenizer's special tokens (e.g. BOS)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings (verl validation defaults: greedy, one sample)."""

    max_new_tokens: int = 512  # generated tokens per completion, EOS included
    batch_size: int = 16  # problems per forward batch (each contributes `samples` rows)
    samples: int = 1  # k completions per problem (mean@k / maj@k / best@k)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept when sampling
    seed: int = 0  # sampling RNG seed

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.samples < 1:
            raise ValueError("max_new_tokens, batch_size and samples must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 with greedy decoding gives k identical completions; set temperature > 0")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What an evaluation does, apart from the model and the data."""

    generation: GenerationConfig = GenerationConfig()
    scorer: str = "strict"  # Scorer (or value) for the per-sample `correct` field; verl metrics always use strict
    format_score: float = 0.0  # verl compute_score reward for an extractable but wrong answer
    prompt_suffix: str = VERL_GSM8K_INSTRUCTION  # appended after one space ("" for none)
    prompt_style: str = "auto"  # PromptStyle (or value)
    phase: str = "rollout"  # injector phase entered while generating (a quarl.inject Phase, or value)

    def __post_init__(self) -> None:
        # The mode fields accept an enum member or its value and are stored as the value (str), so that the config
        # stays a plain serializable dataclass (configio.dump_yaml, JSON); code reads them back with Scorer(...) etc.
        for name, kind in (("scorer", Scorer), ("prompt_style", PromptStyle), ("phase", Phase)):
            object.__setattr__(self, name, _enum_value(kind, getattr(self, name), f"EvalConfig.{name}"))

    @classmethod
    def from_dict(cls, data: dict) -> EvalConfig:
        """Strict construction from a plain dict (unknown keys name the nearest valid key)."""
        return configio.from_dict(cls, data)


def _enum_value(kind: type[enum.Enum], value: Any, where: str) -> str:
    """The string value of ``value`` (a ``kind`` member or value); otherwise a ValueError listing the valid values."""
    if isinstance(value, kind):
        return value.value
    valid = [m.value for m in kind]
    if value not in valid:
        hint = configio.nearest(str(value), valid)
        raise ValueError(f"{where} must be one of {', '.join(map(repr, valid))}; got {value!r}"
                         + (f" (did you mean {hint!r}?)" if hint else ""))
    return value


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated continuation."""

    text: str  # decoded without special tokens, cut at the first EOS
    n_tokens: int  # generated tokens including the EOS
    finished: bool  # True when it ended on EOS


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Everything an evaluation produced."""

    samples: list[Sample]
    metrics: dict[str, Any]
    quantization: dict[str, Any] | None  # injector telemetry; None when run without a spec


def build_prompt(tokenizer: Any, question: str, suffix: str = VERL_GSM8K_INSTRUCTION,
                 style: PromptStyle = PromptStyle.AUTO) -> str:
    """The exact text the model is conditioned on (verl's GSM8K user message, chat-templated when possible)."""
    content = f"{question} {suffix}" if suffix else question
    if style is PromptStyle.AUTO:
        style = PromptStyle.CHAT if getattr(tokenizer, "chat_template", None) else PromptStyle.PLAIN
    if style is PromptStyle.PLAIN:
        return content
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the tokenizer and the model's generation config (Qwen lists two)."""
    ids = {tokenizer.eos_token_id}
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos])
    ids.discard(None)
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation_config defines an EOS token")
    return sorted(ids)


def _next_token(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """Greedy argmax, or temperature + top-p sampling; logits (B, V) -> token ids (B,)."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)  # (B, V)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)  # (B, V)
        drop = sorted_p.cumsum(dim=-1) - sorted_p >= cfg.top_p  # mass before this token already covers top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def _forward_kwargs(model: Any) -> tuple[str, dict[str, Any]]:
    """The KV-cache argument name (transformers 5.x ``cache``, 4.x ``past_key_values``) and ``logits_to_keep=1``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps forward(**kwargs)
    params = inspect.signature(base.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # only the last position's logits
    return ("cache" if "cache" in params else "past_key_values"), extra


@torch.no_grad()
def _generate_rows(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, cfg: GenerationConfig,
                   eos: torch.Tensor, pad_id: int, gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """KV-cache decode of left-padded rows; returns tokens (B, N) (pad after EOS) and finished flags (B,)."""
    cache_kw, extra = _forward_kwargs(model)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)
    tokens = []
    for _ in range(cfg.max_new_tokens):
        tok = _next_token(out.logits[:, -1, :], cfg, gen)  # (B,)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        finished |= torch.isin(tok, eos)
        if bool(finished.all()):
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=-1)
        position_ids = position_ids[:, -1:] + 1  # (B, 1)
        cache = out[cache_kw] if cache_kw in out else out["past_key_values"]
        out = model(input_ids=tok[:, None], attention_mask=attention_mask, position_ids=position_ids,
                    use_cache=True, **{cache_kw: cache}, **extra)
    return torch.stack(tokens, dim=1), finished  # (B, N), (B,)


def generate(model: Any, tokenizer: Any, prompts: Sequence[str], cfg: GenerationConfig,
             add_special_tokens: bool = True, gen: torch.Generator | None = None) -> list[list[Completion]]:
    """Generate ``cfg.samples`` completions for each prompt, ``cfg.batch_size`` prompts per batch.

    Args:
        model: a Hugging Face causal LM (``model(input_ids, attention_mask, position_ids, past_key_values)``).
        tokenizer: its tokenizer (needs an EOS token; the pad token defaults to EOS).
        prompts: prompt texts (already chat-templated when wanted).
        cfg: sampling settings.
        add_special_tokens: False for chat-templated text (the template already holds BOS etc.).
        gen: sampling RNG (None: a generator seeded with ``cfg.seed`` on the model's device).

    Returns:
        ``len(prompts)`` lists of ``cfg.samples`` :class:`Completion`.
    """
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    eos = torch.tensor(eos_ids, device=device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    if gen is None and cfg.temperature > 0:
        gen = torch.Generator(device=device).manual_seed(cfg.seed)
    results = []
    for start in range(0, len(prompts), cfg.batch_size):
        batch = [p for p in prompts[start:start + cfg.batch_size] for _ in range(cfg.samples)]
        enc = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in batch]
        width = max(len(e) for e in enc)
        ids = torch.tensor([[pad_id] * (width - len(e)) + e for e in enc], device=device)  # (B, T) left-padded
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)  # (B, T)
        tokens, finished = _generate_rows(model, ids, mask, cfg, eos, pad_id, gen)
        rows = [_decode(tokenizer, row.tolist(), eos_ids, bool(f)) for row, f in zip(tokens, finished)]
        results.extend(rows[i:i + cfg.samples] for i in range(0, len(rows), cfg.samples))
    return results


def _decode(tokenizer: Any, row: list[int], eos_ids: list[int], finished: bool) -> Completion:
    """Cut a generated row at its first EOS and decode it without special tokens."""
    n = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row)) if finished else len(row)
    body = row[: n - 1] if finished else row[:n]
    return Completion(tokenizer.decode(body, skip_special_tokens=True), n, finished)


@contextlib.contextmanager
def _perturbations(model: Any, spec: Any, cfg: EvalConfig) -> Iterator[dict[str, Any]]:
    """Eval mode, plus the injection spec (if any) in ``cfg.phase``; fills the yielded dict with telemetry on exit."""
    telemetry: dict[str, Any] = {}
    was_training = model.training
    model.eval()  # no dropout while evaluating; the caller's mode is restored on exit
    try:
        if spec is None:
            yield telemetry
            return
        from quarl.inject import attach  # rank 2 < eval's rank 4

        injector = attach(model, spec)
        try:
            with injector.phase(cfg.phase):
                yield telemetry
            telemetry.update(_applied(injector, cfg.phase))
        finally:
            injector.detach()
    finally:
        model.train(was_training)


def _applied(injector: Any, phase: str) -> dict[str, Any]:
    """Quantization applied, from the injector's telemetry; raises if a declared injection never fired in ``phase``."""
    injector.check_fired(phase)  # RuntimeError naming every module whose hook never fired (e.g. apply_during=training)
    stats = injector.stats()  # {fqn: {"fires": {phase: n}, "skipped": ..., "weight"/"input"/"output": {...}}}
    roles = {}
    for role in ("weight", "input", "output"):
        sqnr = [m[role]["sqnr_db"] for m in stats.values() if m.get(role)]
        if sqnr:
            roles[role] = {"modules": len(sqnr), "sqnr_db_min": min(sqnr), "sqnr_db_mean": sum(sqnr) / len(sqnr)}
    spec = injector.spec
    return {"spec": spec.to_dict() if hasattr(spec, "to_dict") else repr(spec), "phase": phase,
            "modules_injected": len(stats), "hook_fires": sum(m["fires"].get(phase, 0) for m in stats.values()),
            "roles": roles, "per_module": stats,
            # per module the format applied, "none (plan rule ...)" for those a precision plan keeps unquantized
            "formats": injector.formats() if hasattr(injector, "formats") else {}}


def run_eval(model: Any, tokenizer: Any, problems: Sequence[Problem], cfg: EvalConfig = EvalConfig(),
             spec: Any = None, progress: bool = True) -> EvalResult:
    """Evaluate ``model`` on ``problems``: prompts, generation (optionally under ``spec``), grading, metrics.

    Args:
        model: Hugging Face causal LM, already on its device and dtype.
        tokenizer: its tokenizer.
        problems: GSM8K-format problems.
        cfg: evaluation settings.
        spec: a ``quarl.inject.InjectionSpec`` to evaluate under, or None for the model as is.
        progress: show a tqdm bar (stderr) with the running strict accuracy and format rate.

    Returns:
        The scored samples, the metrics (:func:`quarl.eval.results.summarize`, plus ``timing``: wall seconds and
        generated tokens) and the quantization applied (injector telemetry; None without a spec).
    """
    style = PromptStyle(cfg.prompt_style)
    prompts = [build_prompt(tokenizer, p.question, cfg.prompt_suffix, style) for p in problems]
    chat = style is PromptStyle.CHAT or (style is PromptStyle.AUTO and getattr(tokenizer, "chat_template", None))
    samples: list[Sample] = []
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.generation.seed)
    step, t0 = cfg.generation.batch_size, time.perf_counter()
    logger.info("eval: %d problems x %d samples, %s prompts, spec=%s, phase=%s", len(problems),
                cfg.generation.samples, "chat" if chat else "plain", spec is not None, cfg.phase)
    with tqdm(total=len(problems), desc="eval", unit="problem", disable=not progress) as bar, \
            _perturbations(model, spec, cfg) as telemetry:
        for start in range(0, len(problems), step):
            outs = generate(model, tokenizer, prompts[start:start + step], cfg.generation, not chat, gen)
            for problem, prompt, comps in zip(problems[start:start + step], prompts[start:start + step], outs):
                samples.extend(score_sample(problem, j, prompt, c.text, c.n_tokens, c.finished, Scorer(cfg.scorer),
                                            cfg.format_score) for j, c in enumerate(comps))
            bar.update(len(outs))
            bar.set_postfix(acc=f"{sum(s.correct_strict for s in samples) / len(samples):.3f}",
                            fmt=f"{sum(s.extracted is not None for s in samples) / len(samples):.3f}")
    metrics = summarize(samples, seed=cfg.generation.seed)
    wall, tokens = time.perf_counter() - t0, sum(s.n_tokens for s in samples)
    metrics["timing"] = {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / max(wall, 1e-9)}
    return EvalResult(samples, metrics, telemetry or None)
