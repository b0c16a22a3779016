"""The GPU proof: every GPU check and benchmark in one prepared run, for a GPU machine lent for minutes.

    python scripts/gpu_proof.py                        # on the GPU machine: ~8 minutes, figures in $OUT
    python scripts/gpu_proof.py --dry-run --out DIR    # the same plumbing on the CPU at tiny sizes (~1-2 min)
    python scripts/gpu_proof.py --only engine_8b_shape,swap   # rerun some steps (random models are reused)

The steps run in this order, so that a run cut short still leaves figures:

    device             versions, GPU, free disk; device copy and pinned host->device bandwidth
    gpu_tests          the `gpu`-marked tests: compiled Triton kernels against their torch references,
                       the engine against transformers (+ PEFT) on tiny random Llamas (pytest, JUnit XML)
    engine_demo_shape  bench_engine.py, a random model of the demo model's shape, engine vs transformers
    engine_8b_shape    bench_engine.py --random-model llama3-8b (bf16, batch 64): decode step vs HBM floor
    engine_adapters    bench_engine.py --adapters 8 on the 8B shape: mixed-adapter / base-only tok/s
    swap               bench_swap.py on the 8B shape: adapter loads, full swaps vs the host->device floor
    serving            bench_serving.py --fireworks, only if its packages (redis, celery, fastapi, boto3,
                       ...) and the demo tokenizer are there; else skipped with the reason

Each step is a child process with its own time limit (cut to what is left of --budget-s, so the
summary is written before an outer limit), output in OUT/<step>.log and figures in OUT/<step>.json.
A failing step does not stop the next. OUT/summary.json is rewritten after every step; the table
at the end sums up; OUT/gpu_proof.log has this console's lines. Nothing downloads: children run
with HF_HUB_OFFLINE=1 and PYTHONPATH=<repo>, and every model is random weights built from a config.
The random models go to --models-dir (not OUT: the 8B one is 16 GB), kept so a rerun reuses them.
OUT is --out, else $OUT, else ./gpu-proof-out.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
PY = sys.executable
MIN_STEP_S = 30  # a step is not started with less time left than this
NO_CUDA_EXIT = 3  # the device step's exit status on a machine without CUDA: the GPU run stops there
SERVING_PACKAGES = ["redis", "celery", "fastapi", "uvicorn", "boto3", "pydantic_settings"]
TINY_WORKLOAD = ["--num-requests", "6", "--max-in-flight", "4", "--min-prompt", "16", "--max-prompt", "40",
                 "--min-tokens", "4", "--max-tokens", "8"]
GPU_8B_WORKLOAD = ["--num-requests", "128", "--max-in-flight", "64", "--min-prompt", "128", "--max-prompt", "512",
                   "--min-tokens", "64", "--max-tokens", "256"]


@dataclass
class Run:
    out: Path
    models: Path  # random models (GBs on the GPU: never under OUT)
    dry: bool

    def json(self, step: str) -> Path:
        return self.out / f"{step}.json"

    @property
    def device_args(self) -> list[str]:
        return ["--device", "cpu", "--floor"] if self.dry else ["--device", "cuda", "--dtype", "bfloat16"]

    def shape(self, gpu_shape: str) -> str:
        return "llama3-tiny" if self.dry else gpu_shape


@dataclass
class Step:
    name: str
    title: str
    limit_s: int  # on the GPU machine
    dry_limit_s: int
    command: Callable[[Run], list[str]]
    headline: Callable[[dict], str]  # one line of the step's figures, from its JSON
    skip_reason: Callable[[Run], str | None] = lambda run: None
    after: Callable[[Run], None] | None = None  # makes the step's JSON when the child does not


@dataclass
class Result:
    name: str
    title: str
    status: str = "not run"  # passed | failed | timeout | skipped | not run
    reason: str = ""
    rc: int | None = None
    elapsed_s: float = 0.0
    limit_s: int | None = None
    command: list[str] = field(default_factory=list)
    log: str = ""
    json: str = ""
    headline: str = ""


# -- the steps --------------------------------------------------------------------------------------


def device_command(run: Run) -> list[str]:
    return [PY, str(Path(__file__).resolve()), "--probe", str(run.json("device")),
            *(["--dry-run"] if run.dry else [])]


def device_headline(d: dict) -> str:
    spec = f" (spec {d['spec_hbm_gb_s']:.0f})" if d.get("spec_hbm_gb_s") else ""
    return (f"{d['device_name']}: copy {d['copy_gb_s']:.0f} GB/s{spec}, host->device {d['h2d_gb_s']:.1f} GB/s, "
            f"torch {d['torch']}, triton {d['triton']}")


def gpu_test_files() -> list[str]:
    """Every test file with a `gpu`-marked test."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text())


def gpu_tests_command(run: Run) -> list[str]:
    return [PY, "-m", "pytest", "-m", "gpu", *gpu_test_files(), "-q", "-p", "no:cacheprovider",
            "--junitxml", str(run.out / "gpu_tests.xml")]


def gpu_tests_after(run: Run) -> None:
    """gpu_tests.json from pytest's JUnit XML: counts, and each failure's name and first message line."""
    counts = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, seconds = [], 0.0
    for case in ET.parse(run.out / "gpu_tests.xml").getroot().iter("testcase"):
        counts["tests"] += 1
        seconds += float(case.get("time", 0))
        outcome = next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
        kind = {"failure": "failed", "error": "errors", "skipped": "skipped", None: "passed"}[
            outcome.tag if outcome is not None else None]
        counts[kind] += 1
        if kind in ("failed", "errors"):
            message = (outcome.get("message") or "").strip().splitlines()[:1]
            failures.append(f"{case.get('classname')}::{case.get('name')}: {''.join(message)[:300]}")
    run.json("gpu_tests").write_text(json.dumps({**counts, "time_s": seconds, "failures": failures}, indent=2))


def gpu_tests_headline(d: dict) -> str:
    return f"{d['passed']} passed, {d['failed']} failed, {d['errors']} errors, {d['skipped']} skipped"


def engine_demo_command(run: Run) -> list[str]:
    shape = run.shape("smollm2-135m")
    sizes = TINY_WORKLOAD if run.dry else []  # the defaults: 64 requests, prompts 16..512, tokens 16..256
    return [PY, str(SCRIPTS / "bench_engine.py"), "--random-model", shape, "--random-model-dir",
            str(run.models / shape), *run.device_args, *sizes, "--json", str(run.json("engine_demo_shape"))]


def engine_8b_command(run: Run) -> list[str]:
    shape = run.shape("llama3-8b")
    return [PY, str(SCRIPTS / "bench_engine.py"), "--random-model", shape, "--random-model-dir",
            str(run.models / shape), *run.device_args, "--skip-hf", *(TINY_WORKLOAD if run.dry else GPU_8B_WORKLOAD),
            "--json", str(run.json("engine_8b_shape"))]


def engine_adapters_command(run: Run) -> list[str]:
    shape = run.shape("llama3-8b")
    return [PY, str(SCRIPTS / "bench_engine.py"), "--random-model", shape, "--random-model-dir",
            str(run.models / shape), *run.device_args, "--skip-hf", "--adapters", "2" if run.dry else "8",
            *(TINY_WORKLOAD if run.dry else GPU_8B_WORKLOAD), "--json", str(run.json("engine_adapters"))]


def floor_text(floor: dict | None) -> str:
    if not floor:
        return "no decode floor"
    full = floor["full_batch"]
    spec = f", spec floor {full['spec_floor_ms']:.2f} ms" if full.get("spec_floor_ms") else ""
    return (f"decode at batch {full['batch']}: {full['mean_ms']:.2f} ms = {full['x_floor']:.2f}x the floor "
            f"{full['floor_ms']:.2f} ms{spec} (all decode steps {floor['x_floor']:.2f}x)")


def engine_headline(d: dict) -> str:
    eng = d["engine"]
    vs_hf = f" = {d['ratio']:.2f}x transformers" if d.get("ratio") else ""
    return f"{eng['tokens_per_s']:.0f} tok/s{vs_hf}; {floor_text(eng.get('decode_floor'))}"


def adapters_headline(d: dict) -> str:
    return (f"mixed/base {d['mixed_vs_base']:.2f} (goal >= 0.9): {d['engine']['tokens_per_s']:.0f} vs "
            f"{d['engine_base_only']['tokens_per_s']:.0f} tok/s")


def swap_command(run: Run) -> list[str]:
    shape = run.shape("llama3-8b")
    sizes = ["--quick"] if run.dry else ["--ranks", "8,16,64", "--repeats", "5"]
    return [PY, str(SCRIPTS / "bench_swap.py"), "--random-model", shape, "--random-model-dir",
            str(run.models / shape), "--device", "cpu" if run.dry else "cuda", *sizes,
            "--json", str(run.json("swap"))]


def swap_headline(d: dict) -> str:
    loras = [r for r in d["rows"] if "rank" in r]
    lora = min(loras, key=lambda r: abs(r["rank"] - 16))  # the goal is stated for rank 16
    cached = next(r for r in d["rows"] if r["what"].startswith("full fine-tune, cached"))
    return (f"LoRA r{lora['rank']} host->slot {lora['host_to_slot_ms']:.2f} ms (goal <= 5); full swap "
            f"{cached['bytes'] / 1e9:.1f} GB {cached['swap_ms']:.0f} ms = {cached['x_floor']:.2f}x the floor "
            f"at {d['h2d_bandwidth_gb_s']:.1f} GB/s (goal <= 1.2)")


def serving_command(run: Run) -> list[str]:
    sizes = ["--shape", "16x4", "--num-prompts", "2"] if run.dry else ["--fireworks", "--num-prompts", "16"]
    return [PY, str(SCRIPTS / "bench_serving.py"), "--random-model", run.shape("llama3-8b"), *sizes,
            "--json", str(run.json("serving"))]


def missing_packages(names: list[str]) -> list[str]:
    def importable(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    return [n for n in names if not importable(n)]


def serving_skip_reason(run: Run) -> str | None:
    missing = missing_packages(SERVING_PACKAGES)
    if missing:
        return f"missing packages {', '.join(missing)}"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from hotswap.demo_model import demo_model_dir, is_complete

    if not is_complete(demo_model_dir()):
        return "no demo model here (bench_serving sizes its prompts with its tokenizer; nothing may download)"
    return None


def serving_headline(d: dict) -> str:
    points = [p for s in d["series"] for p in s["points"]]
    return "; ".join(f"{p['shape']['input_len']}x{p['shape']['output_len']}: E2EL p50 "
                     f"{p['metrics']['e2el_ms']['p50']:.0f} ms at {p['metrics']['request_throughput']:.2f} req/s"
                     for p in points)


STEPS = [
    Step("device", "versions, GPU, copy and host->device bandwidth", 60, 60, device_command, device_headline),
    Step("gpu_tests", "gpu-marked tests: Triton kernels vs torch, engine vs transformers", 180, 120,
         gpu_tests_command, gpu_tests_headline, after=gpu_tests_after),
    Step("engine_demo_shape", "bench_engine, demo model's shape, vs transformers", 150, 120, engine_demo_command,
         engine_headline),
    Step("engine_8b_shape", "bench_engine, Llama-3-8B shape bf16, decode vs HBM floor", 210, 120,
         engine_8b_command, engine_headline),
    Step("engine_adapters", "bench_engine --adapters 8, 8B shape: mixed vs base-only", 150, 120,
         engine_adapters_command, adapters_headline),
    Step("swap", "bench_swap, 8B shape: adapter loads and full swaps vs H2D floor", 180, 120, swap_command,
         swap_headline),
    Step("serving", "bench_serving --fireworks, 8B shape (optional)", 240, 180, serving_command, serving_headline,
         skip_reason=serving_skip_reason),
]


# -- running them -----------------------------------------------------------------------------------


class Console:
    """Prints and keeps a copy in OUT/gpu_proof.log."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def child_env(run: Run) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", COLUMNS="160")
    env.pop("TRITON_INTERPRET", None)  # each child picks its kernels' path itself (tests: conftest.py)
    env.pop("HOTSWAP_FORCE_TRITON", None)
    return env


def step_timeout(limit_s: int, left_s: float) -> int | None:
    """The step's time limit: its own, cut to the time left; None when too little is left to start it."""
    if left_s < MIN_STEP_S:
        return None
    return int(min(limit_s, left_s))


def stop_group(proc: subprocess.Popen) -> None:
    """End the step's child and everything it started (its own process group)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_child(command: list[str], log_path: Path, timeout_s: int, env: dict) -> tuple[int | None, bool]:
    """(exit status, timed out) of the command, its output appended to log_path."""
    with log_path.open("a") as log:
        log.write(f"$ {shlex.join(command)}\n\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return proc.returncode, True
        except BaseException:
            stop_group(proc)
            raise


def log_tail(path: Path, lines: int = 25) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def run_step(step: Step, run: Run, result: Result, left_s: float, say: Console) -> None:
    log_path = run.out / f"{step.name}.log"
    log_path.write_text("")
    result.log, result.json = log_path.name, run.json(step.name).name
    result.command = step.command(run)
    reason = step.skip_reason(run)
    timeout_s = step_timeout(step.dry_limit_s if run.dry else step.limit_s, left_s)
    if reason is None and timeout_s is None:
        reason = f"no time left ({left_s:.0f} s of the budget)"
    if reason is not None:
        result.status, result.reason = "skipped", reason
        log_path.write_text(f"skipped: {reason}\n")
        say(f"==> {step.name}: skipped: {reason}")
        return
    run.json(step.name).unlink(missing_ok=True)
    result.limit_s = timeout_s
    say(f"==> {step.name}: {step.title} (limit {timeout_s} s, {left_s:.0f} s left)")
    say(f"    $ {shlex.join(result.command)}")
    start = time.monotonic()
    result.rc, timed_out = run_child(result.command, log_path, timeout_s, child_env(run))
    result.elapsed_s = time.monotonic() - start
    result.status = "timeout" if timed_out else "passed" if result.rc == 0 else "failed"
    if timed_out:
        result.reason = f"stopped after its {timeout_s} s limit"
    elif result.rc != 0:
        result.reason = f"exit status {result.rc}"
    try:
        if step.after is not None:
            step.after(run)
        result.headline = step.headline(json.loads(run.json(step.name).read_text()))
    except Exception as exc:  # no figures (or other ones): the step's own log says why
        result.headline = f"(no figures: {type(exc).__name__}: {exc})"
        if result.status == "passed":
            result.status, result.reason = "failed", "ran, but its figures are missing or unreadable"
    say(f"<== {step.name}: {result.status} in {result.elapsed_s:.0f} s: {result.headline}")
    if result.status != "passed":
        say(f"    {result.reason}; last lines of {log_path}:")
        for line in log_tail(log_path):
            say(f"    | {line}")


def write_summary(run: Run, results: list[Result], started: float, budget_s: float) -> None:
    summary = {"dry_run": run.dry, "out": str(run.out), "models_dir": str(run.models), "budget_s": budget_s,
               "elapsed_s": time.monotonic() - started, "argv": sys.argv,
               "steps": [r.__dict__ for r in results]}
    tmp = run.out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(run.out / "summary.json")


def summary_lines(results: list[Result], elapsed_s: float) -> list[str]:
    lines = [f"{'step':<18} {'status':<8} {'time':>6} {'limit':>6}  figures / reason", "-" * 100]
    for r in results:
        limit = f"{r.limit_s} s" if r.limit_s else "-"
        text = r.headline or r.reason
        if r.headline and r.status != "passed":
            text = f"{r.reason}; {r.headline}"
        lines.append(f"{r.name:<18} {r.status:<8} {r.elapsed_s:>4.0f} s {limit:>6}  {text}")
    lines.append(f"total {elapsed_s:.0f} s")
    return lines


# -- the device step (runs as its own child, like every step) ---------------------------------------


def probe(path: Path, dry: bool) -> None:
    """Versions, the device, free disk, and the bandwidths the floors use; refuses a GPU run without CUDA."""
    sys.path[:0] = [str(ROOT), str(SCRIPTS)]
    import torch
    import transformers
    import triton

    from bench_engine import copy_bandwidth, spec_hbm_bandwidth
    from bench_swap import h2d_bandwidth

    if not dry and not torch.cuda.is_available():
        print("no CUDA device here: run the GPU proof on the GPU machine, or use --dry-run", file=sys.stderr)
        raise SystemExit(NO_CUDA_EXIT)
    device = torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu")
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0], "device": str(device),
            "cpu_count": os.cpu_count(), "tmp_free_gb": shutil.disk_usage(tempfile.gettempdir()).free / 1e9}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gb=props.total_memory / 1e9, multiprocessors=props.multi_processor_count)
    else:
        info.update(device_name="cpu")
    for name in ("peft", "safetensors", "tokenizers"):
        info[name] = getattr(__import__(name), "__version__", "?")
    info["copy_gb_s"] = copy_bandwidth(device) / 1e9
    spec = spec_hbm_bandwidth(device, None)
    info["spec_hbm_gb_s"] = spec / 1e9 if spec else None
    info["h2d_gb_s"] = h2d_bandwidth(device) / 1e9
    info["h2d_source"] = "pinned host memory" if device.type == "cuda" else "host memory copy (CPU)"
    path.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))


# -- CLI --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else ./gpu-proof-out)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the plumbing")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total seconds for all steps (default 540 on the GPU, 600 for a dry run)")
    p.add_argument("--only", default=None, help="comma list of steps to run (the others are skipped)")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="where the random models are built and reused (default: <tmp>/gpu-proof-models, kept; "
                        "a dry run uses a fresh temp dir and removes it)")
    p.add_argument("--list", action="store_true", help="print each step's limit and command, run nothing")
    p.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)  # the device step's child
    args = p.parse_args(argv)
    names = [s.name for s in STEPS]
    args.only = args.only.split(",") if args.only else names
    if unknown := [n for n in args.only if n not in names]:
        p.error(f"unknown steps {unknown}; the steps are {', '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.probe is not None:
        probe(args.probe, args.dry_run)
        return 0
    out = (args.out or Path(os.environ.get("OUT") or "gpu-proof-out")).resolve()
    fresh_models = args.models_dir is None and args.dry_run and not args.list
    models = args.models_dir or (Path(tempfile.mkdtemp(prefix="gpu-proof-models-")) if fresh_models
                                 else Path(tempfile.gettempdir()) / "gpu-proof-models")
    run = Run(out=out, models=models.resolve(), dry=args.dry_run)
    budget_s = args.budget_s or (600.0 if args.dry_run else 540.0)
    if args.list:
        for step in STEPS:
            print(f"{step.name} ({step.dry_limit_s if run.dry else step.limit_s} s): {shlex.join(step.command(run))}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_proof.log").write_text("")
    models.mkdir(parents=True, exist_ok=True)
    say = Console(out / "gpu_proof.log")
    say(f"GPU proof{' (dry run, CPU, tiny sizes)' if run.dry else ''}: figures in {out}, models in {run.models}, "
        f"budget {budget_s:.0f} s")
    started = time.monotonic()
    results = [Result(s.name, s.title) for s in STEPS]
    try:
        for step, result in zip(STEPS, results):
            if step.name not in args.only:
                result.status, result.reason = "skipped", "not in --only"
                continue
            run_step(step, run, result, budget_s - (time.monotonic() - started), say)
            write_summary(run, results, started, budget_s)
            if step.name == "device" and result.rc == NO_CUDA_EXIT:
                say("no CUDA device: nothing else to run (use --dry-run on a CPU machine)")
                break
    finally:
        write_summary(run, results, started, budget_s)
        if fresh_models:
            shutil.rmtree(models, ignore_errors=True)
    say()
    say(f"summary ({'dry run' if run.dry else 'GPU'}; logs and JSON in {out}):")
    for line in summary_lines(results, time.monotonic() - started):
        say(line)
    return 1 if any(r.status in ("failed", "timeout") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
