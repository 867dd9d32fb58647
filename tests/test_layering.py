"""The package's import graph: no cycles, and nothing imports against the layering.

Layers, bottom up: the contract (``mhabench.schema``, importing nothing of mhabench); the package root
(``mhabench/__init__``, ``results``, ``options``) with ``impls``;
``conformance`` and ``benchmarks`` side by side (never importing each other or ``reports``);
``reports`` (reads result files; imports neither ``conformance`` nor ``benchmarks``); the CLI
(``mhabench.cli``, ``mhabench.commands``) on top. Every import counts, inside functions too.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("impls", "conformance", "benchmarks", "reports")
LEVEL = {"root": 0, "impls": 0, "conformance": 1, "benchmarks": 1, "reports": 1, "cli": 2}
APART = {("conformance", "benchmarks"), ("benchmarks", "conformance"), ("conformance", "reports"),
         ("benchmarks", "reports"), ("reports", "conformance"), ("reports", "benchmarks")}


def package_modules() -> dict[str, Path]:
    """Dotted name (as installed: mhabench.impls.base, ...) -> source file, test modules left out."""
    found = {}
    folders = [(ROOT / "mhabench", "mhabench")] + [(ROOT / sub, f"mhabench.{sub}") for sub in SUBPACKAGES]
    for folder, prefix in folders:
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = list(rel.parts)
            if any(p in ("fixtures", "__pycache__") for p in parts) or parts[-1].startswith("test_") \
                    or parts[-1] == "conftest":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in SUBPACKAGES:
        return parts[1]
    if len(parts) > 1 and parts[1] in ("cli", "commands", "__main__"):
        return "cli"
    return "root"


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.startswith("mhabench") else None
                if found and found != module:
                    graph[module].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_graph_sees_every_subpackage():
    graph = import_graph()
    assert {layer(m) for m in graph} == set(LEVEL)
    assert "mhabench.impls.base" in graph["mhabench.impls.registry"]  # a relative import, resolved
    assert "mhabench.results" in graph["mhabench.conformance.session"]  # an absolute one


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_a_planted_cycle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_nothing_imports_against_the_layering():
    graph = import_graph()
    upward = sorted((a, b) for a, targets in graph.items() for b in targets
                    if LEVEL[layer(b)] > LEVEL[layer(a)] or (layer(a), layer(b)) in APART)
    assert upward == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_the_contract_imports_nothing_of_mhabench():
    assert import_graph()["mhabench.schema"] == set()


def test_the_results_module_imports_no_framework_layer():
    """A report is built from result files on a machine with no framework: mhabench.results (the one reader
    of a results directory) reaches only the package root and the contract, never impls."""
    graph = import_graph()
    assert "mhabench.schema" in graph["mhabench.results"]
    assert {m for m in reachable(graph, "mhabench.results") if layer(m) != "root"} == set()
    assert reachable({"r": {"s"}, "s": {"i"}, "i": set()}, "r") == {"s", "i"}  # the walk itself sees through

