"""The package as a whole: what importing it runs, and how its modules depend on each other."""

import ast
import pathlib

import tensorconv

ROOT = pathlib.Path(tensorconv.__file__).parent


def _module_graph():
    """tensorconv's modules -> the tensorconv modules each one imports, anywhere in it (a lazy
    import inside a function counts: it is a dependency all the same)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                target = ".".join(base + (node.module.split(".") if node.module else []))
                for alias in node.names:
                    child = f"{target}.{alias.name}"
                    targets.add(child if child in modules else target)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        # a module reaching back to a package it lives in is no circle: that package has
        # finished its own imports before the module's code can run
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


def test_no_import_circle_anywhere():
    graph = _module_graph()
    assert len(graph) > 40 and graph["tensorconv.plans.plan"]  # the walk found the package
    state, path, circles = {}, [], []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not circles, "\n".join(circles)


def test_version_is_one_number_in_pyproject_package_and_changelog():
    import re

    import tomllib

    with open(ROOT.parent / "pyproject.toml", "rb") as fh:
        version = tomllib.load(fh)["project"]["version"]
    assert tensorconv.__version__ == version
    changelog = (ROOT.parent / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[(\d+\.\d+\.\d+)\] - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert releases and releases[0] == version, releases  # the newest release is this version
    assert releases == sorted(releases, key=lambda v: tuple(map(int, v.split("."))), reverse=True)


def test_every_folder_of_modules_is_a_package():
    """setuptools' find_packages ships only folders with an __init__.py: a folder of modules
    without one would work from a checkout and be missing from the wheel."""
    folders = {path.parent for path in ROOT.rglob("*.py")}
    missing = sorted(str(f.relative_to(ROOT.parent)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, missing


def test_modules_stay_short():
    """One job per module: none over 600 lines (the C++ source aside), the plan under 400."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in ROOT.rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 600}
    assert sizes["plans/plan.py"] < 400
