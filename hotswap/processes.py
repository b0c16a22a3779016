"""Named child processes, one log file each, started in order and stopped in reverse order: what
`hotswap up`, the serving scripts' LocalStack and the tests' Stack all run their servers with.

    group = ProcessGroup(log_dir)                     # logs: log_dir/<name>.log (appended to)
    redis = group.start("redis", [...])              # -> Child (.proc, .pid, .log, .restarts)
    wait_http("http://127.0.0.1:8000/healthz", 60, group.start("api", [...]))
    group.kill("worker0"); group.restart("worker0")  # the same command, env and log again
    group.stop_all()                                 # api, ..., redis: SIGTERM, a grace, SIGKILL

Part of the torch-free foundation: it imports nothing of the other packages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


class ChildExited(RuntimeError):
    """A child ended while something waited for it to come up."""


@dataclass(eq=False)
class Child:
    """One started process and how to start it again."""

    name: str
    cmd: list[str]
    env: dict | None
    log: Path
    stop_timeout_s: float = 30.0  # SIGTERM, then this long, then SIGKILL
    stdout_to_terminal: bool = False  # stderr goes to the log either way
    proc: subprocess.Popen | None = None
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class ProcessGroup:
    """Children by name, in the order they were first started.

    own_group: each child runs in a process group of its own, so a Ctrl-C at the terminal reaches
    only this process (which then stops them in order), and on Linux gets SIGTERM when this process
    dies. That signal is tied to the *thread* that started the child (PR_SET_PDEATHSIG): start and
    restart such children from the main thread, never from a short-lived one."""

    def __init__(self, log_dir: Path, *, own_group: bool = False, child_type: type[Child] = Child):
        self.log_dir = Path(log_dir)
        self.own_group = own_group
        self.child_type = child_type
        self.children: dict[str, Child] = {}

    # -- starting -----------------------------------------------------------------------------------

    def start(self, name: str, cmd: list[str], env: dict | None = None, *, stop_timeout_s: float = 30.0,
              stdout_to_terminal: bool = False) -> Child:
        """Start `cmd` as `name`; a name started again (after it ended) keeps its place in the order."""
        old = self.children.get(name)
        if old is not None and old.alive:
            raise ValueError(f"{name} already runs (pid {old.pid})")
        child = self.child_type(name, list(cmd), env, self.log_dir / f"{name}.log", stop_timeout_s, stdout_to_terminal)
        self._launch(child)
        self.children[name] = child
        return child

    def restart(self, name: str) -> Child:
        """Start an ended child again: the same command, env and log; `restarts` counts up."""
        child = self.children[name]
        if child.alive:
            raise ValueError(f"{name} still runs (pid {child.pid})")
        self._launch(child)
        child.restarts += 1
        return child

    def _launch(self, child: Child) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(child.log, "ab") as log:  # the child keeps its own copy of the descriptor
            child.proc = subprocess.Popen(child.cmd, env=child.env, stdin=subprocess.DEVNULL,
                                          stdout=None if child.stdout_to_terminal else log, stderr=log,
                                          preexec_fn=_own_group_dies_with_parent(os.getpid()) if self.own_group else None)
        child.started_at = time.monotonic()

    # -- looking ------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Child:
        return self.children[name]

    def get(self, name: str) -> Child | None:
        return self.children.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.children

    def __iter__(self) -> Iterator[Child]:
        return iter(list(self.children.values()))

    def pids(self) -> dict[str, int]:
        """Live children's pids by name."""
        return {c.name: c.pid for c in self if c.alive}

    def first_dead(self) -> Child | None:
        return next((c for c in self if not c.alive), None)

    # -- stopping -----------------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 30.0) -> int:
        """Send `sig` and wait for the child to end; returns its pid."""
        child = self.children[name]
        if child.alive:
            child.proc.send_signal(sig)
        child.proc.wait(timeout=timeout)
        return child.pid

    def stop(self, name: str, *, ask: Callable[[Child], None] | None = None,
             hurry: Callable[[], bool] = lambda: False) -> bool:
        """Ask the child to stop (SIGTERM, or `ask(child)`), wait up to its stop_timeout_s (or until
        `hurry()` says to stop waiting), then SIGKILL. False when it had to be killed; True when it
        ended by itself, before or now."""
        child = self.children[name]
        stopped = True
        if child.alive:
            try:
                (ask or _terminate)(child)
            except Exception:
                _terminate(child)
            deadline = time.monotonic() + child.stop_timeout_s
            while child.proc.poll() is None and time.monotonic() < deadline and not hurry():
                time.sleep(0.05)
            if child.proc.poll() is None:
                child.proc.kill()
                stopped = False
        child.proc.wait()
        return stopped

    def stop_all(self) -> None:
        """Every child, the last started first."""
        for child in reversed(list(self)):
            self.stop(child.name)

    def __enter__(self) -> "ProcessGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()


def _terminate(child: Child) -> None:
    child.proc.send_signal(signal.SIGTERM)


# -- waiting ----------------------------------------------------------------------------------------


def wait_until(ready: Callable[[], bool], timeout: float, child: Child | None, what: str,
               every_s: float = 0.05) -> None:
    """Until `ready()` says True (an exception counts as not yet). ChildExited when `child` ends
    first, TimeoutError after `timeout` seconds; `what` names what answers, for those messages."""
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and not child.alive:
            raise ChildExited(f"{child.name} {how_it_ended(child.proc.returncode)} before {what} answered: "
                              f"see {child.log}\n{tail(child.log)}")
        try:
            if ready():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer in {timeout:.0f} s" + (f": see {child.log}" if child else ""))
        time.sleep(every_s)


def wait_http(url: str, timeout: float, child: Child | None = None) -> None:
    """Until GET url answers 200."""
    import httpx

    wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, timeout, child, url, every_s=0.25)


# -- words about processes --------------------------------------------------------------------------


def tail(path: Path | None, lines: int = 20) -> str:
    """The last lines of a log file."""
    try:
        text = Path(path).read_text(errors="replace")
    except (OSError, TypeError):
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


def how_it_ended(returncode: int) -> str:
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}" + (" (kill -9 or the out-of-memory killer)" if name == "SIGKILL" else "")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _own_group_dies_with_parent(parent_pid: int):
    """preexec_fn: a process group of its own and, on Linux, SIGTERM when the parent dies."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now, in the parent
        except (OSError, AttributeError):
            prctl = None

    def setup() -> None:
        os.setpgrp()
        if prctl is not None:
            prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent_pid:  # the parent died before that took effect
                os._exit(1)

    return setup
