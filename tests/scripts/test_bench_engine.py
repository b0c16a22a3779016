"""scripts/bench_engine.py end to end at a tiny size: both sides run and count the same tokens (no timing asserts)."""

from __future__ import annotations

import json

import pytest

from tests.script_modules import loaded_script

TINY = ["--num-requests", "4", "--min-prompt", "16", "--max-prompt", "32", "--min-tokens", "4", "--max-tokens", "8",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from hotswap.settings import get_settings

    with pytest.MonkeyPatch.context() as mp:  # CPU path timings of a busy test machine: not in the user's cache
        mp.setenv("HOTSWAP_CPU_TUNING_DIR", str(tmp_path_factory.mktemp("cpu-tuning")))
        get_settings.cache_clear()
        with loaded_script("bench_engine") as module:
            yield module
    get_settings.cache_clear()


def check_sides(report: dict, max_tokens_sum: int) -> None:
    for side in ("transformers", "engine"):
        figures = report[side]
        assert figures["generated_tokens"] == max_tokens_sum, side
        assert figures["tokens_per_s"] > 0 and figures["wall_s"] > 0, side
    assert report["transformers"]["computed_tokens"] >= max_tokens_sum
    assert report["engine"]["steps"] >= 1
    assert report["ratio"] > 0


def test_workload_is_seeded_and_in_range(bench):
    a = bench.make_workload(1000, 8, (16, 32), (4, 8), seed=3)
    assert a == bench.make_workload(1000, 8, (16, 32), (4, 8), seed=3)
    assert a != bench.make_workload(1000, 8, (16, 32), (4, 8), seed=4)
    assert all(16 <= len(p) <= 32 and min(p) >= 10 and max(p) < 1000 for p in a.prompts)
    assert all(4 <= m <= 8 for m in a.max_tokens)


def test_demo_model_both_sides_json(bench, demo_model_dir, tmp_path):
    out = tmp_path / "bench.json"
    returned = bench.main(["--model", str(demo_model_dir), "--json", str(out), *TINY])
    report = json.loads(out.read_text())
    workload = bench.make_workload(report["config"]["vocab_size"], 4, (16, 32), (4, 8), seed=0)
    assert report["config"]["generated_tokens"] == sum(workload.max_tokens)
    check_sides(report, sum(workload.max_tokens))
    assert report["engine"]["decode_floor"] is None  # CUDA only
    assert report["config"]["cpu"]["cpu_model"] and "avx2" in report["config"]["cpu"]["isa"]
    assert report["engine"]["cpu_paths"]["dtype"] == report["config"]["dtype"]
    assert set(report["engine"]["cpu_paths"]["shapes"]) >= {"960x576 (qkv_proj)", "49152x576 (lm_head)"}
    assert returned["ratio"] == pytest.approx(report["ratio"])


def test_random_model_path(bench, tmp_path):
    """The --random-model path (a tiny Llama-3 shape here; llama3-8b is the same code on a GPU)."""
    report = bench.main(["--random-model", "llama3-tiny", "--json", str(tmp_path / "r.json"), *TINY])
    vocab = bench.RANDOM_MODELS["llama3-tiny"]["vocab_size"]
    check_sides(report, sum(bench.make_workload(vocab, 4, (16, 32), (4, 8), seed=0).max_tokens))
    assert report["config"]["model_name"] == "llama3-tiny"


def test_adapters_mode_runs_peft_and_both_engine_sides(bench, tmp_path):
    out = tmp_path / "bench-adapters.json"
    report = bench.main([*TINY, "--adapters", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    max_tokens_sum = saved["config"]["generated_tokens"]
    check_sides(saved, max_tokens_sum)
    assert saved["engine_base_only"]["generated_tokens"] == max_tokens_sum
    assert saved["mixed_vs_base"] > 0
    assert sum(saved["requests_per_adapter"].values()) == 4
    assert report["config"]["adapters"] == 3


def test_shared_prefix_workload_and_ttft_sample(bench):
    workload, system_of = bench.make_shared_prefix_workload(1000, 12, 3, (20, 30), (4, 8), (2, 4), seed=5)
    assert (workload, system_of) == bench.make_shared_prefix_workload(1000, 12, 3, (20, 30), (4, 8), (2, 4), seed=5)
    assert all(24 <= len(p) <= 38 for p in workload.prompts)
    same = [p for p, k in zip(workload.prompts, system_of) if k == system_of[0]]
    assert len({tuple(p[:20]) for p in same}) == 1  # one system prompt, whatever the suffix
    warm, sample = bench.ttft_sample(system_of, size=4)
    assert len(sample) == 4 and all(system_of[i] in {system_of[w] for w in warm if w < i} for i in sample)
    assert all(system_of[w] not in {system_of[j] for j in range(w)} for w in warm)
    assert bench.ttft_sample(["a", "b", "a", ("a", "x"), "b", ("a", "x")], size=3) == ([0, 1, 3], [2, 4, 5])


def test_shared_prefix_mode_runs_all_three_sides(bench, tmp_path):
    out = tmp_path / "shared.json"
    bench.main(["--shared-prefix", "--random-model", "llama3-tiny", "--device", "cpu", "--num-requests", "10",
                "--num-system-prompts", "2", "--min-system", "40", "--max-system", "60", "--min-prompt", "4",
                "--max-prompt", "8", "--min-tokens", "2", "--max-tokens", "4", "--adapters", "1", "--max-in-flight", "2",
                "--json", str(out)])  # 2 in flight: later requests are admitted after their prefix is cached
    report = json.loads(out.read_text())
    total = report["config"]["generated_tokens"]
    cache, off = report["engine"], report["engine_no_cache"]
    assert cache["generated_tokens"] == off["generated_tokens"] == report["transformers"]["generated_tokens"] == total
    assert cache["prefix_caching"] and not off["prefix_caching"]
    assert off["cached_prompt_tokens"] == 0 < cache["cached_prompt_tokens"] and 0 < report["hit_rate"] < 1
    assert len(cache["sequential_ttft_s"]) == len(off["sequential_ttft_s"]) == report["config"]["ttft_sample"] > 0
    assert report["cache_vs_off"] > 0 and report["ttft_ratio"] > 0 and set(report["goals"]) == {"cache_vs_off", "ttft_ratio"}
    assert sum(report["requests_per_adapter"].values()) == 10


def test_no_prefix_caching_flag_reaches_the_engine(bench, tmp_path):
    report = bench.main(["--random-model", "llama3-tiny", "--skip-hf", "--no-prefix-caching", *TINY])
    assert report["engine"]["prefix_caching"] is False and report["engine"]["cached_prompt_tokens"] == 0


def test_prefix_overhead_runs_both_settings_alternately(bench, tmp_path):
    out = tmp_path / "o.json"
    report = bench.main(["--random-model", "llama3-tiny", "--skip-hf", "--prefix-overhead", "--json", str(out), *TINY])
    overhead = report["prefix_overhead"]
    assert len(overhead["on_tokens_per_s"]) == len(overhead["off_tokens_per_s"]) == 2
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert abs(overhead["on_vs_off"] - mean(overhead["on_tokens_per_s"]) / mean(overhead["off_tokens_per_s"])) < 1e-9
    assert report["engine"]["prefix_caching"] is True  # the table shows the last run with caching on
    assert json.loads(out.read_text())["prefix_overhead"]["on_vs_off"] == overhead["on_vs_off"]
