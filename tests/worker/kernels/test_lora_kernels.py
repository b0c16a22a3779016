"""Multi-LoRA SGMV kernels: segments, torch reference vs naive math, Triton vs reference.

On CPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be
set before the kernel modules are imported) and are taken with force_triton=True.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from worker.kernels.lora_expand import lora_expand, lora_expand_reference  # noqa: E402
from worker.kernels._dispatch import use_triton  # noqa: E402
from worker.kernels.lora_segments import build_segments, max_segment_len  # noqa: E402
from worker.kernels.lora_shrink import lora_shrink, lora_shrink_reference  # noqa: E402

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
TOL = dict(rtol=1e-4, atol=1e-5)

# --- build_segments --------------------------------------------------------------


@pytest.mark.parametrize(
    "slots, indptr, seg_slots",
    [
        ([], [0], []),
        ([-1, -1, -1], [0, 3], [-1]),
        ([0, 1, 0, 1], [0, 1, 2, 3, 4], [0, 1, 0, 1]),
        ([3, 3, 3], [0, 3], [3]),
        ([0, 0, -1, -1, 2, 2, 2, 0], [0, 2, 4, 7, 8], [0, -1, 2, 0]),
        ([-1, 5], [0, 1, 2], [-1, 5]),
    ],
)
def test_build_segments(slots, indptr, seg_slots):
    for inp in (slots, torch.tensor(slots, dtype=torch.int64)):
        got_indptr, got_slots = build_segments(inp)
        assert got_indptr.dtype == torch.int32 and got_slots.dtype == torch.int32
        assert got_indptr.tolist() == indptr
        assert got_slots.tolist() == seg_slots
    assert max_segment_len(got_indptr) == max([b - a for a, b in zip(indptr, indptr[1:])], default=0)


def test_build_segments_rejects_bad_slots():
    with pytest.raises(ValueError):
        build_segments([0, -2])
    with pytest.raises(ValueError):
        build_segments(torch.zeros(2, 2, dtype=torch.int32))


def test_use_triton(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("HOTSWAP_FORCE_TRITON", raising=False)
    assert not use_triton(cpu, None)
    assert use_triton(cpu, True)
    monkeypatch.setenv("HOTSWAP_FORCE_TRITON", "1")
    assert use_triton(cpu, None)
    assert not use_triton(cpu, False)


# --- random multi-adapter cases ------------------------------------------------

SEG_LENS = [1, 5, 16, 17, 40]
# (segment slots in token order, with repeats and base segments)
LAYOUTS = [
    [2, -1, 0, 2, 1],
    [-1, 1, 1, 0, -1],  # adjacent equal slots stay separate segments here
    [0, 2, -1, 1, 0],
]
# (max_rank, per-slot true ranks, in_dim, out_dim)
SHAPES = [
    (32, [8, 16, 32], 64, 96),
    (64, [32, 8, 16], 200, 64),
    (64, [16, 32, 8], 96, 200),
]


def make_case(layout, shape, seed, dtype=torch.float32, device="cpu", seg_lens=SEG_LENS):
    """Per-adapter unpadded A/B plus their zero-padded slot stacks and segments."""
    max_rank, ranks, in_dim, out_dim = shape
    g = torch.Generator().manual_seed(seed)
    num_tokens = sum(seg_lens)
    x = torch.randn(num_tokens, in_dim, generator=g)
    a_list = [torch.randn(r, in_dim, generator=g) / in_dim**0.5 for r in ranks]  # [r, in]
    b_list = [torch.randn(out_dim, r, generator=g) / r**0.5 for r in ranks]  # [out, r]
    scales = [16.0 / r for r in ranks[:-1]] + [16.0 / ranks[-1] ** 0.5]  # alpha/r, one rsLoRA
    lora_a = torch.zeros(len(ranks), max_rank, in_dim)
    lora_b = torch.zeros(len(ranks), out_dim, max_rank)
    for i, r in enumerate(ranks):
        lora_a[i, :r] = a_list[i]
        lora_b[i, :, :r] = b_list[i]
    indptr = torch.tensor([0] + torch.tensor(seg_lens).cumsum(0).tolist(), dtype=torch.int32)
    seg_slots = torch.tensor(layout, dtype=torch.int32)
    to = dict(device=device, dtype=dtype)
    return dict(
        x=x.to(**to), a_list=a_list, b_list=b_list, scales=scales,
        lora_a=lora_a.to(**to), lora_b=lora_b.to(**to),
        scalings=torch.tensor(scales, dtype=torch.float32, device=device),
        indptr=indptr.to(device), slots=seg_slots.to(device),
    )


def naive(c, out_width, out_offset):
    """Per-token x @ A_r.T @ B_r.T * scale on the UNPADDED weights (fp64)."""
    x = c["x"].double().cpu()
    y = torch.zeros(x.shape[0], c["lora_a"].shape[1], dtype=torch.float64)
    delta = torch.zeros(x.shape[0], out_width, dtype=torch.float64)
    bounds = c["indptr"].tolist()
    for s, slot in enumerate(c["slots"].tolist()):
        if slot < 0:
            continue
        a, b, sc = c["a_list"][slot].double(), c["b_list"][slot].double(), c["scales"][slot]
        out_dim, r = b.shape
        for t in range(bounds[s], bounds[s + 1]):
            y[t, :r] = a @ x[t]
            delta[t, out_offset:out_offset + out_dim] = (b @ (a @ x[t])) * sc
    return y, delta


CASES = [(lay, shp, i * 7 + j) for i, lay in enumerate(LAYOUTS) for j, shp in enumerate(SHAPES)]


@pytest.mark.parametrize("layout, shape, seed", CASES)
def test_reference_vs_naive(layout, shape, seed):
    c = make_case(layout, shape, seed)
    out_dim, offset = shape[3], 7
    base = torch.randn(c["x"].shape[0], out_dim + 13)
    y_want, delta = naive(c, base.shape[1], offset)

    y = lora_shrink_reference(c["x"], c["lora_a"], c["indptr"], c["slots"])
    assert y.dtype == torch.float32 and y.shape == (c["x"].shape[0], shape[0])
    torch.testing.assert_close(y, y_want.float(), **TOL)

    out = base.clone()
    lora_expand_reference(y, c["lora_b"], c["scalings"], c["indptr"], c["slots"], out, offset)
    torch.testing.assert_close(out, (base.double() + delta).float(), **TOL)
    # Public entry points take the reference on CPU.
    torch.testing.assert_close(lora_shrink(c["x"], c["lora_a"], c["indptr"], c["slots"], force_triton=False), y)


@needs_triton
@pytest.mark.parametrize("split_k", [None, 1, 3])
@pytest.mark.parametrize("layout, shape, seed", CASES[::2])
def test_shrink_kernel_vs_reference(layout, shape, seed, split_k):
    c = make_case(layout, shape, seed)
    args = (c["x"], c["lora_a"], c["indptr"], c["slots"])
    want = lora_shrink_reference(*args)
    got = lora_shrink(*args, split_k=split_k, force_triton=True)
    torch.testing.assert_close(got, want, **TOL)
    # Base tokens are exactly zero.
    bounds = c["indptr"].tolist()
    for s, slot in enumerate(c["slots"].tolist()):
        if slot < 0:
            assert not got[bounds[s]:bounds[s + 1]].any()


@needs_triton
@pytest.mark.parametrize("out_offset, extra", [(0, 0), (5, 11)])
@pytest.mark.parametrize("layout, shape, seed", CASES[1::2])
def test_expand_kernel_vs_reference(layout, shape, seed, out_offset, extra):
    c = make_case(layout, shape, seed)
    y = lora_shrink_reference(c["x"], c["lora_a"], c["indptr"], c["slots"])
    base = torch.randn(y.shape[0], out_offset + shape[3] + extra)
    want, got = base.clone(), base.clone()
    lora_expand_reference(y, c["lora_b"], c["scalings"], c["indptr"], c["slots"], want, out_offset)
    lora_expand(y, c["lora_b"], c["scalings"], c["indptr"], c["slots"], got, out_offset, force_triton=True)
    torch.testing.assert_close(got, want, **TOL)
    # Columns outside the slice and base-token rows are bit-identical.
    assert torch.equal(got[:, :out_offset], base[:, :out_offset])
    assert torch.equal(got[:, out_offset + shape[3]:], base[:, out_offset + shape[3]:])
    bounds = c["indptr"].tolist()
    for s, slot in enumerate(c["slots"].tolist()):
        if slot < 0:
            assert torch.equal(got[bounds[s]:bounds[s + 1]], base[bounds[s]:bounds[s + 1]])


@needs_triton
def test_expand_kernel_reads_b_through_a_transposed_view():
    """Slots store B^T [max_loras, R, out]; the kernel gets B as a strided [max_loras, out, R] view."""
    c = make_case(LAYOUTS[0], SHAPES[2], 77)
    b_view = c["lora_b"].transpose(1, 2).contiguous().transpose(1, 2)  # same values, rank-major storage
    assert b_view.stride(1) == 1
    y = lora_shrink_reference(c["x"], c["lora_a"], c["indptr"], c["slots"])
    base = torch.randn(y.shape[0], SHAPES[2][3])
    want, got = base.clone(), base.clone()
    lora_expand_reference(y, c["lora_b"], c["scalings"], c["indptr"], c["slots"], want)
    lora_expand(y, b_view, c["scalings"], c["indptr"], c["slots"], got, force_triton=True)
    torch.testing.assert_close(got, want, **TOL)


@needs_triton
@pytest.mark.parametrize("max_seg_len", [1, 17, 40])
def test_max_seg_len_only_sizes_grid(max_seg_len):
    """A short hint makes one program loop over several token chunks of a segment."""
    c = make_case(LAYOUTS[2], SHAPES[0], 55)
    args = (c["x"], c["lora_a"], c["indptr"], c["slots"])
    y_want = lora_shrink_reference(*args)
    torch.testing.assert_close(lora_shrink(*args, max_seg_len=max_seg_len, force_triton=True), y_want, **TOL)
    base = torch.randn(y_want.shape[0], SHAPES[0][3])
    want, got = base.clone(), base.clone()
    lora_expand_reference(y_want, c["lora_b"], c["scalings"], c["indptr"], c["slots"], want)
    lora_expand(y_want, c["lora_b"], c["scalings"], c["indptr"], c["slots"], got,
                max_seg_len=max_seg_len, force_triton=True)
    torch.testing.assert_close(got, want, **TOL)


@needs_triton
def test_kernels_end_to_end_vs_naive_fused_qkv(monkeypatch):
    """Two sub-projections into one fused output, via HOTSWAP_FORCE_TRITON=1."""
    monkeypatch.setenv("HOTSWAP_FORCE_TRITON", "1")
    q = make_case(LAYOUTS[0], SHAPES[1], 101)
    kv = make_case(LAYOUTS[0], SHAPES[1], 102)
    kv["x"] = q["x"]  # same input activations, different adapters' weights
    n = SHAPES[1][3]
    base = torch.randn(q["x"].shape[0], 2 * n)
    out = base.clone()
    for c, off in ((q, 0), (kv, n)):
        y = lora_shrink(c["x"], c["lora_a"], c["indptr"], c["slots"], max_seg_len=40)
        lora_expand(y, c["lora_b"], c["scalings"], c["indptr"], c["slots"], out, off, max_seg_len=40)
    want = base.double() + naive(q, 2 * n, 0)[1] + naive(kv, 2 * n, n)[1]
    torch.testing.assert_close(out, want.float(), **TOL)


@pytest.mark.parametrize("force", [False, pytest.param(True, marks=needs_triton)])
def test_empty_batch_and_all_base(force):
    lora_a, lora_b = torch.randn(2, 16, 24), torch.randn(2, 40, 16)
    sc = torch.ones(2)
    indptr, slots = build_segments([])
    y = lora_shrink(torch.zeros(0, 24), lora_a, indptr, slots, force_triton=force)
    assert y.shape == (0, 16)
    out = torch.zeros(0, 40)
    lora_expand(y, lora_b, sc, indptr, slots, out, force_triton=force)

    x = torch.randn(6, 24)
    indptr, slots = build_segments([-1] * 6)
    y = lora_shrink(x, lora_a, indptr, slots, force_triton=force)
    assert not y.any()
    out = torch.randn(6, 40)
    before = out.clone()
    lora_expand(torch.randn(6, 16), lora_b, sc, indptr, slots, out, force_triton=force)
    assert torch.equal(out, before)


@pytest.mark.parametrize("force", [False, pytest.param(True, marks=needs_triton)])
def test_rank_validation(force):
    indptr, slots = build_segments([0, 0])
    with pytest.raises(ValueError, match="max_rank must be a multiple of 16"):
        lora_shrink(torch.randn(2, 8), torch.randn(1, 12, 8), indptr, slots, force_triton=force)
    with pytest.raises(ValueError, match="max_rank must be a multiple of 16"):
        lora_expand(torch.randn(2, 12), torch.randn(1, 8, 12), torch.ones(1), indptr, slots,
                    torch.zeros(2, 8), force_triton=force)
    with pytest.raises(ValueError, match="exceed out width"):
        lora_expand(torch.randn(2, 16), torch.randn(1, 8, 16), torch.ones(1), indptr, slots,
                    torch.zeros(2, 8), out_offset=1, force_triton=force)


# --- ahead-of-time compile (no GPU needed) ---------------------------------------

# Compiled by the `compile_sm90` fixture (tests/worker/kernels/conftest.py) in a fresh interpreter.
_AOT_BODY = """
from worker.kernels.lora_expand import _expand_kernel
from worker.kernels.lora_shrink import _shrink_kernel

for dt in ("bf16", "fp16", "fp32"):
    wide, ieee = (64, True) if dt == "fp32" else (128, False)
    ptrs = {"x_ptr": "*" + dt, "a_ptr": "*" + dt, "y_ptr": "*fp32", "indptr_ptr": "*i32", "slots_ptr": "*i32"}
    for split_k in (1, 4):
        compile_sm90(_shrink_kernel, ptrs, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=wide, SPLIT_K=split_k, IEEE=ieee))
    ptrs = {"y_ptr": "*fp32", "b_ptr": "*" + dt, "scale_ptr": "*fp32", "out_ptr": "*" + dt,
            "indptr_ptr": "*i32", "slots_ptr": "*i32"}
    compile_sm90(_expand_kernel, ptrs, dict(BLOCK_M=64, BLOCK_N=wide, BLOCK_K=32, IEEE=ieee))
"""


@needs_triton
def test_kernels_compile_for_sm90(compile_sm90):
    """Compile both kernels to sm_90 cubins without a GPU: catches the errors the
    interpreter tolerates (dtype rules of tl.dot, control flow, shared memory)."""
    compile_sm90(_AOT_BODY)


# --- compiled on a real GPU -----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA and triton")
class TestGPU:
    # Real projection sizes; long segment exercises the token-split grid.
    SEG_LENS = [1, 5, 16, 17, 40, 300]
    LAYOUT = [2, -1, 0, 2, 1, 0]

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("shape", [(64, [16, 64, 8], 4096, 1536), (16, [8, 16, 16], 14336, 576),
                                       (32, [32, 8, 16], 1024, 192)])
    def test_compiled_vs_reference(self, dtype, shape):
        c = make_case(self.LAYOUT, shape, 3, dtype=dtype, device="cuda", seg_lens=self.SEG_LENS)
        args = (c["x"], c["lora_a"], c["indptr"], c["slots"])
        y_want = lora_shrink_reference(*args)
        y = lora_shrink(*args)  # CUDA tensors -> Triton
        torch.testing.assert_close(y, y_want, rtol=2e-2, atol=2e-2)
        y1 = lora_shrink(*args, split_k=1)
        torch.testing.assert_close(y1, y_want, rtol=2e-2, atol=2e-2)

        off = 3
        base = torch.randn(y.shape[0], off + shape[3] + 5, device="cuda", dtype=dtype)
        want, got = base.clone(), base.clone()
        lora_expand_reference(y_want, c["lora_b"], c["scalings"], c["indptr"], c["slots"], want, off)
        lora_expand(y_want, c["lora_b"], c["scalings"], c["indptr"], c["slots"], got, off)
        torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
        assert torch.equal(got[:, :off], base[:, :off])
        assert torch.equal(got[:, off + shape[3]:], base[:, off + shape[3]:])
