"""Penalties and min_tokens against references written here from their definitions (random logits
and token histories in, logits out), alone and as rows of a mixed batch through the sampler."""

from __future__ import annotations

import random

import pytest
import torch

from worker.engine.penalties import apply_penalties, ban_tokens, token_counts
from worker.engine.sampler import adjust_logits, sample, sample_step
from worker.engine.sampling_params import SamplingParams
from worker.engine.sequence import Sequence

VOCAB = 64
EOS = 3


def reference(logits: torch.Tensor, prompt: list[int], output: list[int], presence: float = 0.0,
              frequency: float = 0.0, repetition: float = 1.0) -> torch.Tensor:
    """One row, token by token. repetition (vLLM/HF): every token seen in prompt or output, positive
    logit / r, negative * r. Then OpenAI: minus frequency * count in the output, minus presence once
    if it is in the output."""
    out = logits.clone()
    for t in set(prompt) | set(output):
        x = out[t].item()
        out[t] = x / repetition if x > 0 else x * repetition
    for t in set(output):
        out[t] -= frequency * output.count(t) + presence
    return out


def random_case(rng: random.Random):
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randrange(0, 30))]  # may be empty
    knobs = dict(presence=rng.uniform(-2, 2), frequency=rng.uniform(-2, 2), repetition=rng.uniform(0.5, 2.0))
    for name in rng.sample(list(knobs), rng.randrange(0, 3)):  # some knobs off in some rows
        knobs[name] = 1.0 if name == "repetition" else 0.0
    return prompt, output, knobs


def seq_with(prompt: list[int], output: list[int], **params) -> Sequence:
    s = Sequence("r", list(prompt), SamplingParams(**{"max_tokens": 64, **params}), 0)
    s.output_token_ids = list(output)
    return s


def test_token_counts_match_counting_by_hand():
    rows = [[1, 1, 5], [], [63, 0, 63, 63]]
    counts = token_counts(rows, VOCAB, torch.device("cpu"))
    assert counts.shape == (3, VOCAB)
    for i, ids in enumerate(rows):
        assert counts[i].tolist() == [ids.count(t) for t in range(VOCAB)]


@pytest.mark.parametrize("seed", range(5))
def test_apply_penalties_matches_the_definitions_on_random_rows(seed):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    cases = [random_case(rng) for _ in range(8)]
    logits = torch.randn(8, VOCAB) * 4
    logits[0, :] = 0.0  # zeros: multiplied (stay 0) either way
    out = apply_penalties(logits, [c[0] for c in cases], [c[1] for c in cases], [c[2]["presence"] for c in cases],
                          [c[2]["frequency"] for c in cases], [c[2]["repetition"] for c in cases])
    for i, (prompt, output, knobs) in enumerate(cases):
        torch.testing.assert_close(out[i], reference(logits[i], prompt, output, **knobs), rtol=0, atol=1e-5)
    assert not torch.equal(out, logits)  # it did something
    assert logits[0].abs().sum() == 0  # and the input was left alone


def test_repetition_penalty_covers_the_prompt_and_the_others_only_the_output():
    logits = torch.tensor([[2.0, -2.0, 2.0, 2.0]])
    out = apply_penalties(logits, [[0, 1]], [[]], [1.0], [1.0], [2.0])
    assert out.tolist() == [[1.0, -4.0, 2.0, 2.0]]  # prompt tokens: repetition only
    out = apply_penalties(logits, [[]], [[2, 2, 3]], [0.5], [0.25], [1.0])
    assert out.tolist() == [[2.0, -2.0, 2.0 - 0.5 - 0.5, 2.0 - 0.25 - 0.5]]


def test_ban_tokens_sets_minus_infinity_only_where_asked():
    logits = torch.randn(3, VOCAB)
    out = ban_tokens(logits, [[EOS, 7], [], [0]])
    assert torch.isinf(out[0, [EOS, 7]]).all() and torch.isinf(out[2, 0])
    assert torch.isinf(out).sum() == 3 and torch.equal(out[1], logits[1])


def test_mixed_batch_rows_follow_their_own_settings_and_the_rest_are_untouched():
    rng = random.Random(7)
    torch.manual_seed(7)
    seqs, refs = [], []
    logits = torch.randn(10, VOCAB) * 3
    for i in range(10):
        prompt, output, knobs = random_case(rng)
        if i % 3 == 0:  # plain rows between penalized ones
            seqs.append(seq_with(prompt, output, temperature=0.0))
            refs.append(logits[i])
        else:
            seqs.append(seq_with(prompt, output, temperature=0.0, presence_penalty=knobs["presence"],
                                 frequency_penalty=knobs["frequency"], repetition_penalty=knobs["repetition"]))
            refs.append(reference(logits[i], prompt, output, **knobs))
    raw = logits.clone()
    out = adjust_logits(logits, seqs, {EOS})
    for i, ref in enumerate(refs):
        if i % 3 == 0:
            assert torch.equal(out[i], logits[i])  # bit for bit
        else:
            torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)
    assert torch.equal(logits, raw)  # the step's logits stay raw (logprobs and return_logits read them)
    assert sample(logits, seqs, {EOS}) == [int(r.argmax()) for r in refs]  # greedy picks from the penalized rows


def test_nobody_asks_nothing_is_copied():
    logits = torch.randn(2, VOCAB)
    seqs = [seq_with([1], [2], temperature=0.0), seq_with([1], [], temperature=1.0)]
    assert adjust_logits(logits, seqs, {EOS}) is logits


def test_min_tokens_holds_eos_and_stop_tokens_off_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 9], logits[0, 5] = 10.0, 9.0, 8.0  # EOS best, then a stop token, then 5
    for n_out in range(4):
        s = seq_with([1], [20] * n_out, temperature=0.0, min_tokens=3, stop_token_ids=[9])
        token = sample(logits, [s], {EOS})[0]
        assert token == (5 if n_out < 3 else EOS)
    ignoring = seq_with([1], [], temperature=0.0, min_tokens=3, stop_token_ids=[9], ignore_eos=True)
    assert sample(logits, [ignoring], {EOS}) == [EOS]  # with ignore_eos, EOS is no stop, so not banned
    sampled = seq_with([1], [], temperature=1.0, seed=0, min_tokens=3, stop_token_ids=[9])
    assert all(sample(logits, [sampled], {EOS})[0] not in (EOS, 9) for _ in range(200))


def test_logprobs_come_from_the_raw_logits_not_the_penalized_ones():
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    s = seq_with([1, 2, 3], [4, 4], temperature=0.0, frequency_penalty=2.0, repetition_penalty=1.5, logprobs=2,
                 min_tokens=5)
    out = sample_step(logits, [s, seq_with([1], [], temperature=0.0)], {EOS})
    raw = torch.log_softmax(logits[0], -1)
    entry = out.logprobs[0]
    assert entry.token_id == out.token_ids[0] and entry.logprob == raw[entry.token_id].item()
    assert [t for t, _ in entry.top] == raw.topk(2).indices.tolist()
    assert out.logprobs[1] is None


@pytest.mark.parametrize("bad", [dict(presence_penalty=2.5), dict(frequency_penalty=-2.01),
                                 dict(repetition_penalty=0.0), dict(repetition_penalty=-1.0),
                                 dict(repetition_penalty=float("nan")), dict(min_tokens=-1),
                                 dict(min_tokens=17), dict(min_tokens=1.5), dict(logprobs=-1), dict(logprobs=21),
                                 dict(logprobs=True), dict(prompt_logprobs=21), dict(prompt_logprobs=2.0)])
def test_bad_params_are_refused_with_a_message(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(max_tokens=16, **bad)


def test_good_edge_params_are_accepted():
    p = SamplingParams(max_tokens=4, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=1e-3,
                       min_tokens=4, logprobs=0, prompt_logprobs=20)
    assert p.has_penalties and not SamplingParams().has_penalties
