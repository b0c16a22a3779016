"""paged_decode_attention: Triton (interpreted on CPU) vs torch reference vs a naive fp64 loop."""

import math
import os

import pytest
import torch

from worker.kernels.attention_decode import (
    _auto_num_splits,
    length_groups,
    paged_decode_attention,
    paged_decode_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-4, atol=1e-5)

# (context_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits, table_width)
CASES = [
    ([1, 15, 16, 17], 4, 4, 64, 16, 1, None),  # GQA 1, lengths around one block
    ([32, 33, 7], 6, 2, 64, 16, 2, None),  # GQA 3, at/across 2 blocks
    ([100, 48, 49], 8, 2, 128, 16, 4, None),  # GQA 4, head_dim 128
    ([31, 64, 65], 8, 1, 64, 32, 3, None),  # GQA 8, block 32, uneven split count
    ([5, 17], 4, 1, 64, 16, 8, None),  # more splits than blocks: empty splits
    ([97, 3], 4, 2, 128, 8, None, 64),  # block 8; auto splits (wide table -> splits > 1)
    ([40], 3, 1, 80, 16, 2, None),  # head_dim not a power of two
    ([3, 300, 40, 250, 7, 180, 90, 12, 0], 6, 2, 64, 16, None, None),  # spread: the CPU path groups by length
]
IDS = [f"ctx{c[0]}-h{c[1]}-kv{c[2]}-d{c[3]}-bs{c[4]}-sp{c[5]}" for c in CASES]


def _make(case, make_paged, seed, dtype=torch.float32, device=DEVICE):
    ctx_lens, num_heads, kvh, head_dim, block_size, _, width = case
    torch.manual_seed(seed)
    paged = make_paged(ctx_lens, kvh, head_dim, block_size, dtype=dtype, device=device, table_width=width)
    # q as a strided view into a fused qkv buffer, like the model produces it.
    qkv = torch.randn(len(ctx_lens), num_heads + 2 * kvh, head_dim, dtype=dtype, device=device)
    return qkv[:, :num_heads], paged


def _naive_decode(q, paged, scale):
    """Per sequence, per head: gather this sequence's keys slot by slot, softmax in fp64."""
    num_seqs, num_heads, head_dim = q.shape
    group = num_heads // paged.k_cache.shape[2]
    k_flat = paged.k_cache.flatten(0, 1).double()  # [slots, kvh, D]
    v_flat = paged.v_cache.flatten(0, 1).double()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s in range(num_seqs):
        k_seq, v_seq = k_flat[paged.slots[s]].cpu(), v_flat[paged.slots[s]].cpu()  # [ctx, kvh, D]
        for h in range(num_heads):
            k, v = k_seq[:, h // group], v_seq[:, h // group]  # [ctx, D]
            p = torch.softmax(k @ q[s, h].double().cpu() * scale, dim=0)
            out[s, h] = p @ v
    return out.float()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_naive(case, make_paged):
    q, paged = _make(case, make_paged, seed=CASES.index(case))
    scale = 1 / math.sqrt(q.shape[-1])
    out = paged_decode_attention_reference(q, paged.k_cache, paged.v_cache, paged.block_tables,
                                           paged.context_lens, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out.cpu(), _naive_decode(q, paged, scale), **TOL)


def test_length_groups_split_spread_batches_and_keep_even_ones_whole():
    assert length_groups((100,) * 16) == (tuple(range(16)),)  # nothing to gain from a split
    assert length_groups((5,)) == ((0,),)
    lens = (3, 300, 40, 250, 7, 180, 90, 12, 0)
    groups = length_groups(lens)
    assert len(groups) > 1 and sorted(i for g in groups for i in g) == list(range(len(lens)))
    longest = [max(lens[i] for i in g) for g in groups]
    assert longest == sorted(longest)  # contiguous in length order
    padded = sum(len(g) * m for g, m in zip(groups, longest))
    assert padded + 64 * len(groups) < len(lens) * max(lens) + 64  # cheaper than one padded gather


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_matches_reference(case, make_paged, force_triton):
    q, paged = _make(case, make_paged, seed=CASES.index(case))
    scale = 1 / math.sqrt(q.shape[-1])
    args = (q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, scale)
    out = paged_decode_attention(*args, num_splits=case[5])
    assert out.dtype == q.dtype and out.shape == q.shape
    torch.testing.assert_close(out, paged_decode_attention_reference(*args), **TOL)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_empty_context_gives_zeros(num_splits, make_paged, force_triton):
    """Padding rows (context_len 0, e.g. a CUDA-graph batch) must not produce NaN."""
    q, paged = _make(CASES[1], make_paged, seed=7)
    ctx = paged.context_lens.clone()
    ctx[1] = 0
    args = (q, paged.k_cache, paged.v_cache, paged.block_tables, ctx, 0.125)
    ref = paged_decode_attention_reference(*args)
    out = paged_decode_attention(*args, num_splits=num_splits)
    assert torch.equal(ref[1], torch.zeros_like(ref[1])) and torch.equal(out[1], ref[1])
    torch.testing.assert_close(out, ref, **TOL)


def test_cpu_without_force_uses_reference(make_paged, no_force_triton):
    q, paged = _make(CASES[0], make_paged, seed=8, device="cpu")
    args = (q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, 0.125)
    assert torch.equal(paged_decode_attention(*args), paged_decode_attention_reference(*args))


def test_auto_num_splits():
    cpu = torch.device("cpu")
    assert _auto_num_splits(256, 1, 1, cpu) == 1  # short context: never split
    assert _auto_num_splits(16 * 1024, 1, 8, cpu) == 32  # one long sequence: split a lot
    assert _auto_num_splits(16 * 1024, 256, 8, cpu) == 1  # big batch fills the GPU already
    n = _auto_num_splits(4096, 4, 2, cpu)
    assert 1 < n <= 16 and n & (n - 1) == 0


@pytest.mark.parametrize("force", [False, True])
def test_bad_shapes(force, make_paged, monkeypatch):
    monkeypatch.setenv("HOTSWAP_FORCE_TRITON", "1" if force else "0")
    q, paged = _make(CASES[1], make_paged, seed=9)  # 6 heads over 2 kv heads
    rest = (paged.block_tables, paged.context_lens, 0.125)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention(q[:, :5], paged.k_cache, paged.v_cache, *rest)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(q[..., :32], paged.k_cache, paged.v_cache, *rest)
    with pytest.raises(ValueError, match="context_lens"):
        paged_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens[:2], 0.125)
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(q, paged.k_cache, paged.v_cache, paged.block_tables[:2], paged.context_lens, 0.125)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA with compiled (not interpreted) Triton")
class TestCompiledCuda:
    TOLS = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)}

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_matches_reference(self, case, dtype, make_paged):
        q, paged = _make(case, make_paged, seed=CASES.index(case), dtype=dtype, device="cuda")
        scale = 1 / math.sqrt(q.shape[-1])
        args = (q, paged.k_cache, paged.v_cache, paged.block_tables, paged.context_lens, scale)
        out = paged_decode_attention(*args, num_splits=case[5])
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), paged_decode_attention_reference(*args).float(), **self.TOLS[dtype])
        torch.testing.assert_close(out.float(), _naive_decode(q, paged, scale).cuda(), **self.TOLS[dtype])


def test_kernels_compile_for_sm90(compile_sm90):
    compile_sm90("""
from worker.kernels.attention_decode import _decode_reduce_kernel, _decode_split_kernel
for dt, block_n, ieee, variants in (("bf16", 64, False, ((16, 128, 1), (32, 256, 4))),
                                   ("fp32", 32, True, ((16, 64, 2),))):
    types = {n: "*" + dt for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
    types.update(block_tables_ptr="*i32", context_lens_ptr="*i32", part_out_ptr="*fp32",
                 part_lse_ptr="*fp32", scale_log2="fp32")
    for group_pad, head_dim, splits in variants:
        compile_sm90(_decode_split_kernel, types, dict(
            GROUP=group_pad // 2, GROUP_PAD=group_pad, BLOCK_SIZE=16, BLOCK_N=block_n,
            HEAD_DIM_PAD=head_dim, NUM_SPLITS=splits, IEEE=ieee), num_warps=4)
compile_sm90(_decode_reduce_kernel, {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*bf16"},
             dict(NUM_SPLITS=3, SPLITS_PAD=4, HEAD_DIM_PAD=128), num_warps=2)
""")
