"""The package's layers run one way: nothing imports a module of a layer above its own, and no
modules import each other in a circle (README, "Repository").

    core     shared definitions: errors, atomic writes, typed settings    cellpaint/core
    domain   metadata, plate groups, images, augmentation, the dataset,   cellpaint/data, cellpaint/networks,
             the model, the prediction-file format                        dataset.py, model.py
    engine   model/optimizer setup, one epoch, inference with TTA         cellpaint/engine
    modes    train, val, predict, pseudo-labels, submission, kNN          cellpaint/modes
    commands the command lines and their shared machinery                 cellpaint/cli, main.py, make_submission.py,
                                                                          prepare.py, synthetic.py, demo.py, tools/

Every import counts: at the top of a module, inside a function, or under TYPE_CHECKING (a type
is a dependency too). benchmarks/ and tests/ sit above everything and are not checked.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import ROOT

LAYERS = ("core", "domain", "engine", "modes", "commands")
TOP_LEVEL = {"dataset": "domain", "model": "domain", "main": "commands", "make_submission": "commands",
             "prepare": "commands", "synthetic": "commands", "demo": "commands", "wilds_demo": "commands",
             "tools": "commands"}
PACKAGE = {"core": "core", "data": "domain", "networks": "domain", "engine": "engine", "modes": "modes",
           "cli": "commands"}


def layer_of(module: str) -> str | None:
    """The layer of a project module (dotted name), None for anything else (torch, numpy, ...)."""
    parts = module.split(".")
    if parts[0] == "cellpaint":
        if len(parts) == 1:
            return "core"  # the package's (empty) __init__
        if parts[1] not in PACKAGE:
            raise AssertionError(f"cellpaint.{parts[1]} belongs to no layer: add its folder to PACKAGE")
        return PACKAGE[parts[1]]
    return TOP_LEVEL.get(parts[0])


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(source: str, module: str) -> set[str]:
    """Every project module `source` imports, wherever the import statement stands."""
    found = set()
    package = module.rsplit(".", 1)[0] if "." in module else ""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod where it is one
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if layer_of(n) is not None)
    return found


def project_modules() -> dict[str, Path]:
    paths = [p for p in ROOT.glob("*.py")] + list((ROOT / "cellpaint").rglob("*.py")) + list((ROOT / "tools").glob("*.py"))
    return {module_name(p): p for p in paths}


def known(name: str, modules: dict[str, Path]) -> str | None:
    """`name` as a module of the project (a name imported from a module is that module)."""
    while name and name not in modules:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = {known(n, modules) for n in imports_of(path.read_text(), name)}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return sorted(f"{a} ({layer_of(a)}) imports {b} ({layer_of(b)})" for a, targets in graph.items()
                  for b in targets if rank[layer_of(b)] > rank[layer_of(a)])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert all(layer_of(name) for name in project_modules()), sorted(n for n in project_modules() if not layer_of(n))


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports(import_graph()) == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_checks_see_upward_imports_and_circles_wherever_they_stand():
    """The detector itself: an import inside a function or under TYPE_CHECKING counts, and a
    planted upward edge and a planted circle are reported."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cellpaint.modes.train import train\n"
              "def f():\n    import main\n    from cellpaint.engine import setup\n")
    assert imports_of(source, "cellpaint.data.x") >= {"cellpaint.modes.train", "main", "cellpaint.engine.setup"}
    graph = {"cellpaint.data.metadata": {"cellpaint.engine.setup"}, "cellpaint.engine.setup": set()}
    assert upward_imports(graph) == ["cellpaint.data.metadata (domain) imports cellpaint.engine.setup (engine)"]
    ring = {"cellpaint.modes.a": {"cellpaint.modes.b"}, "cellpaint.modes.b": {"cellpaint.modes.a"}}
    assert circles(ring) == [["cellpaint.modes.a", "cellpaint.modes.b"]]


def test_the_readme_module_map_names_every_module():
    """README.md's "Repository" map is the tree: every folder of the package stands under its layer,
    and every module in it is named in the folder's entry."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("## Repository"):]
    lines = block[:block.index("\n## ", 1)].split("\n")
    for folder, layer in PACKAGE.items():
        start = next(i for i, line in enumerate(lines) if f"cellpaint/{folder}/" in line)
        under = next(line.split()[0] for line in reversed(lines[:start + 1]) if line.split()[:1] and
                     line.split()[0] in LAYERS)
        assert under == layer, (folder, under)
        entry = [lines[start]] + [line for line in lines[start + 1:start + 6] if line.startswith(" " * 20)
                                  and "cellpaint/" not in line]
        words = set(re.findall(r"[a-z_]+", " ".join(entry)))
        missing = [m.name for m in sorted((ROOT / "cellpaint" / folder).glob("*.py"))
                   if m.stem != "__init__" and m.stem not in words]
        assert not missing, f"README's map lacks cellpaint/{folder}/: {missing}"
