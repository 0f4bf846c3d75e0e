"""The package's layering, read from its import statements (parsed with ast, nothing imported).

The layers: data makes rays (scenes, cameras, targets); renderers sample rays and composite samples; fields
answer queries at points; app wires them into runs and commands; cuda is below all of them (kernels and
their torch twins: torch only). So fields and renderers never name each other (app hands a field to a
renderer as a callable), only app names app, data names neither fields nor renderers, and cuda names no
other layer. And no module imports itself through a cycle, except a package's `__init__` and its own
submodules (the fields registry: `__init__` defines `register`, then imports the backends that call it).

Every import counts, also those inside functions (lazy imports are still dependencies: a lazy one breaks a
cycle at import time, not in the design) and those under `if TYPE_CHECKING:` (types are part of the API).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `recon`
LAYERS = ("app", "fields", "renderers", "data", "cuda")
FORBIDDEN = {  # layer -> the layers it must not import (and app is imported from app alone)
    "fields": {"renderers"},
    "renderers": {"fields"},
    "data": {"fields", "renderers"},
    "cuda": {"fields", "renderers", "data"},
}

Graph = dict[str, dict[str, int]]  # module -> {imported module: line of its first import}


def module_name(path: Path) -> str:
    parts = ("recon",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def import_graph() -> Graph:
    """Each module's imports of other `recon` modules, wherever the statement is."""
    paths = [ROOT / "__init__.py"] if (ROOT / "__init__.py").exists() else []
    paths += sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))
    modules = {module_name(p): p for p in paths}
    graph: Graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from .x import y` from the module's own package (or above)
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                # `from recon.fields import hashgrid` imports the module recon.fields.hashgrid where there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                while target not in modules and "." in target:  # `import recon.x.y.z` of a name: its module
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def is_registry_edge(source: str, target: str) -> bool:
    """A package's submodule importing the package's `__init__` (which imports the submodule back)."""
    return source.startswith(target + ".")


def find_cycles(graph: Graph) -> list[list[str]]:
    """A cycle for each back edge of a depth-first walk: none if and only if the graph has no cycle."""
    edges = {m: sorted(t for t in targets if not is_registry_edge(m, t)) for m, targets in graph.items()}
    done: set[str] = set()
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        path.append(module)
        for target in edges[module]:
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif target not in done:
                visit(target)
        path.pop()
        done.add(module)

    for module in sorted(edges):
        if module not in done:
            visit(module)
    return cycles


def test_the_graph_sees_the_package() -> None:
    """The parser finds what is plainly there, so the other tests cannot pass on an empty graph."""
    graph = import_graph()
    assert {"recon.app.cli", "recon.fields.hashgrid", "recon.renderers.render", "recon.data.scene"} <= set(graph)
    assert "recon.fields" in graph["recon.fields.hashgrid"]  # from recon.fields import register
    assert "recon.fields.surface" in graph["recon.fields"]  # from recon.fields.surface import SurfaceField
    assert "recon.data.cameras" in graph["recon.data.scene"]  # from .cameras import Cameras
    assert any("recon.app.viewer" in graph[m] for m in graph)  # imported inside functions only (viser is slow)


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = [" -> ".join(cycle) for cycle in find_cycles(graph)]
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_layers_import_only_downwards() -> None:
    graph = import_graph()
    offences = [f"{module} imports {target} (line {line}): {layer(module)} must not import {layer(target)}"
                for module, targets in sorted(graph.items()) for target, line in sorted(targets.items())
                if layer(target) in FORBIDDEN.get(layer(module) or "", ()) or
                (layer(target) == "app" and layer(module) != "app")]
    assert not offences, "imports against the layering:\n  " + "\n  ".join(offences)
