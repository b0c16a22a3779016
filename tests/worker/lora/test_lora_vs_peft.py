"""Mixed-adapter batches against transformers + PEFT running each adapter alone (demo model, fp32)."""

from __future__ import annotations

import pytest
import torch

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "Water boils at",
           "My favourite colour is", "The best way to learn is"]
N_TOKENS = 16


def rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def reference(model, ids: list[int]):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=N_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), [l[0] for l in out.logits]


@pytest.fixture(scope="module")
def lora_engine(demo_model_dir, peft_adapters):
    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", max_loras=4,
                                    max_lora_rank=32, max_num_seqs=32, kv_cache_gb=0.5))
    for name, path in peft_adapters.items():
        engine.register_adapter(name, path)
    return engine


def test_mixed_batch_matches_peft_per_adapter(lora_engine, demo_model_dir, peft_adapters, hf_demo_model,
                                              demo_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = [None, *peft_adapters]  # base + 4 adapters, every prompt under each: one mixed batch
    jobs = [(demo_tokenizer.encode(p), name) for p in PROMPTS for name in names]
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True, return_logits=True)
    results = lora_engine.generate([ids for ids, _ in jobs], params, adapters=[n for _, n in jobs])
    assert lora_engine.lora_slots.num_loads == len(peft_adapters)  # each loaded once, then resident

    worst = 0.0
    for name in names:
        if name is None:
            model = hf_demo_model
        else:
            base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, peft_adapters[name]).eval()
        for (ids, job_name), res in zip(jobs, results):
            if job_name != name:
                continue
            tokens, logits = reference(model, ids)
            assert res.token_ids == tokens, f"adapter {name}: {demo_tokenizer.decode(ids)!r} diverged"
            for ours, theirs in zip(res.logits, logits):
                worst = max(worst, rel_err(ours, theirs))
    assert worst < 1e-4, f"worst relative logit error {worst:.2e}"


def test_adapters_change_outputs_and_base_steps_skip_lora(lora_engine, demo_tokenizer):
    ids = demo_tokenizer.encode("Tell me a story about a dragon")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    base = lora_engine.generate([ids], params)[0].token_ids
    assert not lora_engine.runner.lora.active  # a base-only step installs no LoRA hooks at all
    assert lora_engine.model.layers[0].self_attn.qkv_proj.lora is None
    tuned = lora_engine.generate([ids], params, adapters=["all-r32-rslora"])[0].token_ids
    assert tuned != base


def test_more_adapters_than_slots_evict_lru_and_stay_correct(demo_model_dir, peft_adapters, demo_tokenizer):
    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", max_loras=2,
                                    max_lora_rank=32, max_cpu_loras=2, num_blocks=128))
    big = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", max_loras=4,
                                 max_lora_rank=32, num_blocks=128))
    for name, path in peft_adapters.items():
        engine.register_adapter(name, path)
        big.register_adapter(name, path)
    ids = demo_tokenizer.encode("The weather today is")
    names = list(peft_adapters) * 2
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    small = engine.generate([ids] * len(names), params, adapters=names)
    expected = big.generate([ids] * len(names), params, adapters=names)
    assert [r.token_ids for r in small] == [r.token_ids for r in expected]
    assert engine.lora_slots.num_loads == len(peft_adapters)  # a waiting adapter reuses a slot once it frees
    # The first adapter was evicted (LRU) from both tiers by the last two: it comes back from disk.
    again = engine.generate([ids], params, adapters=[names[0]])[0]
    assert again.token_ids == expected[0].token_ids
    assert engine.lora_slots.num_loads == len(peft_adapters) + 1


def test_full_finetune_swaps_in_and_back(demo_model_dir, full_finetune_dir, demo_tokenizer, hf_demo_model):
    from transformers import AutoModelForCausalLM

    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_blocks=256))
    engine.register_finetune("perturbed", full_finetune_dir)
    ft_hf = AutoModelForCausalLM.from_pretrained(full_finetune_dir, dtype=torch.float32).eval()
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS[:3]]
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0.0, ignore_eos=True)
    # base, fine-tune and base requests queued together: requests of the resident weights run together
    # (the later base ones join the first), then the engine drains and swaps once.
    results = engine.generate(prompts * 3, params, finetunes=[None] * 3 + ["perturbed"] * 3 + [None] * 3)
    for i, res in enumerate(results):
        model = ft_hf if 3 <= i < 6 else hf_demo_model
        assert res.token_ids == reference(model, prompts[i % 3])[0]
    assert engine._swapper.num_swaps == 1 and engine._swapper.current == "perturbed"
    # Swapping back restores the base's outputs exactly.
    back = engine.generate(prompts, params)
    assert [r.token_ids for r in back] == [r.token_ids for r in results[:3]]
    assert engine._swapper.num_swaps == 2 and engine._swapper.current is None


def test_a_finetune_of_another_architecture_is_refused(demo_model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256)).save_pretrained(tmp_path)
    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_blocks=16))
    with pytest.raises(ValueError, match="only same-architecture fine-tunes"):
        engine.register_finetune("tiny", tmp_path)
