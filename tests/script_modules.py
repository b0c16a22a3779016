"""The benchmark scripts are files, not a package: tests load them as modules."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import contextmanager
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@contextmanager
def scripts_on_path():
    """scripts/ first on sys.path, as `python scripts/<name>.py` has it (so `import benchkit` and
    `import _stack` work); removed again on exit."""
    added = str(SCRIPTS) not in sys.path
    if added:
        sys.path.insert(0, str(SCRIPTS))
    try:
        yield
    finally:
        if added and str(SCRIPTS) in sys.path:
            sys.path.remove(str(SCRIPTS))


@contextmanager
def loaded_script(name: str, *also: str):
    """scripts/<name>.py as module `name` (in sys.modules while it runs: dataclasses look their module
    up), with scripts/ on sys.path; on exit sys.modules gets back what it had for `name` and for `also`
    (scripts it imports)."""
    had = {n: sys.modules.get(n) for n in (name, *also)}
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with scripts_on_path():
            spec.loader.exec_module(module)
            yield module
    finally:
        for n, m in had.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


@contextmanager
def benchkit_module(name: str):
    """scripts/benchkit/<name>.py, imported as the scripts import it."""
    with scripts_on_path():
        yield importlib.import_module(f"benchkit.{name}")
