"""What this CPU is, as far as the engine's speed goes: model name, the ISA flags that matter,
whether it computes bf16 natively, and torch's thread count.

Read from /proc/cpuinfo when first asked (never at import); off Linux the name is the platform's
and no flag is known, so nothing claims native bf16 there.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# The flags that decide which matmul paths are fast (as /proc/cpuinfo spells them).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# Either one means bf16 matmuls run on bf16 hardware (AVX512_BF16 dot products or AMX tiles)
# instead of being converted to fp32 and back.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")

_CPUINFO = Path("/proc/cpuinfo")


def native_bf16(flags: str | set[str] | frozenset[str]) -> bool:
    """Whether a CPU with these flags (a /proc/cpuinfo `flags` line or a set) has native bf16."""
    present = set(flags.split()) if isinstance(flags, str) else set(flags)
    return any(f in present for f in NATIVE_BF16_FLAGS)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text."""
    name, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not name:
            name = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if name and flags:
            break
    return name, flags


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    try:
        name, flags = parse_cpuinfo(_CPUINFO.read_text())
    except OSError:
        name, flags = "", frozenset()
    return name or platform.processor() or platform.machine(), flags


def cpu_model_name() -> str:
    return _cpuinfo()[0]


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def isa_flags() -> dict[str, bool]:
    """Each flag of ISA_FLAGS: present or not."""
    flags = cpu_flags()
    return {f: f in flags for f in ISA_FLAGS}


def cpu_has_native_bf16() -> bool:
    return native_bf16(cpu_flags())


def cpu_facts() -> dict:
    """The machine facts a CPU benchmark figure needs next to it (JSON-ready)."""
    import torch

    return {
        "cpu_model": cpu_model_name(),
        "isa": isa_flags(),
        "native_bf16": cpu_has_native_bf16(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
    }


def report_lines(facts: dict, paths: dict) -> list[str]:
    """cpu_facts() and an engine's cpu_paths as a few lines for a benchmark report."""
    flags = " ".join(f for f, on in facts["isa"].items() if on) or "no AVX2"
    lines = [f"CPU: {facts['cpu_model']} ({flags}), {facts['torch_threads']} torch threads; "
             f"{paths.get('dtype', '?')} paths ({paths.get('source', 'none')}):"]
    for shape, rows in paths.get("shapes", {}).items():
        lines.append(f"  {shape}: " + ", ".join(f"{r} {c}" for r, c in rows.items()))
    return lines
