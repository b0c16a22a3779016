"""Log-probabilities through the engine against transformers (and PEFT for adapters) on the real demo
model, float32 on the CPU: generated tokens' logprobs and top-k, prompt logprobs (chunked prefill,
prefix caching, preemption), and rows that ask for nothing being unaffected by rows that do."""

from __future__ import annotations

import pytest
import torch

from tests.factories import make_peft_adapter
from tests.worker.engine.test_engine_vs_hf import PROMPTS, hf_greedy
from tests.worker.engine.test_penalties import reference as penalized
from worker.engine.batcher import StepPlan
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine
from worker.engine.sampling_params import SamplingParams

TOL = 1e-4
GREEDY = dict(temperature=0.0, ignore_eos=True)
ADAPTERS = {"qv-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
            "all-r16": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"])}


@pytest.fixture(scope="module")
def adapter_dirs(demo_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("logprob-adapters")
    return {name: make_peft_adapter(demo_model_dir, root / name, seed=10 + i, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module")
def engine(demo_model_dir, adapter_dirs):
    """Prefix caching on (the default) and a 128-token step budget, so long prompts are chunked."""
    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", max_loras=2,
                                    max_lora_rank=16, max_num_seqs=16, max_num_batched_tokens=128, num_blocks=256))
    for name, path in adapter_dirs.items():
        engine.register_adapter(name, path)
    return engine


@pytest.fixture(scope="module")
def references(demo_model_dir, adapter_dirs, hf_demo_model):
    """transformers' model per weights name (None: the base), PEFT on a fresh base for adapters."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = {None: hf_demo_model}
    for name, path in adapter_dirs.items():
        base = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
        models[name] = PeftModel.from_pretrained(base, path).eval()
    return models


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at every position: [len(ids), vocab]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_entry_matches(entry, ref_row: torch.Tensor, token: int, k: int, where: str) -> None:
    """One TokenLogprob against a reference log_softmax row [vocab]: the token's value, and a true top-k."""
    assert entry.token_id == token, where
    assert abs(entry.logprob - ref_row[token].item()) < TOL, f"{where}: {entry.logprob} vs {ref_row[token].item()}"
    assert len(entry.top) == k, where
    values = [v for _, v in entry.top]
    assert values == sorted(values, reverse=True), f"{where}: top-k not in rank order"
    for tid, v in entry.top:  # each listed alternative has its reference value ...
        assert abs(v - ref_row[tid].item()) < TOL, f"{where}: top token {tid}"
    ref_top = ref_row.topk(k).values.tolist()  # ... and they are the k best (ties may swap order)
    assert all(abs(a - b) < TOL for a, b in zip(values, ref_top)), f"{where}: not the true top-{k}"
    for tid, v in entry.top:
        if tid == entry.token_id:
            assert v == entry.logprob, f"{where}: the token's top-k entry is not the very same float"


def test_generated_logprobs_match_transformers_for_base_and_two_adapters_in_one_batch(
        engine, references, demo_tokenizer):
    names = [None, *ADAPTERS]
    jobs = [(demo_tokenizer.encode(p), name) for p in PROMPTS[:3] for name in names]
    params = SamplingParams(max_tokens=8, logprobs=5, **GREEDY)
    results = engine.generate([ids for ids, _ in jobs], params, adapters=[n for _, n in jobs])
    for (ids, name), res in zip(jobs, results):
        tokens, logits = hf_greedy(references[name], ids, 8)
        assert res.token_ids == tokens, f"{name}: {demo_tokenizer.decode(ids)!r} diverged"
        assert len(res.logprobs) == 8 and res.prompt_logprobs is None
        for step, (entry, token) in enumerate(zip(res.logprobs, tokens)):
            ref = torch.log_softmax(logits[step].float(), dim=-1)
            assert_entry_matches(entry, ref, token, 5, f"{name} step {step}")
            assert entry.top[0] == (token, entry.logprob)  # greedy: the token is the best one, same float


def test_logprobs_are_raw_and_the_sampled_value_is_its_top_k_entry(engine, demo_tokenizer):
    """Sampled with temperature, top-k and penalties: the logprobs are still log_softmax of the step's
    raw logits (return_logits), the top-20 are its true top-20, and the token's value == its entry."""
    prompts = [demo_tokenizer.encode(p) for p in PROMPTS[3:7]]
    params = [SamplingParams(max_tokens=12, temperature=0.7, top_k=8, seed=i, logprobs=20, return_logits=True,
                             presence_penalty=1.5, repetition_penalty=1.3, ignore_eos=True) for i in range(4)]
    in_top = 0
    for res in engine.generate(prompts, params):
        for step, (entry, raw) in enumerate(zip(res.logprobs, res.logits)):
            ref = torch.log_softmax(raw, dim=-1)
            assert_entry_matches(entry, ref, res.token_ids[step], 20, f"step {step}")
            assert [t for t, _ in entry.top] == ref.topk(20).indices.tolist() or _tied(ref, 20)
            in_top += entry.token_id in dict(entry.top)
    assert in_top > 0


def _tied(row: torch.Tensor, k: int) -> bool:
    values = row.topk(k + 1).values
    return bool((values[1:] == values[:-1]).any())


def test_prompt_logprobs_match_transformers_short_long_and_under_an_adapter(engine, references, demo_tokenizer):
    """Every prompt position, the first None; a 340-token prompt spans 3 prefill chunks of 128, in a
    batch with a short prompt and an adapter's; the first generated token's logprob follows on."""
    long_ids = demo_tokenizer.encode(" ".join(PROMPTS) * 5)
    assert len(long_ids) > 2 * engine.config.max_num_batched_tokens
    short_ids = demo_tokenizer.encode(PROMPTS[0])
    jobs = [(short_ids, None), (long_ids, None), (short_ids, "all-r16")]
    params = SamplingParams(max_tokens=2, prompt_logprobs=3, logprobs=0, **GREEDY)
    results = engine.generate([ids for ids, _ in jobs], params, adapters=[n for _, n in jobs])
    for (ids, name), res in zip(jobs, results):
        ref = hf_logprobs(references[name], ids)  # [len(ids), vocab]
        assert res.num_cached_tokens == 0
        assert len(res.prompt_logprobs) == len(ids) and res.prompt_logprobs[0] is None
        for p in range(1, len(ids)):
            assert_entry_matches(res.prompt_logprobs[p], ref[p - 1], ids[p], 3, f"{name} prompt position {p}")
        first = res.logprobs[0]
        assert first.top == [] and abs(first.logprob - ref[-1, res.token_ids[0]].item()) < TOL


def test_prompt_logprobs_with_prefix_caching_and_a_repeated_prompt(engine, hf_demo_model, demo_tokenizer):
    """A cached prompt asked again with prompt logprobs is computed, not hit (it needs every position's
    logits); a plain request for it in the same batch still hits the cache."""
    ids = demo_tokenizer.encode(" ".join(PROMPTS[2:]))
    assert len(ids) > 3 * engine.config.block_size
    plain = SamplingParams(max_tokens=2, **GREEDY)
    first = engine.generate([ids], plain)[0]
    asking = SamplingParams(max_tokens=2, prompt_logprobs=1, **GREEDY)
    results = engine.generate([ids, ids, ids], [asking, asking, plain])
    assert [r.num_cached_tokens for r in results[:2]] == [0, 0]
    assert results[2].num_cached_tokens >= 3 * engine.config.block_size
    ref = hf_logprobs(hf_demo_model, ids)
    for res in results[:2]:
        assert res.token_ids == first.token_ids and len(res.prompt_logprobs) == len(ids)
        for p in range(1, len(ids)):
            assert_entry_matches(res.prompt_logprobs[p], ref[p - 1], ids[p], 1, f"position {p}")
    assert results[2].prompt_logprobs is None


def test_prompt_logprobs_survive_a_preemption_mid_prefill(demo_model_dir, hf_demo_model, demo_tokenizer):
    """Preempted after its first chunk, the request recomputes from 0 and adds only the missing entries."""
    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", max_num_seqs=4,
                                    max_num_batched_tokens=64, num_blocks=64))
    ids = demo_tokenizer.encode(" ".join(PROMPTS) * 2)
    rid = engine.add_request(ids, SamplingParams(max_tokens=3, prompt_logprobs=2, **GREEDY))
    seq = engine._seqs[rid]
    assert engine.step() == [] and len(seq.prompt_logprobs) == 65  # None + tokens 1..64
    engine.batcher._preempt(seq, StepPlan())
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert seq.num_preemptions == 1
    with_prompt = [o for o in outputs if o.prompt_logprobs is not None]
    assert len(with_prompt) == 1 and with_prompt[0] is outputs[0]  # once, with the first token
    got = with_prompt[0].prompt_logprobs
    assert len(got) == len(ids) and got[0] is None
    ref = hf_logprobs(hf_demo_model, ids)
    for p in range(1, len(ids)):
        assert_entry_matches(got[p], ref[p - 1], ids[p], 2, f"position {p}")


def test_prompt_logprobs_under_a_small_cache_that_preempts(engine, demo_model_dir, hf_demo_model, demo_tokenizer):
    """9 requests growing by 40 tokens in 24 blocks: preemptions (some mid-prefill under a 64-token
    budget) neither duplicate nor lose entries, and the tokens are those of a roomy engine."""
    prompts = [demo_tokenizer.encode((p + " ") * 2) for p in PROMPTS]
    expected = [r.token_ids for r in engine.generate(prompts, SamplingParams(max_tokens=40, **GREEDY))]
    tight = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", dtype="float32", num_blocks=24,
                                   max_num_seqs=16, max_num_batched_tokens=64))
    params = SamplingParams(max_tokens=40, prompt_logprobs=0, **GREEDY)
    rids = [tight.add_request(p, params) for p in prompts]
    seqs = [tight._seqs[r] for r in rids]
    tokens, prompt_lps = {r: [] for r in rids}, {r: [] for r in rids}
    while tight.has_unfinished():
        for out in tight.step():
            tokens[out.request_id] += out.new_token_ids
            if out.prompt_logprobs is not None:
                prompt_lps[out.request_id].append(out.prompt_logprobs)
    assert sum(s.num_preemptions for s in seqs) > 0, "the cache was not small enough to force preemption"
    assert [tokens[r] for r in rids] == expected
    for ids, r in zip(prompts, rids):
        assert len(prompt_lps[r]) == 1  # handed out once
        got = prompt_lps[r][0]
        assert len(got) == len(ids) and got[0] is None
        ref = hf_logprobs(hf_demo_model, ids)
        for p in range(1, len(ids)):
            assert_entry_matches(got[p], ref[p - 1], ids[p], 0, f"position {p}")
    assert tight.blocks.num_free == 24


def test_streaming_deltas_carry_only_their_own_entries(engine, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[1])
    deltas = list(engine.generate_stream(ids, SamplingParams(max_tokens=5, logprobs=2, prompt_logprobs=2, **GREEDY)))
    assert len(deltas) == 5
    assert all(len(d.logprobs) == len(d.new_token_ids) == 1 for d in deltas)
    assert [d.logprobs[0].token_id for d in deltas] == [d.new_token_ids[0] for d in deltas]
    assert len(deltas[0].prompt_logprobs) == len(ids) and all(d.prompt_logprobs is None for d in deltas[1:])


def test_rows_that_ask_for_nothing_get_the_tokens_they_get_alone(engine, demo_tokenizer):
    target = demo_tokenizer.encode("The three most important inventions in history are")
    plain = SamplingParams(max_tokens=16, **GREEDY)
    alone = engine.generate([target], plain)[0].token_ids
    alone_lp = engine.generate([target], SamplingParams(max_tokens=16, logprobs=3, **GREEDY))[0]
    others = [demo_tokenizer.encode((PROMPTS[i] + " ") * (1 + i % 3)) for i in range(6)]
    busy = [SamplingParams(max_tokens=12, frequency_penalty=1.0, presence_penalty=0.5, **GREEDY),
            SamplingParams(max_tokens=10, logprobs=20, prompt_logprobs=5, **GREEDY),
            SamplingParams(max_tokens=9, repetition_penalty=1.8, logprobs=1, temperature=0.9, seed=3),
            SamplingParams(max_tokens=14, min_tokens=14, stop_token_ids=[11], temperature=0.0),
            SamplingParams(max_tokens=8, prompt_logprobs=0, **GREEDY),
            SamplingParams(max_tokens=11, **GREEDY)]
    adapters = [None, "qv-r8", "all-r16", None, "qv-r8", None]
    results = engine.generate(others[:3] + [target] + others[3:] + [target],
                              busy[:3] + [plain] + busy[3:] + [SamplingParams(max_tokens=16, logprobs=3, **GREEDY)],
                              adapters=adapters[:3] + [None] + adapters[3:] + [None])
    assert results[3].token_ids == alone and results[3].logprobs is None
    assert results[-1].token_ids == alone_lp.token_ids == alone
    for a, b in zip(results[-1].logprobs, alone_lp.logprobs):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < TOL


def test_penalized_greedy_tokens_are_the_argmax_of_the_reference(engine, demo_tokenizer):
    """End to end: at every step the token is the argmax of the definitions applied to the raw logits."""
    ids = demo_tokenizer.encode("Repeat after me: apple apple apple apple apple")
    knobs = dict(presence=0.8, frequency=0.6, repetition=1.4)
    params = SamplingParams(max_tokens=12, presence_penalty=0.8, frequency_penalty=0.6, repetition_penalty=1.4,
                            return_logits=True, **GREEDY)
    res = engine.generate([ids], params)[0]
    plain = engine.generate([ids], SamplingParams(max_tokens=12, **GREEDY))[0]
    assert res.token_ids != plain.token_ids  # the penalties bite on this prompt
    for step, raw in enumerate(res.logits):
        want = penalized(raw, ids, res.token_ids[:step], **knobs).argmax().item()
        assert res.token_ids[step] == want, f"step {step}"


def test_min_tokens_holds_eos_off(engine, demo_tokenizer):
    ids = demo_tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    free = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert free.finish_reason == "stop" and free.token_ids[-1] in engine.eos_token_ids
    k = len(free.token_ids)
    held = engine.generate([ids], SamplingParams(max_tokens=40, temperature=0.0, min_tokens=k + 5,
                                                 return_logits=True))[0]
    assert len(held.token_ids) >= k + 5
    assert not set(held.token_ids[:k + 5]) & engine.eos_token_ids
    assert held.token_ids[:k - 1] == free.token_ids[:k - 1]  # same until EOS would have come ...
    assert held.logits[k - 1].argmax().item() in engine.eos_token_ids  # ... where EOS was the raw argmax


def test_min_tokens_holds_stop_token_ids_off(engine, demo_tokenizer):
    ids = demo_tokenizer.encode(PROMPTS[0])
    base = engine.generate([ids], SamplingParams(max_tokens=6, return_logits=True, **GREEDY))[0]
    stop = base.token_ids[1]
    assert base.token_ids[0] != stop
    stopped = engine.generate([ids], SamplingParams(max_tokens=6, stop_token_ids=[stop], **GREEDY))[0]
    assert stopped.token_ids == base.token_ids[:2] and stopped.finish_reason == "stop"
    held = engine.generate([ids], SamplingParams(max_tokens=6, stop_token_ids=[stop], min_tokens=3, **GREEDY))[0]
    second_best = base.logits[1].topk(2).indices[1].item()
    assert held.token_ids[:2] == [base.token_ids[0], second_best] and len(held.token_ids) >= 3
