"""Real PEFT adapters and a real full fine-tune of the demo model, made once per session."""

from __future__ import annotations

import pytest
import torch

from tests.factories import make_peft_adapter as make_adapter

# name -> LoraConfig kwargs: ranks 8/16/32, different alphas, rsLoRA on one, attention-only and attention+MLP.
ADAPTERS = {
    "qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "attn-r16": dict(r=16, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "all-r32-rslora": dict(r=32, lora_alpha=64, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "mlp-o-r16": dict(r=16, lora_alpha=32, target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="session")
def peft_adapters(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(demo_model_dir, root / name, seed=i, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="session")
def full_finetune_dir(demo_model_dir, tmp_path_factory):
    """The demo model with perturbed weights, saved as an HF dir (bf16, like the base)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(123)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layers." in name and p.dim() == 2:
                p.add_(torch.randn_like(p) * p.std() * 0.3)
    out = tmp_path_factory.mktemp("finetune") / "perturbed"
    model.to(torch.bfloat16).save_pretrained(out)
    return out
