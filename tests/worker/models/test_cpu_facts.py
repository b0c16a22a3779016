"""CPU facts: which flags mean native bf16, /proc/cpuinfo parsing, and the default dtype they pick."""

import pytest
import torch

from worker.engine.config import EngineConfig, default_dtype
from worker.models import cpu_facts
from worker.models.cpu_facts import cpu_facts as facts
from worker.models.cpu_facts import native_bf16, parse_cpuinfo

ZEN3 = "fpu vme sse sse2 ht syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm avx f16c avx2 bmi2 vaes vpclmulqdq"
ZEN4 = ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vnni"
SAPPHIRE_RAPIDS = ZEN3 + " avx512f avx512_vnni avx512_fp16 amx_bf16 amx_tile amx_int8"
SKYLAKE_X = ZEN3 + " avx512f avx512dq avx512cd avx512bw avx512vl"


@pytest.mark.parametrize("flags, expected", [
    (ZEN3, False), (ZEN4, True), (SAPPHIRE_RAPIDS, True), (SKYLAKE_X, False), ("", False),
    ("avx512bf16", False),  # not how the kernel spells it
    (frozenset({"amx_bf16"}), True),
])
def test_native_bf16(flags, expected):
    assert native_bf16(flags) is expected


def test_parse_cpuinfo_reads_the_first_processor():
    text = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14 96-Core Processor\n"
            f"flags\t\t: {ZEN4}\n\nprocessor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    name, flags = parse_cpuinfo(text)
    assert name == "AMD EPYC 9R14 96-Core Processor"
    assert "avx512_bf16" in flags and "fpu" in flags


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_dtype_follows_native_bf16(monkeypatch, native, dtype):
    monkeypatch.setattr(cpu_facts, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert default_dtype(cpu) == dtype
    assert EngineConfig(model="m", device="cpu").torch_dtype(cpu) == dtype
    assert EngineConfig(model="m", device="cpu", dtype="float32").torch_dtype(cpu) == torch.float32


def test_kv_cache_dtype_is_fp32_on_the_cpu_unless_asked():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = EngineConfig(model="m", device="cpu")
    assert auto.kv_torch_dtype(cpu, torch.bfloat16) == torch.float32  # the CPU's bf16 attention is slow
    assert auto.kv_torch_dtype(cuda, torch.bfloat16) == torch.bfloat16
    assert EngineConfig(model="m", kv_cache_dtype="bfloat16").kv_torch_dtype(cpu, torch.bfloat16) == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32"):
        EngineConfig(model="m", kv_cache_dtype="fp8").kv_torch_dtype(cpu, torch.float32)


def test_cpu_facts_are_json_ready():
    import json

    out = facts()
    assert set(out["isa"]) == {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}
    assert out["torch_threads"] == torch.get_num_threads()
    json.dumps(out)
