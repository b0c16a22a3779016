"""PackedWeight: MKL's packed GEMM for decode-sized CPU batches, and padded runs, give F.linear's results.

Tolerance rtol=atol=1e-5, not bit equality: MKL picks its kernel by row count, so on some CPUs
(this project's Zen 3 dev box) even plain F.linear on 5 rows and on the same rows padded to 8
differ in the last bits (~1e-6 relative); from 13 rows up, and at 4, they were bit-identical there."""

import pytest
import torch
import torch.nn.functional as F

from worker.models.cpu_linear import (MAX_PACKED_ROWS, MIN_PACKED_ROWS, PACK_ROWS, PackedWeight, mkl_packing_available,
                                     onednn_available)
from worker.models import cpu_linear
from worker.models.cpu_plan import Choice

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


@needs_mkl
@pytest.mark.parametrize("choice", [Choice("plain"), Choice("packed"), Choice("plain", 16), Choice("packed", 16),
                                    Choice("packed", 64), Choice("onednn"), Choice("onednn", 16)])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 9, 13, 16])
def test_every_path_matches_plain_linear(choice, rows):
    torch.manual_seed(rows)
    weight, x, bias = torch.randn(96, 40), torch.randn(rows, 40), torch.randn(96)
    out = PackedWeight().run(choice, x, weight, bias)
    assert out.shape == (rows, 96) and out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_table_routes_each_row_count(monkeypatch):
    """rows -> table[rows]: padded where it says so; beyond the table, plain at the rows given."""
    seen = []

    class Spy:
        @staticmethod
        def linear(x, w, b=None):
            seen.append(x.shape[0])
            return F.linear(x, w, b)

    monkeypatch.setattr(cpu_linear, "F", Spy)
    packed = PackedWeight()
    packed.table = [None, Choice("plain"), Choice("plain", 4), Choice("plain", 4), Choice("plain")]
    weight = torch.randn(8, 6)
    for rows in (1, 2, 3, 4, 5, 40):
        packed.linear(torch.randn(rows, 6), weight)
    assert seen == [1, 4, 4, 4, 5, 40]


def test_bf16_runs_plain_whatever_the_choice():
    weight, x = torch.randn(16, 8, dtype=torch.bfloat16), torch.randn(5, 8, dtype=torch.bfloat16)
    packed = PackedWeight()
    assert torch.equal(packed.run(Choice("packed"), x, weight), F.linear(x, weight))
    assert packed._packed is None


needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 16, 300])
def test_onednn_matches_plain_linear_in_bf16(rows):
    """bf16: oneDNN's GEMM is the kernel F.linear runs, so only the weight's layout differs."""
    torch.manual_seed(rows)
    weight, x, bias = (torch.randn(96, 40).bfloat16(), torch.randn(rows, 40).bfloat16(), torch.randn(96).bfloat16())
    out = PackedWeight().run(Choice("onednn"), x, weight, bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1.6e-2, atol=1e-2)


@needs_onednn
def test_reorders_after_in_place_weight_change():
    torch.manual_seed(2)
    weight, x = torch.randn(48, 24), torch.randn(8, 24)
    packed = PackedWeight()
    before = packed.onednn_linear(x, weight)
    with torch.no_grad():
        weight.copy_(torch.randn(48, 24))
    torch.testing.assert_close(packed.onednn_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, packed.onednn_linear(x, weight))


@needs_mkl
@needs_onednn
def test_prepare_keeps_only_the_copies_the_table_uses():
    weight = torch.randn(48, 24)
    packed = PackedWeight()
    packed.prepare(weight)  # no table: the fixed rule's MKL copy
    assert packed._packed is not None and packed._onednn is None
    packed.table = [None, Choice("plain"), Choice("onednn", 4), Choice("onednn", 4), Choice("onednn")]
    packed.prepare(weight)
    assert packed._packed is None and packed._onednn is not None
    packed.table = [None, Choice("plain")]
    packed.prepare(weight)
    assert packed._packed is None and packed._onednn is None


def test_bf16_batches_beyond_the_table_are_padded_to_a_row_step(monkeypatch):
    """Prefill-sized bf16 batches run at a multiple of BF16_ROW_STEP rows (oneDNN keeps a kernel
    per row count), and give the unpadded rows' results."""
    seen = []
    real_linear = F.linear

    class Spy:
        @staticmethod
        def linear(x, w, b=None):
            seen.append(x.shape[0])
            return real_linear(x, w, b)

    monkeypatch.setattr(cpu_linear, "F", Spy)
    torch.manual_seed(0)
    weight = torch.randn(24, 8, dtype=torch.bfloat16)
    packed = PackedWeight()
    packed.table = [None] + [Choice("plain")] * 4
    for rows in (0, 3, 17, 32, 33):
        x = torch.randn(rows, 8, dtype=torch.bfloat16)
        out = packed.linear(x, weight)
        assert out.shape == (rows, 24)
        torch.testing.assert_close(out, real_linear(x, weight))
    step = cpu_linear.BF16_ROW_STEP
    assert seen == [0, 3, -(-17 // step) * step, 32, -(-33 // step) * step]
