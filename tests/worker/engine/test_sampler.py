import pytest
import torch

from worker.engine.sampler import _mask_top_k_top_p, sample
from worker.engine.sampling_params import SamplingParams
from worker.engine.sequence import Sequence


def seq(**params) -> Sequence:
    p = SamplingParams(**params)
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    return Sequence("r", [1], p, 0, generator=gen)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, [seq(temperature=0.0), seq(temperature=0.0)]) == [1, 0]


def test_top_k_keeps_only_the_k_best():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    masked = _mask_top_k_top_p(logits, [2], [1.0])
    assert torch.isinf(masked[0, [0, 3]]).all() and torch.isfinite(masked[0, [1, 2]]).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    masked = _mask_top_k_top_p(probs.log(), [0], [0.7])
    assert torch.isfinite(masked[0, :2]).all() and torch.isinf(masked[0, 2:]).all()
    tiny = _mask_top_k_top_p(probs.log(), [0], [0.01])
    assert torch.isfinite(tiny[0, 0]) and torch.isinf(tiny[0, 1:]).all()  # the best token always stays


def test_sampled_tokens_only_come_from_the_allowed_set():
    logits = torch.randn(1, 50)
    allowed = set(logits[0].topk(3).indices.tolist())
    s = seq(temperature=1.5, top_k=3, seed=0)
    assert all(sample(logits, [s])[0] in allowed for _ in range(50))


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 100)
    a = seq(temperature=1.0, seed=42)
    alone = [sample(logits[:1], [a])[0] for _ in range(10)]
    b, c1, c2 = seq(temperature=1.0, seed=42), seq(temperature=0.7), seq(temperature=0.0)
    together = [sample(logits, [b, c1, c2])[0] for _ in range(10)]
    assert alone == together
    assert len(set(alone)) > 1  # it really samples


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    s = seq(temperature=1.0, seed=1)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits, [s])[0]] += 1
    expected = torch.softmax(logits[0], -1) * 3000
    assert ((counts - expected).abs() / expected).max() < 0.15


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-2), dict(stop=[""])])
def test_bad_params_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
