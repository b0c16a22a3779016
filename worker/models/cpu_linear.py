"""Decode-sized matmuls on CPU through MKL's packed-weight GEMM.

On CPU a decode step multiplies every weight by only a few rows (one per running sequence), and
MKL's plain sgemm handles 4..16 rows poorly: on this project's AVX-512 machines a 4-row product
costs 1.5x a 3-row one, and 13 rows cost more than 16. Once the weight is packed into MKL's own
layout those shapes run 1.3-1.6x faster (the demo model's projections, 30 layers: 4 rows 27.1 ->
20.5 ms, 13 rows 41.8 -> 27.0 ms, 16 rows 40.5 -> 28.0 ms). So each CPU fp32 weight keeps a
second copy, packed once, and batches of 4..16 rows run packed at their own row count (MKL's
packed B does not depend on the row count: its size is the same for any, and Paddle packs for
one row and computes for any batch). 1..3 rows (MKL's tiny-M kernel is as fast), bigger batches
(17..32 rows measured no faster in engine steps; prefill chunks are faster plain) and every GPU
tensor take the plain GEMM.

The packed copy follows the weight by its version counter (`Tensor._version`, bumped by every
in-place write): a full fine-tune copied in place repacks at the engine's next `prepack()` or on
next use, never runs with stale weights. It costs one more copy of the weights in host memory.

That rule was tuned on one machine and does not carry over (on a Zen 4 the packed path gains
nothing and 13 rows cost more than 16), so the engine measures instead (cpu_tuning.py) and gives
each weight a table: per row count, plain or packed, at its own row count or zero-padded up to a
cheaper one (cpu_plan.py). Without a table (tuning off) the fixed rule above applies. Every path
gives F.linear's results up to fp32 rounding: MKL picks its kernel by row count, so even F.linear
on 5 rows and on the same 5 rows padded to 8 can differ in the last bits (~1e-6 relative).

A third path is oneDNN's GEMM on a weight reordered once into its own layout (fp32 and bf16). MKL
takes slow code paths on AMD CPUs; on a Zen 4 (2 threads) oneDNN ran the demo model's fp32
projections 1.4-4x faster than MKL at decode row counts (logits head, 16 rows: 21.7 -> 6.0 ms),
with F.linear's results up to fp32 rounding, and in bf16 it is F.linear's own kernel (bitwise
equal) without the per-call reorder (logits head, 16 rows: 6.7 -> 3.3 ms).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from worker.models.cpu_plan import MAX_PACKED_ROWS, MIN_PACKED_ROWS, Choice

PACK_ROWS = 16  # the row count given to MKL's pack (the packed layout serves any row count)
# bf16 batches beyond the table (prefill chunks) are zero-padded to a multiple of this: oneDNN
# JIT-builds and keeps a kernel (~0.75 MB) per row count, so unpadded prefill lengths grew a
# worker by ~450 MB over 130 lengths; padded, they share 1/16 as many kernels (the caches hold
# 1,024 kernels each, ONEDNN_PRIMITIVE_CACHE_CAPACITY and ideep's LRU_CACHE_CAPACITY, so growth
# is bounded either way).
BF16_ROW_STEP = 16


ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


@functools.cache
def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


@functools.cache
def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedWeight:
    """The packed copies of one weight (MKL's, oneDNN's), each made on first use and redone whenever
    the weight changes, and the per-row-count choice of path (`table`, from cpu_plan.row_table;
    None: the fixed rule)."""

    def __init__(self):
        self._packed: torch.Tensor | None = None
        self._version = -1
        self._onednn: torch.Tensor | None = None
        self._onednn_version = -1
        self.table: list[Choice | None] | None = None

    def prepare(self, weight: torch.Tensor) -> None:
        """Pack now (at load, after a swap) instead of inside the next decode step, for the paths the
        table uses (the fixed rule: MKL's, CPU fp32 only); copies no path uses are dropped."""
        used = {"packed"} if self.table is None else {c.path for c in self.table if c is not None}
        if "packed" in used and self._usable(weight):
            self._pack(weight)
        elif "packed" not in used:
            self._packed, self._version = None, -1
        if "onednn" in used and self._onednn_usable(weight):
            self._reorder(weight)
        elif "onednn" not in used:
            self._onednn, self._onednn_version = None, -1

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [rows, in], weight: [out, in] -> [rows, out]
        rows = x.shape[0]
        if self.table is not None and 0 < rows < len(self.table):
            return self.run(self.table[rows], x, weight, bias)
        if self.table is None and MIN_PACKED_ROWS <= rows <= MAX_PACKED_ROWS:
            return self.packed_linear(x, weight, bias)
        if x.dtype == torch.bfloat16 and x.dim() == 2 and x.device.type == "cpu" and rows % BF16_ROW_STEP:
            return self.run(Choice("plain", -(-rows // BF16_ROW_STEP) * BF16_ROW_STEP), x, weight, bias)
        return F.linear(x, weight, bias)

    def run(self, choice: Choice, x: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [rows, in] through one path, padded with zero rows to choice.pad_to first if that is more."""
        rows = x.shape[0]
        if choice.pad_to is not None and choice.pad_to > rows and x.dim() == 2:
            padded = x.new_zeros(choice.pad_to, x.shape[1])  # [pad_to, in]
            padded[:rows] = x
            return self.run(Choice(choice.path), padded, weight, bias)[:rows]
        if choice.path == "packed":
            return self.packed_linear(x, weight, bias)
        if choice.path == "onednn":
            return self.onednn_linear(x, weight, bias)
        return F.linear(x, weight, bias)

    def onednn_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """oneDNN's GEMM on its own (reordered) weight layout; F.linear where it does not apply. In
        bf16 it is the kernel F.linear runs, without reordering the weight on every call."""
        if not (x.dim() == 2 and x.dtype == weight.dtype and self._onednn_usable(weight)):
            return F.linear(x, weight, bias)
        self._reorder(weight)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self._onednn, bias, "none", [], "")

    def packed_linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """MKL's packed GEMM at x's own row count; F.linear where it does not apply (not CPU fp32 2-D)."""
        if not (x.dim() == 2 and x.dtype == weight.dtype and self._usable(weight)):
            return F.linear(x, weight, bias)
        self._pack(weight)
        # The last argument is the row count the packed path runs for (else _mkl_linear falls
        # back to the plain weight): this batch's own.
        return torch.ops.mkl._mkl_linear(x.contiguous(), self._packed, weight, bias, x.shape[0])

    def _pack(self, weight: torch.Tensor) -> None:
        if self._packed is None or self._version != weight._version:
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS)
            self._version = weight._version

    def _reorder(self, weight: torch.Tensor) -> None:
        if self._onednn is None or self._onednn_version != weight._version:
            self._onednn = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
            self._onednn_version = weight._version

    @staticmethod
    def _onednn_usable(weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype in ONEDNN_DTYPES and onednn_available()

    @staticmethod
    def _usable(weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and mkl_packing_available()
