"""LoRA on a pre-quantized base (the QeRL setup): adapters train, the packed base never changes.

Run: pytest tests/checkpoint/test_lora.py
"""

import pytest
import torch

from quarl.checkpoint import CompressedLinear, load_checkpoint, lora_custom_modules, lora_targets

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("name", ["NVFP4A16", "NVFP4"])
def test_lora_trains_on_top_of_the_frozen_packed_base(name, tiny_export):
    model, _, _ = load_checkpoint(tiny_export(name))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert lora_targets(model) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    cfg._register_custom_module(lora_custom_modules())
    model = peft.get_peft_model(model, cfg)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    opt = torch.optim.SGD([p for _, p in trainable], lr=0.1)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # step 1 moves lora_B off zero, step 2 gives lora_A a gradient too
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)  # STE through q_in for NVFP4
    base = model.get_base_model()
    assert sum(isinstance(m, CompressedLinear) for m in base.modules()) == 14
    after = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before if before[k].dtype != torch.float8_e4m3fn)
    assert all(torch.equal(after[k].view(torch.uint8), before[k].view(torch.uint8)) for k in before
               if before[k].dtype == torch.float8_e4m3fn)


def test_aqn_noises_the_dense_norms_of_a_packed_base(tiny_export):
    """AQN (RMSNorm gains, QeRL's default) works on a checkpoint unchanged: noise on, then a bit-exact restore."""
    from quarl.noise import AQN, AQNConfig

    model, _, _ = load_checkpoint(tiny_export("NVFP4A16"))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        clean = model(ids).logits
        aqn = AQN(model, AQNConfig(schedule="constant", sigma_start=0.05), total_steps=4)
        with aqn.noised(0):
            noisy = model(ids).logits
        after = model(ids).logits
    assert len(aqn.modules) == 5  # 2 blocks x 2 norms + the final norm
    assert not torch.equal(noisy, clean) and torch.equal(after, clean)
