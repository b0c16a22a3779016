"""PackedWeight: MKL's packed GEMM for decode-sized CPU batches gives F.linear's results."""

import pytest
import torch
import torch.nn.functional as F

from worker.models.cpu_linear import MAX_PACKED_ROWS, MIN_PACKED_ROWS, PACK_ROWS, PackedWeight, mkl_packing_available

needs_mkl = pytest.mark.skipif(not mkl_packing_available(), reason="torch built without MKL")


@needs_mkl
@pytest.mark.parametrize("rows", [1, MIN_PACKED_ROWS - 1, MIN_PACKED_ROWS, 7, 13, PACK_ROWS, PACK_ROWS + 1, 23,
                                  MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_plain_linear(rows, with_bias):
    torch.manual_seed(rows)
    weight, x = torch.randn(96, 40), torch.randn(rows, 40)
    bias = torch.randn(96) if with_bias else None
    out = PackedWeight().linear(x, weight, bias)
    assert out.shape == (rows, 96)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@needs_mkl
def test_one_pack_serves_every_packed_row_count():
    """The weight is packed once (for PACK_ROWS) and computes batches of any packed size."""
    torch.manual_seed(0)
    weight = torch.randn(300, 72)
    packed = PackedWeight()
    packed.prepare(weight)
    first = packed._packed
    for rows in range(MIN_PACKED_ROWS, MAX_PACKED_ROWS + 1):
        x = torch.randn(rows, 72)
        torch.testing.assert_close(packed.linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert packed._packed is first  # never repacked for another row count


@needs_mkl
def test_repacks_after_in_place_weight_change():
    """A full fine-tune is copied into the weights in place: the packed copy must follow."""
    torch.manual_seed(1)
    weight, x = torch.randn(48, 24), torch.randn(8, 24)
    packed = PackedWeight()
    before = packed.linear(x, weight)
    with torch.no_grad():
        weight.copy_(torch.randn(48, 24))
    after = packed.linear(x, weight)
    torch.testing.assert_close(after, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)


def test_other_dtypes_take_the_plain_path():
    weight, x = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(8, 8, dtype=torch.bfloat16)
    assert torch.equal(PackedWeight().linear(x, weight), F.linear(x, weight))
