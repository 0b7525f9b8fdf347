"""Import arrows point one way: no cycles, no import from a higher layer, no other module's private names.

Every import counts, at the top of a file or inside a function (an import inside a function that
dodges a cycle is still the cycle). The layers, lowest first:

    kconfig  <  model, optim, data  <  parallel, hf  <  harness  <  train  <  export  <  evaluation  <  plan  <  kbuild, scripts

A module may import its own layer and the layers below it. kbuild imports plan, data and train
inside its commands only to keep torch out of quick commands; that is an arrow downward, allowed.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = {"kconfig": 0, "model": 1, "optim": 1, "data": 1, "parallel": 2, "hf": 2, "harness": 3, "train": 4,
          "export": 5, "evaluation": 6, "plan": 7, "kbuild": 8, "scripts": 8}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    """Every module of the layered packages, by dotted name."""
    return {module_name(p): p for package in LAYERS for p in sorted((ROOT / package).rglob("*.py"))}


@lru_cache(maxsize=None)
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(module imported, name taken from it or None, line) for every import in the file, and for every
    private attribute read through an imported module (``runner._start`` after ``from plan import runner``)."""
    found, aliases = [], {}
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((alias.name, None, node.lineno))
                if alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                # "from data import stream" imports the module data.stream; "from data.mix import as_mix" a name
                if child in modules():
                    found.append((child, None, node.lineno))
                    aliases[alias.asname or alias.name] = child
                else:
                    found.append((node.module, alias.name, node.lineno))
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            if node.attr.startswith("_") and not node.attr.startswith("__"):
                found.append((aliases[node.value.id], node.attr, node.lineno))
    return [(m, name, line) for m, name, line in found if m.split(".")[0] in LAYERS]


@lru_cache(maxsize=None)
def graph() -> dict[str, dict[str, int]]:
    """{module: {imported module: first line}} over the layered packages."""
    out = {}
    for name, path in modules().items():
        edges: dict[str, int] = {}
        for target, _, line in imports(path):
            if target != name:
                edges.setdefault(target, line)
        out[name] = edges
    return out


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(ROOT)}:{line}"


def cycles(g: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g.get(v, {}):
            if w not in g:
                continue
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_layered_package_is_found():
    assert {name.split(".")[0] for name in modules()} == set(LAYERS)
    assert len(modules()) > 60 and sum(len(e) for e in graph().values()) > 150  # the rule still sees the imports


def test_every_import_names_a_module_that_exists():
    """An import inside a function runs only when called: a module moved away must not leave one behind."""
    found = [f"{where(m, line)}: {target}" for m, edges in graph().items() for target, line in edges.items()
             if target not in modules()]
    assert not found, "imports of modules that do not exist:\n" + "\n".join(found)


def test_no_import_cycles():
    g = graph()
    found = [" <-> ".join(c) + ": " + ", ".join(f"{where(a, g[a][b])} imports {b}" for a in c for b in c if b in g[a])
             for c in cycles(g)]
    assert not found, "modules that import each other (move what both need below them):\n" + "\n".join(found)


def test_no_import_from_a_higher_layer():
    order = " < ".join(dict.fromkeys(f"{'/'.join(p for p in LAYERS if LAYERS[p] == n)}" for n in LAYERS.values()))
    found = [f"{where(m, line)}: {m} (layer {LAYERS[m.split('.')[0]]}) imports {t} (layer {LAYERS[t.split('.')[0]]})"
             for m, edges in graph().items() for t, line in edges.items()
             if LAYERS[t.split(".")[0]] > LAYERS[m.split(".")[0]]]
    assert not found, f"upward imports (the layers are {order}):\n" + "\n".join(found)


def test_packages_of_one_layer_do_not_import_each_other():
    """model, optim and data stand side by side: each is usable without the others."""
    found = [f"{where(m, line)}: {m} imports {t}" for m, edges in graph().items() for t, line in edges.items()
             if m.split(".")[0] != t.split(".")[0] and LAYERS[t.split(".")[0]] == LAYERS[m.split(".")[0]]]
    assert not found, "imports between packages of the same layer:\n" + "\n".join(found)


def test_no_module_imports_another_modules_private_names():
    found = [f"{where(m, line)}: {target}.{name}"
             for m, path in modules().items() for target, name, line in imports(path)
             if name and name.startswith("_") and not name.startswith("__") and target != m]
    assert not found, ("private names used outside their module; give them a public name where they "
                       "live:\n" + "\n".join(found))


def test_a_cycle_is_found_however_long():
    g = {"data.a": {"data.b": 1}, "data.b": {"data.c": 2}, "data.c": {"data.a": 3}, "data.d": {"data.a": 4}}
    assert cycles(g) == [["data.a", "data.b", "data.c"]]


def test_imports_inside_functions_and_private_attributes_are_seen(tmp_path):
    source = tmp_path / "consumer.py"
    source.write_text("import data.corpus as corpus\n"
                      "from plan import runner\n"
                      "def f():\n"
                      "    from plan.runner import _start\n"
                      "    import train.untrusted\n"
                      "    return runner._finish, corpus.slug, runner.__name__\n")
    assert sorted(imports(source), key=lambda i: i[2]) == [
        ("data.corpus", None, 1), ("plan.runner", None, 2), ("plan.runner", "_start", 4), ("train.untrusted", None, 5),
        ("plan.runner", "_finish", 6)]
