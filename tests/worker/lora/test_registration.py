"""Adapter registration rules of the engine, on a tiny random Llama (fast)."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.synthetic import write_random_lora
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.sampling_params import SamplingParams

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)


@pytest.fixture
def tiny(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(tmp_path / "base")
    base = json.loads((tmp_path / "base" / "config.json").read_text())
    a = write_random_lora(tmp_path / "a", base, rank=8, alpha=16, seed=1, std=0.5)
    b = write_random_lora(tmp_path / "b", base, rank=16, alpha=16, seed=2, std=0.5)
    engine = LLMEngine(EngineConfig(model=tmp_path / "base", device="cpu", dtype="float32", num_blocks=32,
                                    max_loras=2, max_lora_rank=16))
    return engine, a, b


PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def test_unregistered_adapter_refuses_new_requests_but_queued_ones_finish(tiny):
    engine, a, _ = tiny
    engine.register_adapter("a@1", a)
    expected = engine.generate([[5, 6, 7]], PARAMS, adapters=["a@1"])[0].token_ids
    rid = engine.add_request([5, 6, 7], PARAMS, adapter="a@1")
    engine.unregister_adapter("a@1")
    with pytest.raises(ValueError, match="no LoRA adapter named 'a@1'"):
        engine.add_request([5, 6, 7], PARAMS, adapter="a@1")
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() if out.request_id == rid for t in out.new_token_ids]
    assert tokens == expected
    assert "a@1" not in engine.adapters


def test_new_weights_under_a_busy_name_are_refused(tiny):
    engine, a, b = tiny
    engine.register_adapter("x", a)
    engine.add_request([5, 6, 7], PARAMS, adapter="x")
    engine.step()  # now running: holds a slot
    with pytest.raises(ValueError, match="in use"):
        engine.register_adapter("x", b)
    while engine.has_unfinished():
        engine.step()
    engine.register_adapter("x", b)  # idle: replacing is fine, and takes effect
    fresh = LLMEngine(EngineConfig(model=engine.config.model, device="cpu", dtype="float32", num_blocks=32,
                                   max_loras=2, max_lora_rank=16))
    fresh.register_adapter("x", b)
    fresh.register_adapter("old", a)
    old = fresh.generate([[9, 8, 7]], PARAMS, adapters=["old"])[0].token_ids
    assert old != fresh.generate([[9, 8, 7]], PARAMS, adapters=["x"])[0].token_ids  # the check can tell them apart
    assert engine.generate([[9, 8, 7]], PARAMS, adapters=["x"])[0].token_ids == \
        fresh.generate([[9, 8, 7]], PARAMS, adapters=["x"])[0].token_ids


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=[999]), r"token ids must be in \[0, 256\)"),
    (dict(prompt=[1] * 10, params=SamplingParams(max_tokens=600)), "exceeds the maximum context length"),
    (dict(prompt=[1], params=SamplingParams(stop=["x"])), "stop strings need a tokenizer"),
    (dict(prompt=[1], adapter="nope"), "no LoRA adapter named 'nope'"),
    (dict(prompt=[1], finetune="nope"), "no full fine-tune named 'nope'"),
])
def test_bad_requests_are_refused_and_leave_nothing_behind(tiny, kwargs, message):
    engine = tiny[0]
    with pytest.raises(ValueError, match=message):
        engine.add_request(request_id="r", **kwargs)
    assert not engine.has_unfinished()
    engine.add_request([1, 2], PARAMS, request_id="r")  # the id was not taken by the failed call
    with pytest.raises(ValueError, match="already in the engine"):
        engine.add_request([1, 2], PARAMS, request_id="r")
