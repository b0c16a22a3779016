"""Test data made with the real libraries: PEFT adapters of the demo model."""

from __future__ import annotations

from pathlib import Path


def make_peft_adapter(base_dir: Path, out_dir: Path, seed: int, **lora_kwargs) -> Path:
    """A LoRA adapter saved by PEFT itself, with small random B (PEFT's default B is zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():  # a noticeable but sane effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.save_pretrained(out_dir)
    return Path(out_dir)
