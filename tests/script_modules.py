"""The benchmark scripts are files, not a package: tests load them as modules."""

from __future__ import annotations

import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@contextmanager
def loaded_script(name: str, *also: str):
    """scripts/<name>.py as module `name` (in sys.modules while it runs: dataclasses look their module
    up); on exit sys.modules gets back what it had for `name` and for `also` (scripts it imports)."""
    had = {n: sys.modules.get(n) for n in (name, *also)}
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for n, m in had.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
