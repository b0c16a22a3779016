"""Measuring the CPU paths at load: cached per machine kind, re-measured on demand, off on demand;
whatever is chosen computes what F.linear computes."""

import json

import pytest
import torch
import torch.nn.functional as F

from worker.models import cpu_tuning, cpu_tuning_store
from worker.models.cpu_linear import PackedWeight, mkl_packing_available, onednn_available
from worker.models.cpu_plan import Choice, buckets_for

SHAPES = [(96, 40), (96, 40), (40, 96)]  # two layers of one shape, one of another


def make_sites(dtype=torch.float32):
    torch.manual_seed(0)
    return [(f"layers.{i}.proj", torch.randn(*shape, dtype=dtype), PackedWeight()) for i, shape in enumerate(SHAPES)]


@pytest.fixture
def fake_measure(monkeypatch):
    """measure() replaced by a table where 3 rows pad to 4 and plain wins elsewhere; counts calls."""
    class Calls(list):
        noise = 0.1

    calls = Calls()

    def measure(groups, buckets, paths, budget_s=None):
        calls.append(sorted(groups))
        timings = {p: {r: (5.0 if r == 3 else float(r)) * (1.0 if p == "plain" else 1.5) for r in buckets} for p in paths}
        return {cpu_tuning_store.shape_name(s): timings for s in groups}, calls.noise

    monkeypatch.setattr(cpu_tuning, "measure", measure)
    return calls


def test_measures_once_then_reads_the_cache(tmp_path, fake_measure):
    sites = make_sites()
    first = cpu_tuning.tune_model(sites, 8, "auto", tmp_path)
    assert fake_measure == [[(40, 96), (96, 40)]] and first["source"].startswith("measured")
    [stored] = tmp_path.glob("*.json")
    assert first["cache"] == str(stored)
    assert json.loads(stored.read_text())["key"]["threads"] == torch.get_num_threads()
    again = cpu_tuning.tune_model(make_sites(), 8, "auto", tmp_path)
    assert len(fake_measure) == 1 and again["source"] == "cached" and again["shapes"] == first["shapes"]
    assert first["shapes"]["96x40 (proj)"] == {"1-2": "plain", "3": "plain@4", "4-8": "plain"}
    assert sites[0][2].table[3] == Choice("plain", 4) and sites[0][2].table is sites[1][2].table


def test_more_rows_than_cached_measure_again(tmp_path, fake_measure):
    cpu_tuning.tune_model(make_sites(), 4, "auto", tmp_path)
    cpu_tuning.tune_model(make_sites(), 16, "auto", tmp_path)
    cpu_tuning.tune_model(make_sites(), 8, "auto", tmp_path)  # fewer rows: a subset of what is stored
    assert len(fake_measure) == 2


def test_remeasure_and_off(tmp_path, fake_measure):
    cpu_tuning.tune_model(make_sites(), 8, "auto", tmp_path)
    cpu_tuning.tune_model(make_sites(), 8, "remeasure", tmp_path)
    assert len(fake_measure) == 2
    sites = make_sites()
    off = cpu_tuning.tune_model(sites, 8, "off", tmp_path)
    assert len(fake_measure) == 2 and all(packed.table is None for _, _, packed in sites)
    expected = {"1-3": "plain", "4-8": "packed"} if mkl_packing_available() else {"1-8": "plain"}
    assert off["shapes"]["96x40 (proj)"] == expected
    with pytest.raises(ValueError, match="cpu_tuning"):
        cpu_tuning.tune_model(sites, 8, "sometimes", tmp_path)


def test_noisy_timings_are_used_but_not_stored(tmp_path, fake_measure):
    fake_measure.noise = 2.0
    out = cpu_tuning.tune_model(make_sites(), 8, "auto", tmp_path)
    assert "too noisy" in out["source"] and out["cache"] is None and not list(tmp_path.glob("*.json"))


def test_without_a_cache_dir_the_process_remembers(fake_measure):
    cpu_tuning_store._MEMORY.clear()
    cpu_tuning.tune_model(make_sites(), 8, "auto", None)
    cpu_tuning.tune_model(make_sites(), 8, "auto", None)
    assert len(fake_measure) == 1


def test_the_key_names_the_machine_kind():
    key = cpu_tuning_store.tuning_key("float32", 2)
    assert set(key) == {"cpu", "flags", "torch", "threads", "dtype"}
    other = cpu_tuning_store.key_id({**key, "threads": 4})
    assert cpu_tuning_store.key_id(key) != other and "-t2-float32-" in cpu_tuning_store.key_id(key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_measurement_covers_every_cell(dtype):
    sites = make_sites(dtype)
    groups = cpu_tuning.group_sites(sites)
    paths = cpu_tuning.candidate_paths(dtype)
    assert ("packed" in paths) == (dtype == torch.float32 and mkl_packing_available())
    assert ("onednn" in paths) == onednn_available()
    timings, noise = cpu_tuning.measure(groups, buckets_for(6), paths, budget_s=0.01)
    assert set(timings) == {"96x40", "40x96"} and noise >= 0
    assert all(set(timings["96x40"][p]) == set(range(1, 7)) and min(timings["96x40"][p].values()) > 0 for p in paths)


def test_tuned_weights_compute_f_linear(monkeypatch):
    """Whatever the (noisy) measurement picks, every row count gives F.linear's result."""
    monkeypatch.setattr(cpu_tuning, "BUDGET_S", 0.05)
    cpu_tuning_store._MEMORY.clear()
    sites = make_sites()
    cpu_tuning.tune_model(sites, 16, "remeasure", None)
    for rows in range(1, 20):
        x = torch.randn(rows, 40)
        torch.testing.assert_close(sites[0][2].linear(x, sites[0][1]), F.linear(x, sites[0][1]), rtol=1e-5, atol=1e-5)
