"""scripts/bench_serving.py: one tiny run against a live local stack (no timing asserts); its
pieces (workload, client, metrics) are tested in test_benchkit.py."""

from __future__ import annotations

import argparse
import json

import pytest

from tests.script_modules import loaded_script


@pytest.fixture(scope="module")
def bench():
    with loaded_script("bench_serving", "_stack") as module:
        yield module


def test_the_mixed_series_models(bench):
    def mix(models=None, zipf=None, adapters=()):
        return bench.model_mix(argparse.Namespace(models=models, zipf=zipf), "smol", list(adapters))

    assert mix() == [("smol", 1.0)]
    assert mix(adapters=["a", "b"]) == [("smol", 1.0), ("a", 1.0), ("b", 1.0)]
    assert mix(zipf=1.0, adapters=["a"]) == [("smol", 1.0), ("a", 0.5)]
    assert mix("base,x:3", adapters=["a"]) == [("smol", 1.0), ("x", 3.0)]  # --models wins over local adapters
    assert mix("x:3,base", zipf=1.0) == [("x", 1.0), ("smol", 0.5)]      # --zipf reweighs --models by order


# -- one tiny run on a live local stack ----------------------------------------------------------


def test_compare_run_on_a_local_stack_writes_json_and_plot(bench, tmp_path, demo_model_dir):
    out = tmp_path / "serving.json"
    report = bench.main(["--compare", "--no-transformers", "--adapters", "1", "--num-prompts", "3", "--shape", "8x4",
                         "--rates", "inf", "--concurrency", "2", "--slo-ttft-ms", "60000", "--gpu-hour-usd", "1",
                         "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["series"] == json.loads(json.dumps(report["series"]))
    labels = [s["label"] for s in saved["series"]]
    assert labels == ["hotswap base", "hotswap mixed"]
    assert [m for m, _ in saved["series"][1]["mix"]] == ["smollm2-135m-instruct", "lora-0"]
    for s in saved["series"]:
        (point,) = s["points"]
        m = point["metrics"]
        assert point["shape"] == {"input_len": 8, "output_len": 4} and point["rate"] is None
        assert point["concurrency"] == 2
        assert m["completed"] == 3 and m["failed"] == 0
        assert m["total_input_tokens"] == 24  # the server's prompt_tokens: the prompts are exactly 8 tokens
        assert 3 <= m["total_output_tokens"] <= 12
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert set(m[key]) == {"mean", "std", "p50", "p90", "p99"}
        assert m["output_throughput"] > 0 and m["request_goodput"] > 0 and m["usd_per_1m_output_tokens"] > 0
    assert saved["comparisons"][0]["series"] == "hotswap mixed"
    assert saved["comparisons"][0]["against"] == "hotswap base"
    assert sum(saved["series"][1]["points"][0]["metrics"]["requests_per_model"].values()) == 3
    png = out.with_suffix(".png")
    pytest.importorskip("matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
