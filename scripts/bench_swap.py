"""Swap timings: a LoRA adapter from disk to a device slot, from the host tier to a slot, and a full
fine-tune swapped into the resident model, each against the bytes it moves.

    python scripts/bench_swap.py [--quick] [--json swap.json] [--device cpu|cuda]

Adapters and the fine-tune are synthetic (random weights in the PEFT / HF layouts, made in a temp
dir): load times do not depend on the values. On CUDA the copies are also compared with the
measured pinned host-to-device bandwidth.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from adapters.synthetic import write_random_lora
from hotswap.demo_model import fetch_demo_model
from worker.engine.config import EngineConfig
from worker.engine.engine import LLMEngine

def write_finetune(base_dir: Path, out: Path) -> Path:
    """The base checkpoint with every weight nudged: same architecture, different values."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(base_dir, out)
    for f in out.glob("*.safetensors"):
        save_file({k: v + 0.001 for k, v in load_file(f).items()}, f)
    return out


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def h2d_bandwidth(device: torch.device) -> float | None:
    """Pinned host -> device copy bandwidth in bytes/s (None on CPU)."""
    if device.type != "cuda":
        return None
    src = torch.empty(256 * 2**20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device=device)
    dst.copy_(src)
    seconds = min(timed(lambda: dst.copy_(src, non_blocking=True), device) for _ in range(5))
    return src.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="base model dir (default: the demo model)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--ranks", default="8,16,64", help="adapter ranks to time")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="ranks 8,64 and 3 repeats")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    ranks = [8, 64] if args.quick else [int(r) for r in args.ranks.split(",")]
    repeats = 3 if args.quick else args.repeats
    model_dir = args.model or fetch_demo_model(log=lambda m: None)
    base_config = json.loads((model_dir / "config.json").read_text())

    engine = LLMEngine(EngineConfig(model=model_dir, device=args.device, max_loras=2, max_lora_rank=max(64, *ranks),
                                    num_blocks=16))
    device, slots = engine.device, engine.lora_slots
    rows = []
    with tempfile.TemporaryDirectory(prefix="hotswap-bench-swap-") as tmp:
        for rank in ranks:
            name = f"r{rank}"
            engine.register_adapter(name, write_random_lora(Path(tmp) / name, base_config, rank, 2.0 * rank, seed=rank))

            def from_disk():
                slots.forget(name)  # neither tier holds it: read, validate-free stack, copy
                slots.release(slots.acquire(name))

            def from_host():
                slots.evict(name)  # host tier holds it: only the device copies remain
                slots.release(slots.acquire(name))

            disk = statistics.median(timed(from_disk, device) for _ in range(repeats))
            host = statistics.median(timed(from_host, device) for _ in range(repeats))
            nbytes = slots.host_adapter(name).nbytes
            rows.append({"what": f"LoRA rank {rank}, 7 modules (slots of max rank {slots.max_rank})", "bytes": nbytes,
                         "disk_to_slot_ms": disk * 1e3, "host_to_slot_ms": host * 1e3,
                         "host_to_slot_gb_s": nbytes / host / 1e9})
        engine.register_finetune("nudged", write_finetune(model_dir, Path(tmp) / "nudged"))
        model_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
        first = timed(lambda: engine._swapper.swap_to("nudged"), device)  # disk -> host cache -> model
        back = timed(lambda: engine._swapper.swap_to(None), device)  # base from its pinned host copy
        again = timed(lambda: engine._swapper.swap_to("nudged"), device)  # host cache hit
        repack = timed(engine.model.prepack, device)  # the engine's step does this after every swap
        engine._swapper.swap_to(None)
        rows.append({"what": "full fine-tune, first swap (disk -> host -> model)", "bytes": model_bytes,
                     "swap_ms": first * 1e3, "gb_s": model_bytes / first / 1e9})
        rows.append({"what": "full fine-tune, cached swap (host -> model)", "bytes": model_bytes,
                     "swap_ms": again * 1e3, "gb_s": model_bytes / again / 1e9})
        rows.append({"what": "swap back to the base (host -> model)", "bytes": model_bytes,
                     "swap_ms": back * 1e3, "gb_s": model_bytes / back / 1e9})
        if device.type == "cpu":  # on CPU every swap also repacks the weights for decode batches
            rows.append({"what": "CPU: repack after a swap (MKL packed copy, in engine.step)", "bytes": model_bytes,
                         "swap_ms": repack * 1e3, "gb_s": model_bytes / repack / 1e9})

    bandwidth = h2d_bandwidth(device)
    table = Table(title=f"swap timings on {device} ({engine.dtype}), median of {repeats}")
    for col in ("what", "bytes moved", "disk->slot / swap", "host->slot", "GB/s"):
        table.add_column(col)
    for r in rows:
        if "disk_to_slot_ms" in r:
            table.add_row(r["what"], f"{r['bytes'] / 2**20:.1f} MiB", f"{r['disk_to_slot_ms']:.1f} ms",
                          f"{r['host_to_slot_ms']:.1f} ms", f"{r['host_to_slot_gb_s']:.2f}")
        else:
            table.add_row(r["what"], f"{r['bytes'] / 2**20:.1f} MiB", f"{r['swap_ms']:.1f} ms", "", f"{r['gb_s']:.2f}")
    console = Console()
    console.print(table)
    if bandwidth:
        console.print(f"measured pinned host->device bandwidth: {bandwidth / 1e9:.1f} GB/s")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "dtype": str(engine.dtype), "repeats": repeats,
                                         "rows": rows, "h2d_bandwidth_gb_s": bandwidth and bandwidth / 1e9}, indent=2))


if __name__ == "__main__":
    main()
