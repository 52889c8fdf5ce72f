"""The layering the code promises (docs/architecture.md), checked from the source with ``ast``.

core ← libraries ← stages ← flows / registry ← CLI: imports run one way, there are no cycles, and the
stage list has one source that ``dvc.yaml``, the dispatcher and the CLI agree on.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import yaml

from components.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("components", "registry", "flows", "metarec")


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Every module of ours -> the modules of ours it imports (at top level or inside functions)."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert node.level == 0, f"{path}: relative import; the layering check needs absolute ones"
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> str:
    if module.startswith("components.core"):
        return "core"
    return module.split(".")[0]


# Who may import whom: a layer may import itself and the layers listed.
ALLOWED = {
    "core": {"core"},
    "components": {"core", "components"},
    "registry": {"core", "components", "registry"},
    "flows": {"core", "components", "registry", "flows"},
    "metarec": {"core", "components", "registry", "flows", "metarec"},
}


def test_no_import_cycles() -> None:
    assert _cycles(import_graph()) == []


def test_cycle_detection_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_run_one_way() -> None:
    graph = import_graph()
    assert "components.core.config" in graph and "registry.store" in graph  # the walk saw the code
    upward = sorted(
        f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) not in ALLOWED[_layer(m)]
    )
    assert upward == []


def test_stage_list_has_one_source() -> None:
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    assert tuple(dvc) == STAGES
    for name, spec in dvc.items():
        assert spec["cmd"] == f"metarec stage {name} --workspace .", name
        module = ROOT / "components" / "stages" / f"{name}.py"
        tree = ast.parse(module.read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in tree.body), module


def test_cli_stage_help_lists_every_stage() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "metarec", "stage", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    for name in STAGES:
        assert name in text, name
