"""Decode-sized matmuls on CPU through MKL's packed-weight GEMM.

On CPU a decode step multiplies every weight by only a few rows (one per running sequence), and
MKL's plain sgemm handles that shape poorly: on this project's AVX-512 machines a 13-row product
costs almost twice a 16-row one, and even 16 rows run ~1.7x faster once the weight is packed
into MKL's own layout. So each CPU fp32 weight keeps a second copy packed for 16 rows; a batch
of 4..16 rows is zero-padded to 16 and runs packed (rows never mix, so the padding changes no
result). Smaller batches, bigger ones (prefill chunks) and every GPU tensor take the plain GEMM.

The packed copy follows the weight by its version counter (`Tensor._version`, bumped by every
in-place write): a full fine-tune copied in place repacks at the engine's next `prepack()` or on
next use, never runs with stale weights. It costs one more copy of the weights in host memory.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

PACK_ROWS = 16  # the row count MKL packs for; it runs the packed path for exactly this many rows
MIN_PACKED_ROWS = 4  # below this the plain GEMM is as fast (MKL's tiny-M kernel)


@functools.cache
def mkl_packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedWeight:
    """The MKL-packed copy of one weight, made on first use and redone whenever the weight changes."""

    def __init__(self):
        self._packed: torch.Tensor | None = None
        self._version = -1

    def prepare(self, weight: torch.Tensor) -> None:
        """Pack now (at load, after a swap) instead of inside the next decode step; no-op off CPU fp32."""
        if self._usable(weight):
            self._pack(weight)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # x: [rows, in], weight: [out, in] -> [rows, out]
        rows = x.shape[0]
        if not (MIN_PACKED_ROWS <= rows <= PACK_ROWS and x.dim() == 2 and x.dtype == weight.dtype
                and self._usable(weight)):
            return F.linear(x, weight, bias)
        self._pack(weight)
        if rows < PACK_ROWS:
            x = F.pad(x, (0, 0, 0, PACK_ROWS - rows))  # [PACK_ROWS, in]
        out = torch.ops.mkl._mkl_linear(x.contiguous(), self._packed, weight, bias, PACK_ROWS)
        return out[:rows]

    def _pack(self, weight: torch.Tensor) -> None:
        if self._packed is None or self._version != weight._version:
            self._packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), PACK_ROWS)
            self._version = weight._version

    @staticmethod
    def _usable(weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.dtype == torch.float32 and mkl_packing_available()
