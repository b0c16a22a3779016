"""scripts/lm_eval_check.py's verdict, pure (the live run is tests/e2e/test_lm_eval.py): agreement
needs every choice's loglikelihood within the tolerance, the same pick per item and equal accuracy."""

from __future__ import annotations

import pytest

from tests.script_modules import loaded_script


@pytest.fixture(scope="module")
def check():
    with loaded_script("lm_eval_check") as module:
        yield module


def run(lls: dict[int, list[float]], acc: float = 0.5) -> dict:
    return {"acc": acc, "acc_norm": acc, "items": {i: {"target": 0, "ll": ll, "greedy": [False] * len(ll)}
                                                  for i, ll in lls.items()}}


def test_agreement_within_the_tolerance(check):
    report = check.compare(run({0: [-1.0, -2.0], 1: [-3.0, -0.5]}), run({0: [-1.0004, -2.0], 1: [-3.0, -0.5]}), 1e-3)
    assert report["ok"] and report["max_abs_diff"] == pytest.approx(4e-4)
    assert [r["api_choice"] for r in report["items"]] == [0, 1]


@pytest.mark.parametrize("api, acc", [
    ({0: [-1.0, -2.0], 1: [-3.0, -0.502]}, 0.5),  # one loglikelihood off by 2e-3
    ({0: [-1.0, -2.0], 1: [-3.0, -0.5]}, 1.0),  # accuracies differ
])
def test_disagreement(check, api, acc):
    assert not check.compare(run(api, acc), run({0: [-1.0, -2.0], 1: [-3.0, -0.5]}), 1e-3)["ok"]


def test_the_task_reads_the_local_data(check):
    config = check.task_config(check.DATA)
    assert config["dataset_path"] == "json" and config["dataset_kwargs"]["data_files"]["test"] == str(check.DATA)
    assert check.DATA.exists() and len(check.DATA.read_text().splitlines()) == 6
