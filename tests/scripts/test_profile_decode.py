"""scripts/profile_decode.py at a tiny size: decode-only steps profiled, ops split into parts (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from tests.script_modules import loaded_script


@pytest.fixture(scope="module")
def script():
    with loaded_script("profile_decode") as module:
        yield module


@pytest.mark.parametrize("op, part", [("aten::mm", "matmul"), ("mkl::_mkl_linear", "matmul"), ("aten::bmm", "matmul"),
                                      ("aten::index_select", "attention"), ("aten::silu", "other"),
                                      ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention")])
def test_ops_are_split_into_parts(script, op, part):
    assert script.category(op) == part


def test_tiny_profile_writes_json(script, demo_model_dir, tmp_path, monkeypatch):
    from hotswap.settings import get_settings

    monkeypatch.setenv("HOTSWAP_CPU_TUNING", "off")  # the paths are not what this test is about
    get_settings.cache_clear()
    out = tmp_path / "p.json"
    try:
        report = script.main(["--model", str(demo_model_dir), "--seqs", "2", "--prompt", "8", "--steps", "2",
                              "--dtype", "float32", "--json", str(out)])
    finally:
        get_settings.cache_clear()
    assert json.loads(out.read_text())["seqs"] == 2
    assert report["self_ms_by_category"]["matmul"] > 0 and report["ops"]
    assert report["cpu_paths"]["source"].startswith("fixed")
