"""Score a small local multiple-choice task with lm-evaluation-harness twice and compare: through a
running hotswap's /v1/completions with lm-eval's `local-completions` model (what it sends: token-id
prompts, echo, logprobs 1, max_tokens 1; it reads token_logprobs[ctxlen:-1] and checks greediness
against max(top_logprobs)), and with lm-eval's own `hf` backend on the same model directory. Every
item's per-choice loglikelihood must agree within --tol and the accuracy be equal.

Offline: the data is scripts/lm_eval_data/mc.jsonl (or --data), Hugging Face hub and datasets are
set offline, lm-eval's built-in task index is not loaded, and the tokenizer is the local model dir.

    OPENAI_API_KEY=hs-... python scripts/lm_eval_check.py --base-url http://127.0.0.1:8000 \\
        --model smollm2-135m-instruct --model-dir ~/.cache/hotswap/models/smollm2-135m-instruct

Prints a per-item table; --out writes the numbers as JSON. Exit status 0 when both agree, 1 if not.
Needs `pip install "lm-eval[api]"` and transformers (the hf backend), so it runs where the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

TASK = "hotswap_mc"
DATA = Path(__file__).resolve().parent / "lm_eval_data" / "mc.jsonl"


def task_config(data: Path) -> dict:
    """An lm-eval multiple-choice task over a local jsonl: {"question", "choices", "label"} per line."""
    return {"task": TASK, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "output_type": "multiple_choice", "test_split": "test",
            "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def evaluate(model: str, model_args: dict, data: Path) -> dict:
    """{"acc", "acc_norm", "items": {doc_id: {"target", "ll": [per choice], "greedy": [...]}}}."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[task_config(data)],
                          task_manager=TaskManager(include_defaults=False), log_samples=True, bootstrap_iters=0)
    items = {}
    for sample in out["samples"][TASK]:
        scores = sample["filtered_resps"]  # one (loglikelihood, is_greedy) per choice
        items[sample["doc_id"]] = {"target": sample["target"], "ll": [float(s[0]) for s in scores],
                                   "greedy": [bool(s[1]) for s in scores]}
    results = out["results"][TASK]
    return {"acc": results["acc,none"], "acc_norm": results["acc_norm,none"], "items": items}


def compare(api: dict, hf: dict, tol: float) -> dict:
    rows, worst = [], 0.0
    for doc_id in sorted(hf["items"]):
        a, h = api["items"][doc_id], hf["items"][doc_id]
        diff = max(abs(x - y) for x, y in zip(a["ll"], h["ll"]))
        worst = max(worst, diff)
        rows.append({"doc_id": doc_id, "target": h["target"], "api": a["ll"], "hf": h["ll"], "max_abs_diff": diff,
                     "api_greedy": a["greedy"], "hf_greedy": h["greedy"],
                     "api_choice": a["ll"].index(max(a["ll"])), "hf_choice": h["ll"].index(max(h["ll"]))})
    ok = (worst <= tol and api["acc"] == hf["acc"] and api["acc_norm"] == hf["acc_norm"]
          and len(api["items"]) == len(hf["items"]) and all(r["api_choice"] == r["hf_choice"] for r in rows))
    return {"ok": ok, "tol": tol, "max_abs_diff": worst, "items": rows,
            "acc": {"api": api["acc"], "hf": hf["acc"]}, "acc_norm": {"api": api["acc_norm"], "hf": hf["acc_norm"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", required=True, help="the hotswap API, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", required=True, help="the model name to call (base, adapter, ...)")
    parser.add_argument("--model-dir", required=True, type=Path, help="the base model's HF directory (tokenizer, hf backend)")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per /v1/completions call")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"  # before lm_eval, datasets or transformers are imported
    if not os.environ.get("OPENAI_API_KEY"):
        parser.error("set OPENAI_API_KEY to a hotswap API key (lm-eval's local-completions sends it)")

    api = evaluate("local-completions", {
        "model": args.model, "base_url": args.base_url.rstrip("/") + "/v1/completions",
        "tokenizer_backend": "huggingface", "tokenizer": str(args.model_dir), "batch_size": args.batch_size,
        "max_retries": 1, "timeout": 600}, args.data)
    hf = evaluate("hf", {"pretrained": str(args.model_dir), "dtype": "float32", "device": "cpu",
                         "batch_size": args.batch_size}, args.data)
    report = compare(api, hf, args.tol)
    print(f"{'item':>4} {'target':>6} {'choice api/hf':>13} {'max |diff|':>10}  loglikelihoods (api | hf)")
    for r in report["items"]:
        lls = " ".join(f"{x:9.4f}" for x in r["api"]) + " | " + " ".join(f"{x:9.4f}" for x in r["hf"])
        print(f"{r['doc_id']:>4} {r['target']:>6} {r['api_choice']:>6}/{r['hf_choice']:<6} {r['max_abs_diff']:10.2e}  {lls}")
    print(f"acc: api {report['acc']['api']:.4f}, hf {report['acc']['hf']:.4f}; acc_norm: api "
          f"{report['acc_norm']['api']:.4f}, hf {report['acc_norm']['hf']:.4f}; max |diff| "
          f"{report['max_abs_diff']:.2e} (tolerance {args.tol:g}): {'AGREE' if report['ok'] else 'DISAGREE'}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
