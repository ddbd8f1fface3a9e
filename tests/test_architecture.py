"""The layering rules of ../shared/DESIGN.md and docs/ARCHITECTURE.md, checked on every import (lazy ones too).

    kernel (fedcare) ← privacy ← client / server / strategies ← export / inference ← deploy ← simulations ← commands

A module may import its own package and lower layers only; beside that, server may import
strategies and inference may import export. Commands (`cli/` and every package's `commands.py`)
may import anything. Nothing but commands imports simulations; export and inference never reach
Flower, directly or through another package; there are no import cycles; start-up of the light
commands loads no torch, Opacus or Flower (their time is measured by bench/startup.py).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DEFAULT_STUDY, ROOT

LAYERS = {"fedcare": 0, "privacy": 1, "client": 2, "server": 2, "strategies": 2, "export": 3, "inference": 3,
          "deploy": 4, "simulations": 5, "cli": 6}
ALSO_ALLOWED = {("server", "strategies"), ("inference", "export")}
COMMANDS = 6
HEAVY = ("torch", "opacus", "flwr", "onnxruntime", "onnx", "ray")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> every module it imports anywhere in its body (internal modules resolved to files)."""
    modules = {_module_name(root, p): p for pkg in LAYERS for p in (root / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import name`: name may be a submodule
                found.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                             for a in node.names)
        graph[name] = {m if m in modules else m.split(".")[0] for m in found}
    return graph


def _layer(module: str) -> int | None:
    top = module.split(".")[0]
    if top not in LAYERS:
        return None
    return COMMANDS if module.endswith(".commands") or top == "cli" else LAYERS[top]


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for module, imports in sorted(graph.items()):
        layer, package = _layer(module), module.split(".")[0]
        for target in sorted(imports):
            target_package, target_layer = target.split(".")[0], _layer(target)
            if target_layer is None or target_package == package:
                continue
            if target_package == "simulations" and layer != COMMANDS:
                found.append(f"{module} imports {target}: nothing but commands imports simulations")
            elif layer != COMMANDS and target_layer >= layer and (package, target_package) not in ALSO_ALLOWED:
                found.append(f"{module} imports {target}: {package} (layer {layer}) may not import {target_package}")
    for module in sorted(graph):
        if module.split(".")[0] in ("export", "inference") and _layer(module) != COMMANDS:
            reached = _reachable(graph, module)
            if "flwr" in reached:
                path = " -> ".join(_path(graph, module, "flwr"))
                found.append(f"{module} reaches Flower: {path}")
        if module.split(".")[0] == "fedcare" and "flwr" in _reachable(graph, module):
            found.append(f"{module} (kernel) reaches Flower: {' -> '.join(_path(graph, module, 'flwr'))}")
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in _cycles(graph)]
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _path(graph: dict[str, set[str]], start: str, goal: str) -> list[str]:
    previous, todo = {start: None}, [start]
    while todo:
        node = todo.pop(0)
        if node == goal:
            path = [node]
            while previous[path[-1]] is not None:
                path.append(previous[path[-1]])
            return path[::-1]
        for target in sorted(graph.get(node, ())):
            if target not in previous:
                previous[target] = node
                todo.append(target)
    return [start, "?", goal]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of internal modules with more than one member."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component) + [sorted(component)[0]])

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_every_import_follows_the_layering_rules():
    assert violations(import_graph(ROOT)) == []


def test_the_checker_catches_each_kind_of_violation(tmp_path):
    """The rules above are only as good as the checker: a tree that breaks each rule is reported for each."""
    files = {
        "fedcare/__init__.py": "",
        "fedcare/a.py": "def f():\n    from fedcare import b\n",  # a lazy import that closes a cycle
        "fedcare/b.py": "import fedcare.a\n",
        "server/__init__.py": "",
        "server/app.py": "def main():\n    from client.training import train\n",
        "client/__init__.py": "",
        "client/training.py": "import flwr\n",
        "export/__init__.py": "",
        "export/package.py": "from client.training import train\n",
        "privacy/__init__.py": "",
        "privacy/guard.py": "from simulations.cohorts import write\n",
        "simulations/__init__.py": "",
        "simulations/cohorts.py": "",
        "simulations/commands.py": "from simulations import cohorts\nfrom deploy import kits\n",
        "deploy/__init__.py": "",
        "deploy/kits.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = "\n".join(violations(import_graph(tmp_path)))
    assert "server.app imports client.training: server (layer 2) may not import client" in found
    assert "export.package imports client.training" not in found  # a lower layer: allowed ...
    assert "export.package reaches Flower: export.package -> client.training -> flwr" in found  # ... but not Flower
    assert "privacy.guard imports simulations.cohorts: nothing but commands imports simulations" in found
    assert "import cycle: fedcare.a -> fedcare.b -> fedcare.a" in found
    assert "simulations.commands" not in found  # commands may import anything


def _loaded_after(code: str) -> list[str]:
    """The heavy libraries a fresh interpreter has imported after running `code`."""
    probe = f"import sys\n{code}\nprint(repr(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own repr of a list of names


@pytest.mark.parametrize("argv", [["--help"], ["study", "check", str(DEFAULT_STUDY)], ["serve", "--help"],
                                  ["verify", "--help"], ["export", "--help"]])
def test_light_commands_load_no_training_stack(argv):
    assert _loaded_after(f"from cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass") == []


def test_every_top_level_package_has_a_layer():
    """A new top-level package must be placed in the layering before the checker above can see it."""
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "bench"} == set(LAYERS)


def test_every_command_of_the_table_is_registered_by_its_module():
    """`cli`'s table names, for each command, the module that registers it; the module must really add it."""
    import argparse
    import importlib

    from cli import COMMANDS

    for name, command in COMMANDS.items():
        assert command.module == "cli.study" or command.module.endswith(".commands"), name  # the commands layer
        commands = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(command.module).register(commands)
        assert name in commands.choices, f"{command.module}.register does not add '{name}'"
