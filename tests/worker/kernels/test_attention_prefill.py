"""paged_prefill_attention: Triton (interpreted on CPU) vs torch reference vs a naive fp64 loop."""

import math
import os

import pytest
import torch

from worker.kernels.attention_decode import paged_decode_attention_reference
from worker.kernels.attention_prefill import paged_prefill_attention, paged_prefill_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-4, atol=1e-5)

# (q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size)
CASES = [
    ([5, 17, 16], [5, 17, 16], 4, 4, 64, 16),  # GQA 1, no prefix (q_len == context_len)
    ([3, 20, 1], [40, 33, 16], 6, 2, 64, 16),  # GQA 3, cached prefix (chunked prefill)
    ([33, 40], [65, 100], 8, 2, 128, 16),  # GQA 4, head_dim 128, several query/key tiles
    ([17, 8], [17, 31], 8, 1, 64, 32),  # GQA 8, block 32
    ([4, 0, 9], [4, 10, 25], 4, 2, 64, 8),  # a sequence with no new tokens; block 8
    ([1, 1, 1], [15, 16, 17], 4, 2, 64, 16),  # decode-shaped rows at block boundaries
    ([70], [70], 3, 1, 80, 16),  # head_dim not a power of two
]
IDS = [f"q{c[0]}-ctx{c[1]}-h{c[2]}-kv{c[3]}-d{c[4]}-bs{c[5]}" for c in CASES]


def _make(case, make_paged, seed, dtype=torch.float32, device=DEVICE):
    q_lens, ctx_lens, num_heads, kvh, head_dim, block_size = case
    torch.manual_seed(seed)
    paged = make_paged(ctx_lens, kvh, head_dim, block_size, dtype=dtype, device=device)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(device=device, dtype=torch.int32)
    # q as a strided view into a fused qkv buffer, like the model produces it.
    qkv = torch.randn(sum(q_lens), num_heads + 2 * kvh, head_dim, dtype=dtype, device=device)
    return qkv[:, :num_heads], cu, paged


def _naive_prefill(q, cu, paged, scale):
    """Per sequence, per query row, per head: keys at positions <= the row's position, fp64."""
    num_heads = q.shape[1]
    group = num_heads // paged.k_cache.shape[2]
    k_flat = paged.k_cache.flatten(0, 1).double().cpu()  # [slots, kvh, D]
    v_flat = paged.v_cache.flatten(0, 1).double().cpu()
    cu, qd = cu.tolist(), q.double().cpu()
    out = torch.zeros(q.shape, dtype=torch.float64)
    for s, ctx in enumerate(paged.context_lens.tolist()):
        q_len = cu[s + 1] - cu[s]
        k_seq, v_seq = k_flat[paged.slots[s]], v_flat[paged.slots[s]]  # [ctx, kvh, D] by position
        for i in range(q_len):
            visible = ctx - q_len + i + 1  # positions 0..own position
            for h in range(num_heads):
                k, v = k_seq[:visible, h // group], v_seq[:visible, h // group]  # [visible, D]
                out[cu[s] + i, h] = torch.softmax(k @ qd[cu[s] + i, h] * scale, dim=0) @ v
    return out.float()


def _args(case, make_paged, seed, **kw):
    q, cu, paged = _make(case, make_paged, seed, **kw)
    scale = 1 / math.sqrt(q.shape[-1])
    return (q, paged.k_cache, paged.v_cache, paged.block_tables, cu, paged.context_lens, scale), paged


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_matches_naive(case, make_paged):
    args, paged = _args(case, make_paged, seed=CASES.index(case))
    out = paged_prefill_attention_reference(*args)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    torch.testing.assert_close(out.cpu(), _naive_prefill(args[0], args[4], paged, args[6]), **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_triton_matches_reference(case, make_paged, force_triton):
    args, _ = _args(case, make_paged, seed=CASES.index(case))
    out = paged_prefill_attention(*args)
    assert out.dtype == args[0].dtype and out.shape == args[0].shape
    torch.testing.assert_close(out, paged_prefill_attention_reference(*args), **TOL)


def test_last_row_matches_decode(make_paged):
    """The last query row of each sequence is exactly a decode step at that position."""
    args, paged = _args(CASES[1], make_paged, seed=11)
    q, cu = args[0], args[4]
    out = paged_prefill_attention_reference(*args)
    last = cu[1:].long() - 1
    dec = paged_decode_attention_reference(q[last], args[1], args[2], args[3], args[5], args[6])
    torch.testing.assert_close(out[last], dec, **TOL)


def test_cpu_without_force_uses_reference(make_paged, no_force_triton):
    args, _ = _args(CASES[0], make_paged, seed=12, device="cpu")
    assert torch.equal(paged_prefill_attention(*args), paged_prefill_attention_reference(*args))


@pytest.mark.parametrize("force", [False, True])
def test_bad_shapes(force, make_paged, monkeypatch):
    monkeypatch.setenv("HOTSWAP_FORCE_TRITON", "1" if force else "0")
    (q, k_cache, v_cache, bt, cu, ctx, scale), _ = _args(CASES[1], make_paged, seed=13)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_prefill_attention(q[:, :5], k_cache, v_cache, bt, cu, ctx, scale)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        paged_prefill_attention(q, k_cache, v_cache, bt, cu[:-1], ctx, scale)
    with pytest.raises(ValueError, match="block_tables"):
        paged_prefill_attention(q, k_cache, v_cache, bt[:1], cu, ctx, scale)
    with pytest.raises(ValueError, match="v_cache shape"):
        paged_prefill_attention(q, k_cache, v_cache[..., :32], bt, cu, ctx, scale)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs CUDA with compiled (not interpreted) Triton")
class TestCompiledCuda:
    TOLS = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2), torch.float16: dict(rtol=1e-2, atol=1e-2)}

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("case", CASES, ids=IDS)
    def test_matches_reference(self, case, dtype, make_paged):
        args, paged = _args(case, make_paged, seed=CASES.index(case), dtype=dtype, device="cuda")
        out = paged_prefill_attention(*args)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), paged_prefill_attention_reference(*args).float(), **self.TOLS[dtype])
        naive = _naive_prefill(args[0], args[4], paged, args[6]).cuda()
        torch.testing.assert_close(out.float(), naive, **self.TOLS[dtype])


def test_kernel_compiles_for_sm90(compile_sm90):
    compile_sm90("""
from worker.kernels.attention_prefill import _prefill_kernel
for dt, block, ieee, head_dims in (("bf16", 64, False, (128, 256)), ("fp32", 32, True, (64,))):
    types = {n: "*" + dt for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
    types.update(block_tables_ptr="*i32", cu_seqlens_ptr="*i32", context_lens_ptr="*i32", scale_log2="fp32")
    for head_dim in head_dims:
        b = block if head_dim <= 128 else 32
        compile_sm90(_prefill_kernel, types, dict(GROUP=4, BLOCK_SIZE=16, BLOCK_M=b, BLOCK_N=b,
                     HEAD_DIM_PAD=head_dim, IEEE=ieee), num_warps=4, num_stages=2)
""")
