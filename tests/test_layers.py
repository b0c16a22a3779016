"""The packages' dependency direction (DESIGN.md): cli -> api -> {scheduler, adapters} -> hotswap;
worker -> scheduler, adapters, hotswap. Read from every import statement of every module, those
inside functions included (the lazy ones are imports too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cli", "api", "scheduler", "worker", "adapters", "hotswap")
# package -> the packages of ours it must never import
FORBIDDEN = {
    "hotswap": {"cli", "api", "scheduler", "worker", "adapters"},  # the foundation imports none of the others
    "adapters": {"cli", "api", "scheduler", "worker"},
    "scheduler": {"cli", "api", "worker"},
    "api": {"cli", "worker"},
    "worker": {"cli", "api"},
}


def top_level_imports(path: Path) -> set[str]:
    """The top-level names a module imports (`import a.b`, `from a.b import c` -> "a")."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def imported_packages(path: Path) -> set[str]:
    return top_level_imports(path) & set(PACKAGES)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_the_layers_below_it(package):
    wrong = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & FORBIDDEN[package])
             for p in sorted((ROOT / package).rglob("*.py"))}
    assert not {k: v for k, v in wrong.items() if v}


def test_the_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from api.app import create_app\n    import worker.engine\n")
    assert imported_packages(module) == {"api", "worker"}


def test_scripts_do_not_import_the_tests():
    assert not [str(p.relative_to(ROOT)) for p in sorted((ROOT / "scripts").rglob("*.py"))
                if "tests" in top_level_imports(p)]  # benchkit/ too


# the API and scheduler processes never import torch; the one exception converts the demo model
TORCH_FREE = ("api", "scheduler", "hotswap")
NEEDS_TORCH = {"hotswap/demo_model.py"}


def test_the_api_scheduler_and_foundation_never_import_torch():
    wrong = [str(p.relative_to(ROOT)) for package in TORCH_FREE for p in sorted((ROOT / package).rglob("*.py"))
             if "torch" in top_level_imports(p) and str(p.relative_to(ROOT)) not in NEEDS_TORCH]
    assert not wrong


def popen_calls(path: Path) -> int:
    return sum(1 for node in ast.walk(ast.parse(path.read_text(), str(path)))
               if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "Popen")


@pytest.mark.parametrize("launcher", ["cli/up.py", "scripts/_stack.py", "tests/stack.py", "hotswap/localhost.py"])
def test_local_servers_start_through_the_one_process_group(launcher):
    """`hotswap up`, the scripts' LocalStack and the tests' Stack start, restart and stop their
    children with hotswap.processes, not with code of their own."""
    assert popen_calls(ROOT / launcher) == 0
    assert popen_calls(ROOT / "hotswap" / "processes.py") == 1  # the check sees a call
