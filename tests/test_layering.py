"""The layering of docs/architecture.md, checked by reading every import in jaxlm/ (module-level
and function-local alike: a lazy import that closes a circle is still a circle)."""

import ast
import os
from collections.abc import Iterable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "jaxlm")
MAX_LINES = 400


def module_files() -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


MODULES = module_files()


def imports_of(module: str) -> set[str]:
    """The jaxlm modules `module` imports (a `from pkg import name` counts pkg.name when that is a module)."""
    path = MODULES[module]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:  # a.b.c where only a.b is a module
                name = name.rpartition(".")[0]
            if name.startswith("jaxlm") and name != module:
                found.add(name)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def under(module: str, prefixes: Iterable[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def violations(sources: Iterable[str], forbidden: Iterable[str], allowed_sources: Iterable[str] = ()) -> list[str]:
    forbidden, allowed_sources = tuple(forbidden), tuple(allowed_sources)
    return sorted(f"{m} imports {t}" for m in MODULES if under(m, tuple(sources)) and not under(m, allowed_sources)
                  for t in GRAPH[m] if under(t, forbidden))


def test_models_know_no_data_loop_or_storage():
    leaves = ("jaxlm.models", "jaxlm.errors")
    bad = [f"{m} imports {t}" for m in MODULES if under(m, ("jaxlm.models",)) for t in GRAPH[m]
           if not under(t, leaves)]
    assert not bad, bad


def test_data_knows_no_model_and_no_loop():
    bad = violations(["jaxlm.data"], ["jaxlm.models", "jaxlm.tasks", "jaxlm.train", "jaxlm.trainer",
                                      "jaxlm.sharded_model", "jaxlm.checkpoint", "jaxlm.run", "jaxlm.resolve",
                                      "jaxlm.convert", "jaxlm.cli", "jaxlm.commands"])
    assert not bad, bad


def test_nothing_below_the_command_line_imports_it():
    bad = violations(["jaxlm"], ["jaxlm.cli", "jaxlm.commands"],
                     allowed_sources=["jaxlm.cli", "jaxlm.commands", "jaxlm.__main__"])
    assert not bad, bad


def test_the_loop_imports_no_inference_command():
    bad = violations(["jaxlm.train", "jaxlm.trainer", "jaxlm.sharded_model", "jaxlm.resolve", "jaxlm.eval_loop",
                      "jaxlm.checkpoint", "jaxlm.tasks"],
                     ["jaxlm.evaluate", "jaxlm.generate", "jaxlm.predict", "jaxlm.serve", "jaxlm.export", "jaxlm.bench",
                      "jaxlm.aot", "jaxlm.scaling"])
    assert not bad, bad


def test_the_base_layers_import_only_errors():
    base = ("jaxlm.errors", "jaxlm.io", "jaxlm.bucket_fs", "jaxlm.compat")
    bad = [f"{m} imports {t}" for m in base if m in MODULES for t in GRAPH[m]
           if t not in ("jaxlm.errors", "jaxlm.bucket_fs")]
    assert not bad, bad


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        path.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return []


def test_no_import_cycle():
    # A package's __init__ re-exporting its submodules is not a circle: edges from a submodule to
    # its own package are left out (Python loads the package first either way).
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in GRAPH.items()}
    cycle = find_cycle(graph)
    assert not cycle, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_lazy_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []


def test_no_module_over_400_lines():
    long = {m: n for m, path in MODULES.items() if (n := sum(1 for _ in open(path, encoding="utf-8"))) > MAX_LINES}
    assert not long, long


def test_the_checker_sees_real_edges():
    """The checks above pass for the right reason: the graph has the edges we know exist."""
    assert "jaxlm.models.config" in GRAPH["jaxlm.config"]
    assert "jaxlm.trainer" in GRAPH["jaxlm.train"]
    assert "jaxlm.data.tokenizer" in GRAPH["jaxlm.run"]
