"""The import graph of `prospect`: each module sits in a layer and imports only from lower layers
(lazy imports inside functions included), so imports go one way and no cycle can form."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "prospect"

# Lowest first: what a module may use. A new module gets a line here.
LAYERS = [
    {"prospect", "prospect.errors", "prospect.allocator", "prospect.losses", "prospect.kernels", "prospect.data",
     "prospect.data.example"},
    {"prospect.sharding"},
    {"prospect.config", "prospect.checkpoints", "prospect.tracking", "prospect.data.registry", "prospect.data.tool_calls"},
    {"prospect.data.templates", "prospect.data.files", "prospect.data.records"},
    {"prospect.data.encode", "prospect.data.formats", "prospect.model"},
    {"prospect.packing", "prospect.data.report", "prospect.data.pipeline"},
    {"prospect.batching", "prospect.forward"},
    {"prospect.reference"},
    {"prospect.objectives.sft", "prospect.objectives.kto"},
    {"prospect.objectives"},
    {"prospect.train", "prospect.inference"},
    {"prospect.openai_api", "prospect.ray_worker"},
    {"prospect.feedback"},
    {"prospect.ray_launch", "prospect.evaluate", "prospect.export", "prospect.chat", "prospect.serve"},
    {"prospect.launch"},
    {"prospect.cli"},
    {"prospect.__main__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "prospect":
                for alias in node.names:  # `from prospect.objectives import kto` imports a module
                    child = f"{node.module}.{alias.name}"
                    imported.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name.split(".")[0] == "prospect"}
        graph[name] = imported - {name}
    return graph


def test_every_module_has_a_layer():
    placed = [name for layer in LAYERS for name in layer]
    assert len(placed) == len(set(placed)), "a module is in two layers"
    assert set(import_graph()) == set(placed), "put a new module in LAYERS (or remove a deleted one)"


def test_imports_go_one_way():
    level = {name: number for number, layer in enumerate(LAYERS) for name in layer}
    upward = [f"{name} imports {target}" for name, targets in import_graph().items() for target in sorted(targets)
              if level[target] >= level[name]]
    assert upward == [], "imports into the same or a higher layer (a cycle waiting to happen)"


def test_the_graph_sees_lazy_imports():
    """The check reads imports inside functions too: the loop's objectives and the launcher's Ray."""
    graph = import_graph()
    assert {"prospect.objectives.kto", "prospect.objectives.sft"} <= graph["prospect.objectives"]
    assert "prospect.ray_launch" in graph["prospect.launch"]
