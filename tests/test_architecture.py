"""The shape of the house, checked from the source with Python's ast (docs/architecture.md draws it).

A module is a file of qapollo/, or a whole subpackage (config/, optim/, checkpoint/ count as one each).
Every import counts, function-level ones included.
"""
import ast
import os

from tests.helpers import ROOT

PKG = os.path.join(ROOT, "qapollo")
SUBPACKAGES = {d for d in os.listdir(PKG) if os.path.isfile(os.path.join(PKG, d, "__init__.py"))}
# the modules that import nothing of ours; config imports the error base class alone (errors.py: a leaf)
LEAVES = {"quant": set(), "optim": set(), "errors": set(), "config": {"errors"}}
FORBIDDEN = {"checkpoint": {"train", "layerwise", "engine"},
             "planner": {"model", "hf_import", "checkpoint", "train", "engine", "layerwise"}}
MAX_LINES, MAX_FUNCTION_LINES, MAX_CHAIN = 400, 80, 8


def source_files():
    """(unit, dotted package of the file, path) of every .py file of qapollo/ and run_7b.py."""
    out = [("run_7b", "", os.path.join(ROOT, "run_7b.py"))]
    for d, _, files in os.walk(PKG):
        rel = os.path.relpath(d, PKG)
        for f in sorted(files):
            if not f.endswith(".py"):
                continue
            parts = [] if rel == "." else rel.split(os.sep)
            unit = parts[0] if parts else ("__init__" if f == "__init__.py" else f[:-3])
            pkg = ".".join(["qapollo"] + parts)
            out.append((unit, pkg, os.path.join(d, f)))
    return out


def unit_of(dotted: str) -> str | None:
    """The module (unit) of an absolute dotted name inside qapollo; None outside it."""
    parts = dotted.split(".")
    if parts[0] != "qapollo":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1]


def imports(tree, pkg: str):
    """(unit, names taken, the node) of every import of ours in the file, at any depth."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if unit_of(a.name):
                    yield unit_of(a.name), [], node
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                dotted = ".".join(base + ([node.module] if node.module else []))
            else:
                dotted = node.module or ""
            unit = unit_of(dotted)
            if unit is None:
                continue
            if unit == "__init__":  # `from qapollo import x` / `from . import x`: x may be a module
                for a in node.names:
                    sub = a.name if os.path.exists(os.path.join(PKG, a.name + ".py")) or a.name in SUBPACKAGES \
                        else "__init__"
                    yield sub, ([] if sub != "__init__" else [a.name]), node
            else:
                yield unit, [a.name for a in node.names], node


def graph():
    edges, private = {}, []
    for unit, pkg, path in source_files():
        tree = ast.parse(open(path).read())
        aliases = {}  # local names bound to a module of ours: `from . import checkpoint as ck`
        for target, names, node in imports(tree, pkg):
            if target != unit:
                edges.setdefault(unit, set()).add(target)
                private += [f"{path}: {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
            if isinstance(node, ast.ImportFrom) and not names:
                for a in node.names:
                    aliases[a.asname or a.name] = target
        for node in ast.walk(tree):  # module._name through a module alias
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__") and aliases[node.value.id] != unit:
                private.append(f"{path}: {aliases[node.value.id]}.{node.attr}")
        edges.setdefault(unit, set())
    return edges, private


def longest_chain(edges, start):
    memo = {}

    def depth(u, seen):
        if u in memo:
            return memo[u]
        best = [u]
        for v in edges.get(u, ()):
            assert v not in seen, f"import circle through {u} -> {v}"
            chain = depth(v, seen | {v})
            if len(chain) + 1 > len(best):
                best = [u] + chain
        memo[u] = best
        return best
    return depth(start, {start})


def circles(edges):
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(u):
        index[u] = low[u] = n[0]
        n[0] += 1
        stack.append(u)
        on.add(u)
        for v in edges.get(u, ()):
            if v not in index:
                visit(v)
                low[u] = min(low[u], low[v])
            elif v in on:
                low[u] = min(low[u], index[v])
        if low[u] == index[u]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == u:
                    break
            if len(group) > 1:
                out.append(sorted(group))
    for u in list(edges):
        if u not in index:
            visit(u)
    return out


def test_no_import_circle():
    assert circles(graph()[0]) == []


def test_longest_import_chain_from_run_7b():
    chain = longest_chain(graph()[0], "run_7b")
    assert len(chain) <= MAX_CHAIN, " -> ".join(chain)


def test_low_modules_import_nothing_of_ours():
    edges = graph()[0]
    for unit, allowed in LEAVES.items():
        assert edges[unit] <= allowed, (unit, edges[unit] - allowed)


def test_forbidden_arrows():
    edges = graph()[0]
    for unit, never in FORBIDDEN.items():
        assert not edges[unit] & never, (unit, edges[unit] & never)


def test_no_module_imports_another_modules_private_names():
    assert graph()[1] == []


def test_files_and_functions_are_short():
    long_files, long_functions = [], []
    for _, _, path in source_files():
        text = open(path).read()
        if text.count("\n") > MAX_LINES:
            long_files.append((path, text.count("\n")))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long_functions.append((path, node.name, n))
    assert long_files == [] and long_functions == []


def test_docs_architecture_lists_every_arrow():
    """docs/architecture.md's 'Every arrow' list is the code's import graph, arrow for arrow."""
    import re
    text = open(os.path.join(ROOT, "docs", "architecture.md")).read()
    drawn = {}
    for m in re.finditer(r"^- `(\w+)` → (.+)$", text, re.M):
        drawn[m.group(1)] = {x.strip() for x in m.group(2).split(",")}
    code = {u: targets for u, targets in graph()[0].items() if targets}
    assert drawn == code


def test_every_error_of_qapollo_derives_from_the_one_base_class():
    """The CLI catches QapolloError once (cli.py): every exception class qapollo defines must derive from it."""
    import importlib
    import inspect

    from qapollo.errors import QapolloError
    found = []
    for _, pkg, path in source_files():
        if not pkg:
            continue
        name = os.path.splitext(os.path.basename(path))[0]
        mod = importlib.import_module(pkg if name == "__init__" else f"{pkg}.{name}")
        found += [c for _, c in inspect.getmembers(mod, inspect.isclass)
                  if issubclass(c, BaseException) and c.__module__ == mod.__name__]
    assert len(found) >= 15
    # stops.Interrupted (a second Ctrl-C) is no error: a KeyboardInterrupt, so that no `except Exception` takes it
    assert [c.__qualname__ for c in found if not issubclass(c, QapolloError)] == ["Interrupted"]
    assert all(issubclass(c, KeyboardInterrupt) for c in found if not issubclass(c, QapolloError))
