"""The `hotswap` command as a newcomer runs it: real subprocesses, the real demo model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HOTSWAP = shutil.which("hotswap") or os.path.join(os.path.dirname(sys.executable), "hotswap")


def run(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([HOTSWAP, *args], capture_output=True, text=True, timeout=300, **kw)


def test_help_tells_a_newcomer_what_to_type():
    out = run("--help")
    assert out.returncode == 0
    assert "fetch-demo" in out.stdout and "generate" in out.stdout


def test_fetch_demo_is_idempotent(demo_model_dir):
    marker = demo_model_dir / ".hotswap-complete"
    before = marker.stat().st_mtime_ns
    out = run("models", "fetch-demo")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(demo_model_dir)
    assert marker.stat().st_mtime_ns == before  # nothing was converted again


def test_generate_streams_the_engines_greedy_answer(demo_model_dir):
    from worker.engine.config import EngineConfig
    from worker.engine.engine import LLMEngine
    from worker.engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(model=demo_model_dir, device="cpu", num_blocks=64))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    expected = engine.generate([engine.tokenizer.encode_chat(messages)], SamplingParams(max_tokens=12, temperature=0))[0]

    out = run("generate", "--prompt", "What is the capital of France?", "--chat", "--max-tokens", "12", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == expected.text
    assert f"finish_reason={expected.finish_reason}" in out.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "--prompt", "hi", "--model", "/nonexistent"], "not a model dir"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "max-tokens"),
])
def test_bad_input_is_one_line_and_a_nonzero_exit(args, message, demo_model_dir):
    out = run(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr
