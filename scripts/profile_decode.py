"""Where a CPU decode step's time goes besides the matmuls: torch.profiler over decode-only steps.

Fills the engine with --seqs running sequences (prefill done), then profiles --steps decode steps
and prints the top ops by self CPU time, plus the step's time split into matmuls, the K/V gather
and attention, and the rest (per-layer small ops: norms, rope, SiLU, adds, copies). OpenMP
synchronisation shows up inside the multi-threaded ops' times; run with --threads 1 to compare.

    python scripts/profile_decode.py --quick                 # 8 sequences, 4 profiled steps
    python scripts/profile_decode.py --seqs 16 --steps 16 --dtype bfloat16 --json profile.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

# aten op name -> the part of a step it belongs to (first match wins; the rest is "other")
CATEGORIES = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_mkl_linear", "aten::matmul", "mkl::", "mkldnn::")),
    ("attention", ("aten::_scaled_dot_product", "aten::index_select", "aten::gather", "aten::index_put",
                   "aten::_flash_attention", "aten::_efficient_attention")),
)


def category(name: str) -> str:
    return next((cat for cat, prefixes in CATEGORIES if name.startswith(prefixes)), "other")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="HF model dir (default: the demo model)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--seqs", type=int, default=16, help="running sequences (the decode batch)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=16, help="decode steps profiled")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--top", type=int, default=25, help="ops listed")
    p.add_argument("--quick", action="store_true", help="8 sequences of 64 tokens, 4 steps")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.seqs, args.prompt, args.steps = 8, 64, 4
    return args


def filled_engine(args: argparse.Namespace, model_dir: Path):
    """An engine whose next steps are decode-only for args.seqs sequences."""
    from hotswap.settings import get_settings
    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.engine.sampling_params import SamplingParams

    settings = get_settings()
    engine = LLMEngine(EngineConfig(model=model_dir, device="cpu", dtype=args.dtype, max_num_seqs=args.seqs,
                                    max_num_batched_tokens=max(1024, args.seqs), kv_cache_gb=0.25,
                                    cpu_tuning=settings.cpu_tuning,
                                    cpu_tuning_cache=settings.resolved_cpu_tuning_dir))
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    for _ in range(args.seqs):
        engine.add_request([rng.randrange(10, vocab) for _ in range(args.prompt)], params)
    while not all(s.num_uncomputed == 1 for s in engine.batcher.running) or engine.batcher.waiting:
        engine.step()
    for _ in range(2):  # warm decode steps
        engine.step()
    return engine


def profile(engine, steps: int) -> tuple[list[dict], float]:
    """Per-op self CPU time (ms per step), top first, and the mean step wall time (ms)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall_ms = 1e3 * (time.perf_counter() - start) / steps
    ops = [{"op": e.key, "category": category(e.key), "calls_per_step": e.count / steps,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps}
           for e in prof.key_averages() if e.self_cpu_time_total > 0]
    return sorted(ops, key=lambda o: -o["self_ms_per_step"]), wall_ms


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is None:
        from hotswap.demo_model import fetch_demo_model

        args.model = fetch_demo_model(log=lambda m: print(m, file=sys.stderr))
    engine = filled_engine(args, Path(args.model))
    ops, wall_ms = profile(engine, args.steps)
    split: dict[str, float] = {}
    for op in ops:
        split[op["category"]] = split.get(op["category"], 0.0) + op["self_ms_per_step"]
    from worker.models.cpu_facts import cpu_facts

    report = {"cpu": cpu_facts(), "dtype": str(engine.dtype).removeprefix("torch."), "seqs": args.seqs,
              "prompt": args.prompt, "steps": args.steps, "step_wall_ms": wall_ms, "self_ms_by_category": split,
              "ops": ops[:args.top], "cpu_paths": engine.cpu_paths}
    print(f"{report['cpu']['cpu_model']}, {report['cpu']['torch_threads']} threads, {report['dtype']}, "
          f"{args.seqs} sequences at ~{args.prompt} tokens: decode step {wall_ms:.1f} ms (under the profiler)")
    print("self CPU ms per step: " + ", ".join(f"{c} {ms:.1f}" for c, ms in sorted(split.items(), key=lambda x: -x[1])))
    print(f"{'op':42} {'calls/step':>10} {'self ms/step':>12}  part")
    for op in ops[:args.top]:
        print(f"{op['op'][:42]:42} {op['calls_per_step']:10.0f} {op['self_ms_per_step']:12.2f}  {op['category']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
