"""Swap timings: a LoRA adapter from disk to a device slot, from the host tier to a slot, and a full
fine-tune swapped into the resident model, each against the bytes it moves.

    python scripts/bench_swap.py [--quick] [--json swap.json] [--device cpu|cuda]
    python scripts/bench_swap.py --random-model llama3-8b   # GPU: an 8B-shaped base, random bf16 weights

Adapters and the fine-tune are synthetic (random weights in the PEFT / HF layouts, made in a temp
dir): load times do not depend on the values. Every copy from host memory is also compared with
its floor, bytes / the host-to-device bandwidth measured in the same run (pinned memory on CUDA; on
the CPU a plain host memory copy). The base is the demo model, or `--random-model` (the shapes of
bench_engine.py, built like there, reused from `--random-model-dir`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _p in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):  # the repo, and bench_engine
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from adapters.synthetic import write_random_lora  # noqa: E402
from bench_engine import resolve_device  # noqa: E402
from benchkit.random_models import RANDOM_MODELS, ensure_random_model  # noqa: E402
from hotswap.demo_model import fetch_demo_model  # noqa: E402
from worker.engine.config import EngineConfig  # noqa: E402
from worker.engine.engine import LLMEngine  # noqa: E402


def write_finetune(base_dir: Path, out: Path) -> Path:
    """The base checkpoint with every weight nudged: same architecture, different values. Each weight
    file is read once and written once (an 8B base is 16 GB), nudged in place."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out, ignore=shutil.ignore_patterns("*.safetensors"))
    for f in sorted(base_dir.glob("*.safetensors")):
        tensors = load_file(f)
        for t in tensors.values():
            t.add_(0.001)
        save_file(tensors, out / f.name, metadata={"format": "pt"})
        del tensors
    return out


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def h2d_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Host -> device copy bandwidth in bytes/s: from pinned memory on CUDA; on the CPU a host memory copy."""
    if device.type != "cuda":
        src = torch.empty(nbytes // 4, dtype=torch.uint8)
        dst = torch.empty_like(src)
    else:
        src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
        dst = torch.empty_like(src, device=device)
    dst.copy_(src)
    seconds = min(timed(lambda: dst.copy_(src, non_blocking=True), device) for _ in range(5))
    return src.numel() / seconds


def with_floor(row: dict, ms_key: str, bandwidth: float) -> dict:
    """The row plus its copy floor (bytes / bandwidth) and how far the measured time is above it."""
    floor_ms = row["bytes"] / bandwidth * 1e3
    return {**row, "floor_ms": floor_ms, "x_floor": row[ms_key] / floor_ms}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="base model dir (default: the demo model)")
    parser.add_argument("--random-model", choices=sorted(RANDOM_MODELS), default=None,
                        help="a random-init base of this shape (bf16), saved to a temp dir (overrides --model)")
    parser.add_argument("--random-model-dir", type=Path, default=None,
                        help="save the --random-model here instead, and reuse a finished one (as bench_engine.py)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --random-model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ranks", default="8,16,64", help="adapter ranks to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="ranks 8,64 and 3 repeats")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-swap-") as tmp:
        if args.random_model:
            model_dir = ensure_random_model(args.random_model, args.random_model_dir or Path(tmp) / "model",
                                            resolve_device(args.device), args.seed)
        else:
            model_dir = args.model or fetch_demo_model(log=lambda m: None)
        report = benchmark(args, Path(model_dir), Path(tmp))
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def benchmark(args: argparse.Namespace, model_dir: Path, tmp: Path) -> dict:
    ranks = [8, 64] if args.quick else [int(r) for r in args.ranks.split(",")]
    repeats = 3 if args.quick else args.repeats
    base_config = json.loads((model_dir / "config.json").read_text())
    engine = LLMEngine(EngineConfig(model=model_dir, device=args.device, max_loras=2, max_lora_rank=max(64, *ranks),
                                    num_blocks=16))
    device, slots = engine.device, engine.lora_slots
    bandwidth = h2d_bandwidth(device)
    rows = []
    for rank in ranks:
        name = f"r{rank}"
        engine.register_adapter(name, write_random_lora(tmp / name, base_config, rank, 2.0 * rank, seed=rank))

        def from_disk():
            slots.forget(name)  # neither tier holds it: read, validate-free stack, copy
            slots.release(slots.acquire(name))

        def from_host():
            slots.evict(name)  # host tier holds it: only the device copies remain
            slots.release(slots.acquire(name))

        disk = statistics.median(timed(from_disk, device) for _ in range(repeats))
        host = statistics.median(timed(from_host, device) for _ in range(repeats))
        nbytes = slots.host_adapter(name).nbytes
        rows.append(with_floor({"what": f"LoRA rank {rank}, 7 modules (slots of max rank {slots.max_rank})",
                                "rank": rank, "bytes": nbytes, "disk_to_slot_ms": disk * 1e3,
                                "host_to_slot_ms": host * 1e3, "host_to_slot_gb_s": nbytes / host / 1e9},
                               "host_to_slot_ms", bandwidth))

    engine.register_finetune("nudged", write_finetune(model_dir, tmp / "nudged"))
    model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    first = timed(lambda: engine._swapper.swap_to("nudged"), device)  # disk -> host cache -> model
    back = timed(lambda: engine._swapper.swap_to(None), device)  # base from its pinned host copy
    again = timed(lambda: engine._swapper.swap_to("nudged"), device)  # host cache hit
    repack = timed(engine.model.prepack, device)  # the engine's step does this after every swap
    engine._swapper.swap_to(None)

    def swap_row(what: str, seconds: float, from_host: bool) -> dict:
        row = {"what": what, "bytes": model_bytes, "swap_ms": seconds * 1e3, "gb_s": model_bytes / seconds / 1e9}
        return with_floor(row, "swap_ms", bandwidth) if from_host else row

    rows.append(swap_row("full fine-tune, first swap (disk -> host -> model)", first, from_host=False))
    rows.append(swap_row("full fine-tune, cached swap (host -> model)", again, from_host=True))
    rows.append(swap_row("swap back to the base (host -> model)", back, from_host=True))
    if device.type == "cpu":  # on CPU every swap also repacks the weights for decode batches
        rows.append(swap_row("CPU: repack after a swap (MKL packed copy, in engine.step)", repack, from_host=False))
    return {"device": str(device), "dtype": str(engine.dtype), "repeats": repeats, "model_dir": str(model_dir),
            "model_name": args.random_model or model_dir.name, "rows": rows,
            "h2d_bandwidth_gb_s": bandwidth / 1e9,
            "h2d_source": "pinned host memory" if device.type == "cuda" else "host memory copy (CPU)"}


def _floor_cell(row: dict) -> str:
    return f"{row['floor_ms']:.1f} ms ({row['x_floor']:.2f}x)" if "floor_ms" in row else ""


def print_report(report: dict) -> None:
    table = Table(title=f"swap timings, {report['model_name']} on {report['device']} ({report['dtype']}), "
                        f"median of {report['repeats']}")
    for col in ("what", "bytes moved", "disk->slot / swap", "host->slot", "GB/s", "H2D floor (measured / floor)"):
        table.add_column(col)
    for r in report["rows"]:
        if "disk_to_slot_ms" in r:
            table.add_row(r["what"], f"{r['bytes'] / 2**20:.1f} MiB", f"{r['disk_to_slot_ms']:.1f} ms",
                          f"{r['host_to_slot_ms']:.2f} ms", f"{r['host_to_slot_gb_s']:.2f}", _floor_cell(r))
        else:
            table.add_row(r["what"], f"{r['bytes'] / 2**20:.1f} MiB", f"{r['swap_ms']:.1f} ms", "", f"{r['gb_s']:.2f}",
                          _floor_cell(r))
    console = Console()
    console.print(table)
    console.print(f"measured host->device bandwidth ({report['h2d_source']}): {report['h2d_bandwidth_gb_s']:.1f} GB/s")


if __name__ == "__main__":
    main()
