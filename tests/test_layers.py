"""The package's layering: no import cycle and no private name across files, counting every
import (top level, inside functions, under ``TYPE_CHECKING``); the layers themselves are
import-linter's contracts (``pyproject.toml``, run by ``.ci/run`` and here)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "unitrain"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Every module's imports of unitrain modules, and the private names imported across files."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                if not base.startswith("unitrain"):
                    continue
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        edges[name].add(f"{base}.{alias.name}")
                        continue
                    edges[name].add(base)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append(f"{name} imports {alias.name} from {base}")
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_counting_deferred_and_type_checking_imports():
    edges, _ = _imports(_modules())
    assert _cycles(edges) == []


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_private_name_is_imported_across_files():
    _, private = _imports(_modules())
    assert private == []


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter not installed")
def test_the_layer_contracts_hold():
    proc = subprocess.run(["lint-imports"], cwd=PACKAGE.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "0 broken" in proc.stdout


def test_old_module_paths_still_import_with_a_deprecation_line():
    code = ("import warnings, sys\n"
            "warnings.filterwarnings('error', message='unitrain.trainer moved')\n"
            "import unitrain\n"
            "try:\n"
            "    import unitrain.trainer\n"
            "except DeprecationWarning as e:\n"
            "    print('warned:', e)\n"
            "warnings.resetwarnings()\n"
            "from unitrain.module import MLPPolicy, RLModule\n"
            "from unitrain.optim.ppo import PPO\n"
            "from unitrain.projection.graph import ProjectionGraph\n"
            "import unitrain.policy.models as models, unitrain.rules.projection.graph as graph\n"
            "assert MLPPolicy is models.MLPPolicy and PPO is unitrain.optim.PPO\n"
            "assert ProjectionGraph is graph.ProjectionGraph\n"
            "assert sys.modules['unitrain.run.trainer'].__spec__.name == 'unitrain.run.trainer'\n"
            "import unitrain.app.compare as new_compare\n"
            "from unitrain.compare import compare as old_compare\n"
            "assert old_compare is new_compare.compare\n"
            "assert sys.modules['unitrain.compare'] is new_compare\n"
            "assert unitrain.compare is new_compare.compare  # the function stays the function\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("warned: unitrain.trainer moved to unitrain.run.trainer in unitrain 0.2.0; "
            "the old path goes in 0.3.0") in proc.stdout
    assert proc.stdout.strip().endswith("ok")


def test_every_old_path_resolves():
    import importlib

    from unitrain.aliases import MOVED

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for old, new in MOVED.items():
            assert importlib.import_module(old) is importlib.import_module(new), old
