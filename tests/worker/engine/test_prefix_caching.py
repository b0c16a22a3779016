"""Prefix caching end to end: with the cache on, greedy outputs (and logits) equal the cache-off
engine's, across shared prefixes, mixed weights (base, adapters, a full fine-tune, an adapter's v2),
preemption and constant eviction. Demo model (float32, CPU) and, for the long randomized run, a tiny
random Llama."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from adapters.synthetic import write_random_lora
from tests.worker.engine.test_engine_vs_hf import run_stepwise
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, ignore_eos=True)


def perturbed_finetune(base_dir: Path, out: Path, seed: int = 0) -> Path:
    """A full fine-tune of the base: its safetensors with the layers' matrices nudged (no transformers load)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out / name)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(base_dir / "model.safetensors")
    for name, t in tensors.items():
        if "layers." in name and t.dim() == 2:
            noise = torch.randn(t.shape, generator=g) * t.float().std() * 0.3
            tensors[name] = (t.float() + noise).to(t.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def weights(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix-weights")
    base = json.loads((demo_model_dir / "config.json").read_text())
    return {
        "a": write_random_lora(root / "a", base, rank=8, alpha=16, seed=1, std=0.1),
        "b": write_random_lora(root / "b", base, rank=16, alpha=16, seed=2, std=0.1),
        "ft": perturbed_finetune(demo_model_dir, root / "ft"),
    }


def demo_engine(model_dir, weights, caching: bool, **overrides) -> LLMEngine:
    config = dict(model=model_dir, device="cpu", dtype="float32", num_blocks=96, max_num_seqs=8,
                  max_num_batched_tokens=128, max_loras=2, max_lora_rank=16, enable_prefix_caching=caching)
    engine = LLMEngine(EngineConfig(**{**config, **overrides}))
    engine.register_adapter("a", weights["a"])
    engine.register_adapter("b", weights["b"])
    engine.register_finetune("ft", weights["ft"])
    return engine


@pytest.fixture(scope="module")
def on(demo_model_dir, weights):
    return demo_engine(demo_model_dir, weights, caching=True)


@pytest.fixture(scope="module")
def off(demo_model_dir, weights):
    return demo_engine(demo_model_dir, weights, caching=False)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 49000) for _ in range(n)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_shared_prefix_ending_mid_block_same_tokens_and_logits(on, off):
    """Requests sharing a 58-token prefix (3 full blocks + 10 tokens): later ones start after 48 cached
    tokens; tokens identical and every step's logits within 1e-4 of the uncached engine."""
    prefix = tokens(1, 58)
    prompts = [prefix + tokens(100 + i, 3 + 2 * i) for i in range(5)]
    params = SamplingParams(max_tokens=5, return_logits=True, **GREEDY)
    cached, uncached = on.generate(prompts, params), off.generate(prompts, params)
    assert [r.num_cached_tokens for r in uncached] == [0] * 5
    assert cached[0].num_cached_tokens == 0
    assert max(r.num_cached_tokens for r in cached) == 48  # admitted one per step under a 128-token budget
    for c, u in zip(cached, uncached):
        assert c.token_ids == u.token_ids
        worst = max(rel_err(x, y) for x, y in zip(c.logits, u.logits))
        assert worst < 1e-4, f"relative logit error {worst:.2e} with {c.num_cached_tokens} cached tokens"


def test_one_prompt_under_base_adapters_and_finetune_never_shares(on, off):
    prompt = tokens(2, 40)
    params = SamplingParams(max_tokens=4, **GREEDY)
    on.generate([prompt], params)  # the base's blocks are cached now
    adapters, finetunes = [None, "a", "b", None], [None, None, None, "ft"]
    first = on.generate([prompt] * 4, params, adapters=adapters, finetunes=finetunes)
    expected = [r.token_ids for r in off.generate([prompt] * 4, params, adapters=adapters, finetunes=finetunes)]
    assert [r.token_ids for r in first] == expected
    assert len({tuple(t) for t in expected}) == 4  # the four weights really answer differently
    assert [r.num_cached_tokens for r in first] == [32, 0, 0, 0]  # only the base hit
    again = on.generate([prompt] * 4, params, adapters=adapters, finetunes=finetunes)  # across a swap back and forth
    assert [r.token_ids for r in again] == expected
    assert [r.num_cached_tokens for r in again] == [32] * 4


def test_finetune_reregistered_while_resident_runs_its_new_weights(demo_model_dir, weights, tmp_path):
    """Re-registering the resident full fine-tune with other weights: the next request runs on the
    new weights (not the copy still in the model) and never hits the old weights' blocks."""
    prompt = tokens(4, 40)
    params = SamplingParams(max_tokens=4, **GREEDY)
    v2 = perturbed_finetune(demo_model_dir, tmp_path / "ft-v2", seed=7)
    engine = demo_engine(demo_model_dir, weights, caching=True)
    v1_answer = engine.generate([prompt], params, finetunes=["ft"])[0].token_ids  # "ft" is resident now
    engine.register_finetune("ft", v2)
    got = engine.generate([prompt], params, finetunes=["ft"])[0]
    fresh = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_blocks=96,
                                   enable_prefix_caching=False))
    fresh.register_finetune("ft", v2)
    want = fresh.generate([prompt], params, finetunes=["ft"])[0].token_ids
    assert got.num_cached_tokens == 0 and got.token_ids == want != v1_answer


def test_adapter_v2_under_the_same_name_never_hits_v1(on, off, weights):
    prompt = tokens(3, 40)
    params = SamplingParams(max_tokens=4, **GREEDY)
    for engine in (on, off):
        engine.register_adapter("x", weights["a"])
    v1 = on.generate([prompt, prompt], params, adapters=["x", "x"])
    assert v1[0].token_ids == v1[1].token_ids == off.generate([prompt], params, adapters=["x"])[0].token_ids
    for engine in (on, off):
        engine.register_adapter("x", weights["b"])  # new weights under the same name
    v2 = on.generate([prompt], params, adapters=["x"])[0]
    assert v2.num_cached_tokens == 0
    assert v2.token_ids == off.generate([prompt], params, adapters=["x"])[0].token_ids != v1[0].token_ids
    on.unregister_adapter("x")  # deleted: even the same files registered again start cold
    on.register_adapter("x", weights["b"])
    assert on.generate([prompt], params, adapters=["x"])[0].num_cached_tokens == 0


@pytest.mark.slow
def test_preempted_requests_resume_with_the_same_outputs(demo_model_dir, weights, off):
    prefix = tokens(4, 40)
    prompts = [prefix + tokens(200 + i, 10) for i in range(5)]
    params = SamplingParams(max_tokens=16, **GREEDY)
    expected = [r.token_ids for r in off.generate(prompts, params)]
    # 10 blocks x 16 = 160 slots for 5 sequences growing to 66 tokens (5 blocks each, the first 2 shared
    # once the prefix is cached: 17 in all): must preempt.
    tight = demo_engine(demo_model_dir, weights, caching=True, num_blocks=10)
    seqs, outputs = run_stepwise(tight, prompts, params)
    assert sum(s.num_preemptions for s in seqs) > 0, "the cache was not small enough to force preemption"
    assert outputs == expected
    assert any(s.num_cached_tokens for s in seqs)
    assert tight.blocks.num_free == 10 and sum(tight.blocks.ref_counts) == 0


# -- constant eviction, randomized, on a tiny random Llama ----------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("prefix-tiny")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(root / "base")
    base = json.loads((root / "base" / "config.json").read_text())
    adapters = {name: write_random_lora(root / name, base, rank=8, alpha=16, seed=seed, std=0.5)
                for name, seed in (("a", 1), ("b", 2))}
    return root / "base", adapters


def tiny_engine(tiny, caching: bool, num_blocks: int) -> LLMEngine:
    model_dir, adapters = tiny
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype="float32", block_size=8,
                                    num_blocks=num_blocks, max_num_seqs=8, max_num_batched_tokens=64,
                                    max_loras=2, max_lora_rank=16, enable_prefix_caching=caching))
    for name, path in adapters.items():
        engine.register_adapter(name, path)
    return engine


@pytest.mark.slow
def test_constant_eviction_randomized(tiny):
    """300 requests over 6 shared prefixes, base and two adapters, arriving while others run, ~5%
    aborted; a cache of 24 blocks of 8 tokens, so blocks are evicted and preemptions happen all the
    time. Every finished request equals the cache-off engine's answer, and the block accounting balances."""
    rng = random.Random(1234)
    prefixes = [[rng.randrange(3, 256) for _ in range(rng.randint(6, 40))] for _ in range(6)]
    requests = []
    for i in range(300):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 256) for _ in range(rng.randint(0, 12))]
        requests.append((f"q{i}", prompt, rng.randint(1, 8), rng.choice([None, None, "a", "b"])))
    engine = tiny_engine(tiny, caching=True, num_blocks=24)
    outputs, cached_seen, aborted, pending, seqs = {}, {}, set(), list(requests), []
    while pending or engine.has_unfinished():
        for _ in range(rng.randint(0, 3)):
            if pending:
                rid, prompt, n, adapter = pending.pop(0)
                engine.add_request(prompt, SamplingParams(max_tokens=n, **GREEDY), request_id=rid, adapter=adapter)
                outputs[rid] = []
                seqs.append(engine._seqs[rid])
        if outputs and rng.random() < 0.05:
            victim = rng.choice(sorted(outputs))
            if engine.abort(victim):
                aborted.add(victim)
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
            cached_seen.setdefault(out.request_id, set()).add(out.num_cached_tokens)
    blocks = engine.blocks
    assert blocks.num_evictions > 50 and blocks.num_cached > 0
    assert sum(s.num_preemptions for s in seqs) > 0 and not engine._seqs
    assert all(len(v) == 1 for v in cached_seen.values())  # one figure per request, on every output
    assert sum(next(iter(v)) for v in cached_seen.values()) > 1000
    assert sum(blocks.ref_counts) == 0 and blocks.num_free == 24
    assert len(blocks.free_blocks) + blocks.num_cached == 24 and len(blocks._index) == blocks.num_cached
    kept = [r for r in requests if r[0] not in aborted]
    assert len(aborted) > 0
    reference = tiny_engine(tiny, caching=False, num_blocks=512)
    expected = reference.generate([p for _, p, _, _ in kept], [SamplingParams(max_tokens=n, **GREEDY) for _, _, n, _ in kept],
                                  adapters=[a for *_, a in kept])
    mismatched = [rid for (rid, *_), e in zip(kept, expected) if outputs[rid] != e.token_ids]
    assert not mismatched, f"{len(mismatched)} of {len(kept)} requests differ, e.g. {mismatched[:5]}"
