"""The project's import graph: no cycles in model/ and pipeline/, and model/ never imports pipeline/.

Read statically from the sources (every import statement, inside functions too: a lazy import
that only hides a cycle from the interpreter still counts), so it needs no Beam or JAX.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("model", "pipeline")


def modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file of the packages (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for name in sorted(os.listdir(os.path.join(ROOT, pkg))):
            if name.endswith(".py"):
                mod = pkg if name == "__init__.py" else f"{pkg}.{name[:-3]}"
                out[mod] = os.path.join(ROOT, pkg, name)
    return out


def imports_of(path: str, known: set[str]) -> set[str]:
    """The project modules a file imports anywhere in it. `from pkg import name` counts as an
    import of pkg.name when that is a module, else of pkg."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:
                    out.add(sub)
                elif node.module in known:
                    out.add(node.module)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports_of(path, set(mods)) - {m} for m, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per back edge found by depth-first search."""
    found, state, stack = [], {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)
    return found


def test_graph_sees_the_imports_it_checks():
    g = graph()
    assert "model.params" in g["model.quantize"] and "model.quantize" in g["model.decoder"]
    assert "model" in g["pipeline.handler"]  # `from model import ...`: the package


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_import_cycles(pkg):
    g = graph()
    found = [c for c in cycles(g) if c[0].split(".")[0] == pkg]
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_model_never_imports_pipeline():
    g = graph()
    bad = {m: sorted(n for n in deps if n.split(".")[0] == "pipeline")
           for m, deps in g.items() if m.split(".")[0] == "model"}
    assert not any(bad.values()), f"model/ imports pipeline/: {bad}"
