"""`quarl train` on a tiny random Qwen2-MoE: GRPO + LoRA under the amd-mi355-mxfp4 preset (MXFP4 W4A4 on the routed
experts too, FP8 KV cache) with MoE AQN.

Run: OMP_NUM_THREADS=1 python -m pytest tests/rl/test_train_moe.py -q
"""

import torch
from _tiny_moe import experts_of, routers_of, tiny_moe
from yaml import safe_load as yaml_load

from quarl.rl import load_config
from quarl.runs import read_metrics


def _moe_dir(path):
    """A tiny random Qwen2-MoE saved with the testbed tokenizer (so the synthetic task and scorer apply)."""
    from transformers import AutoTokenizer

    from quarl.models.load import testbed_dir

    tok = AutoTokenizer.from_pretrained(testbed_dir())
    model = tiny_moe("qwen2_moe", vocab_size=len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_grpo_lora_steps_on_a_tiny_moe(tmp_path, tiny):
    from quarl.rl.run import _build

    model_dir = _moe_dir(tmp_path / "moe")
    yaml = ("injection: {hardware: amd-mi355-mxfp4}\n"  # MXFP4 W4A4 (OCP scales) + FP8 KV cache
            "aqn: {schedule: constant, sigma_start: 0.01, moe_norm: post_attention_layernorm}\n")
    cfg = load_config(yaml, tiny + [f"model.name={model_dir}"])
    resolved = yaml_load(cfg.to_yaml())["injection"]  # what the run directory's config.yaml records
    assert resolved["hardware"] == "amd-mi355-mxfp4" and resolved["error_type"] == "mxfp4"
    assert resolved["injection_point"] == "both" and resolved["kv_cache"]["format"] == "fp8_e4m3"
    (tmp_path / "metrics.jsonl").touch()
    trainer, recorder, attached, model = _build(cfg, tmp_path, 0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    recorder.close()
    after = dict(model.named_parameters())
    assert all(torch.equal(base[n], after[n]) for n in base), "base weights (experts included) changed"
    assert any(not torch.equal(lora[n], after[n]) for n in lora), "LoRA adapters did not train"
    expert_lora = [n for n in lora if "mlp.experts" in n]  # PEFT all-linear wraps the 3-D expert weights too
    assert expert_lora and any(not torch.equal(lora[n], after[n]) for n in expert_lora)
    stats = attached.injector.stats()
    experts = [n for n, _ in experts_of(model)]
    assert len(experts) == 2 and set(experts) <= set(stats)
    for n in experts:  # every routed expert container quantized in both phases, inputs measured
        assert stats[n]["fires"]["rollout"] > 0 and stats[n]["fires"]["training"] > 0 and stats[n]["input"]
    kv = [n for n in stats if n.endswith("self_attn")]  # the preset's FP8 KV cache, in both phases
    assert len(kv) == 2 and all(stats[n]["fires"]["rollout"] > 0 and stats[n]["fires"]["training"] > 0 for n in kv)
    routers = {n.removesuffix(".base_layer") for n, _ in routers_of(model)}
    assert not any(n.removesuffix(".base_layer") in routers for n in stats)
    assert attached.aqn.modules == ["base_model.model.model.layers.0.post_attention_layernorm",
                                 "base_model.model.model.layers.1.post_attention_layernorm",
                                 "base_model.model.model.norm"]
    rows = [r for r in read_metrics(tmp_path) if r["step"] >= 1]
    assert [r["step"] for r in rows] == [1, 2] and all(r["aqn/modules"] == 3 for r in rows)
    attached.injector.detach()
