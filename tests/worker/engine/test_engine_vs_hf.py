"""The engine against transformers on the real demo model (float32, CPU): logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three uses of a paperclip:\n1.",
    "Water boils at",
    "The quick brown fox",
    "In machine learning, overfitting means",
    "Translate to French: Good morning, how are you?",
    "Write a haiku about autumn leaves.",
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    return LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", max_num_seqs=32,
                                  max_num_batched_tokens=1024, kv_cache_gb=0.5))


def hf_greedy(hf_model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' generate, greedy, EOS ignored; returns tokens and each step's logits."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=n, do_sample=False, output_logits=True, eos_token_id=None,
                                return_dict_in_generate=True, pad_token_id=0)
    assert out.sequences.shape[1] == len(ids) + n  # EOS ignored on both sides, without masking its logit
    return out.sequences[0, len(ids):].tolist(), [l[0] for l in out.logits]


def test_greedy_tokens_and_logits_match_transformers(engine, hf_demo_model, demo_tokenizer):
    """8+ prompts x 32 tokens: identical tokens, and logits within 1e-4 at prefill and every decode step."""
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, return_logits=True)
    results = engine.generate(prompts, params)  # all prompts in one continuous batch
    worst = 0.0
    for ids, res in zip(prompts, results):
        hf_tokens, hf_logits = hf_greedy(hf_demo_model, ids, 32)
        assert res.token_ids == hf_tokens, f"prompt {demo_tokenizer.decode(ids)!r} diverged"
        assert len(res.logits) == 32
        for step, (ours, theirs) in enumerate(zip(res.logits, hf_logits)):
            err = rel_err(ours, theirs)
            worst = max(worst, err)
            assert err < 1e-4, f"step {step}: relative logit error {err:.2e}"
    print(f"worst relative logit error: {worst:.2e}")


def test_prefill_logits_at_every_position(engine, hf_demo_model, demo_tokenizer):
    """Every prompt position (not only the last), through chunked prefill of a long prompt."""
    ids = demo_tokenizer.encode(" ".join(PROMPTS) * 3)
    small = LLMEngine(EngineConfig(model=engine.config.model, device="cpu", dtype="float32",
                                   max_num_seqs=4, max_num_batched_tokens=64, num_blocks=64))
    from worker.engine.batcher import ScheduledChunk, StepPlan
    from worker.engine.sequence import Sequence

    seq = Sequence("p", ids, SamplingParams(max_tokens=1), 0)
    hidden_chunks = []
    for start in range(0, len(ids), 64):  # 64-token chunks: later chunks read the earlier ones from the cache
        n = min(64, len(ids) - start)
        small.blocks.allocate(seq.block_table, start + n)
        plan = StepPlan(prefills=[ScheduledChunk(seq, n)]) if n > 1 else StepPlan(decodes=[ScheduledChunk(seq, n)])
        hidden_chunks.append(_all_position_logits(small, plan))
        seq.num_computed_tokens += n
    ours = torch.cat(hidden_chunks)
    with torch.no_grad():
        theirs = hf_demo_model(torch.tensor([ids])).logits[0]
    assert ours.shape == theirs.shape
    assert rel_err(ours, theirs) < 1e-4


def _all_position_logits(engine: LLMEngine, plan) -> torch.Tensor:
    # Run the step's model forward and project every token, not only the sampled ones.
    runner = engine.runner
    captured = {}
    handle = runner.model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o))
    try:
        runner.run(plan, engine.blocks)
    finally:
        handle.remove()
    return runner.model.compute_logits(captured["h"])


def test_output_is_batch_invariant(engine, demo_tokenizer):
    """A request's greedy output is the same alone as among 16 others of different lengths."""
    target = demo_tokenizer.encode("The three most important inventions in history are")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = engine.generate([target], params)[0].token_ids
    others = [demo_tokenizer.encode((PROMPTS[i % len(PROMPTS)] + " ") * (1 + i % 5)) for i in range(16)]
    mixed_params = [SamplingParams(max_tokens=8 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(16)]
    results = engine.generate(others[:7] + [target] + others[7:], mixed_params[:7] + [params] + mixed_params[7:])
    assert results[7].token_ids == alone


def test_preemption_under_a_small_cache_keeps_outputs(engine, demo_model_dir, demo_tokenizer):
    prompts = [demo_tokenizer.encode((p + " ") * 2) for p in PROMPTS]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    expected = [r.token_ids for r in engine.generate(prompts, params)]
    # 24 blocks x 16 = 384 token slots for 9 sequences of ~30-60 tokens growing by 40: must preempt.
    tight = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_blocks=24,
                                   max_num_seqs=16, max_num_batched_tokens=256))
    seqs, outputs = run_stepwise(tight, prompts, params)
    assert sum(s.num_preemptions for s in seqs) > 0, "the cache was not small enough to force preemption"
    assert outputs == expected
    assert tight.blocks.num_free == 24  # every block came back


def run_stepwise(engine: LLMEngine, prompts, params) -> tuple[list, list[list[int]]]:
    """Add every prompt, step until all finish; the sequences (for their counters) and each one's tokens."""
    ids = [engine.add_request(p, params) for p in prompts]
    seqs = [engine._seqs[i] for i in ids]
    outputs = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id] += out.new_token_ids
    return seqs, [outputs[i] for i in ids]
