"""lm-evaluation-harness against the live stack: scripts/lm_eval_check.py scores a small local
multiple-choice task with lm-eval's `local-completions` model through /v1/completions (echo,
logprobs 1, token-id prompts) and with lm-eval's `hf` backend on the same model directory; every
item's per-choice loglikelihood agrees within 1e-3 and the accuracy is equal. Offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hotswap import keys
from scheduler.queues import Queues

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[2]


def test_lm_eval_local_completions_agrees_with_its_hf_backend(live_stack, demo_model_dir, tmp_path):
    out = tmp_path / "lm_eval.json"
    env = {**os.environ, "OPENAI_API_KEY": live_stack.key, "HF_HOME": str(tmp_path / "hf")}  # a fresh datasets cache
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "lm_eval_check.py"), "--base-url", live_stack.url,
                           "--model", "smollm2-135m-instruct", "--model-dir", str(demo_model_dir), "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["max_abs_diff"] <= 1e-3
    assert len(report["items"]) == 6 and all(len(r["api"]) == 4 for r in report["items"])
    assert report["acc"]["api"] == report["acc"]["hf"] and report["acc_norm"]["api"] == report["acc_norm"]["hf"]
    # The API did the scoring: one echo request per (item, choice), as lm-eval sends them.
    queues = Queues(live_stack.redis)
    specs = [queues.spec(keys.text(k).removeprefix(keys.request(""))) for k in
             live_stack.redis.scan_iter(match=keys.request("*"), count=1000)]
    scored = [s for s in specs if s is not None and s.echo and s.sampling.prompt_logprobs == 1]
    assert len(scored) == 24 and all(s.sampling.max_tokens == 1 for s in scored)
