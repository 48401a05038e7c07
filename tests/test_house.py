"""The house rules, checked on the source tree: no import circle between modules (an
import anywhere in a module counts, inside functions too), no source file over 600
lines, the core names no plugin and no plugin imports another."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def packages() -> dict[str, Path]:
    """Top-level package name -> its directory: the core and each plugin's packages."""
    found = {"convcore": ROOT / "convcore"}
    for project in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        for init in sorted(project.parent.glob("*/__init__.py")):
            if init.parent.name != "tests":
                found[init.parent.name] = init.parent
    return found


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every source module (tests and templates left out)."""
    out = {}
    for name, directory in packages().items():
        for path in sorted(directory.rglob("*.py")):
            rel = path.relative_to(directory)
            if {"tests", "templates", "build"} & set(rel.parts):
                continue
            dotted = ".".join((name, *rel.with_suffix("").parts))
            out[dotted.removesuffix(".__init__")] = path
    return out


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The known modules ``module`` imports (resolved to the longest known prefix)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            # a package importing its own submodules, or a module its parent package, is
            # how Python packages are built: the package's __init__ is not a circle member
            if name and name != module and not module.startswith(name + "."):
                targets.add(name)
    return targets


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
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
                    found.append(sorted(component))
    return found


def test_no_import_circles():
    known = modules()
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    assert circles(graph) == []


def test_the_circle_finder_finds_one():
    """The check above can fail: a planted circle of three is found, a chain is not."""
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules().values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_plugins_stay_independent():
    """The core imports no plugin package; a plugin imports no other plugin's."""
    known = modules()
    plugin_packages = set(packages()) - {"convcore"}
    owner = {}
    for project in (ROOT / "plugins").glob("*/pyproject.toml"):
        names = {p.parent.name for p in project.parent.glob("*/__init__.py")}
        for name in names:
            owner[name] = project.parent.name
    # the test kit (convcore.testing) may drive plugins, as tests do
    for module, path in known.items():
        if module.startswith("convcore.testing"):
            continue
        top = module.split(".")[0]
        used = {t.split(".")[0] for t in imports_of(module, path, known)} & plugin_packages
        if top == "convcore":
            assert used == set(), f"{path}: the core imports {sorted(used)}"
        else:
            others = {u for u in used if owner.get(u) != owner.get(top)}
            deps = tomllib.loads((ROOT / "plugins" / owner[top] / "pyproject.toml").read_text())
            declared = " ".join(deps["project"].get("dependencies", []))
            # a plugin may build on another only by declaring it (convcore-ray on the fleet)
            undeclared = {u for u in others if owner[u] not in declared}
            assert undeclared == set(), f"{path}: imports {sorted(undeclared)}"
