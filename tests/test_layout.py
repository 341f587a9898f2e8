"""The shape of the house, checked: layers import downwards only, commands stay out of
each other's modules, nothing imports in a loop, no file or function grows past what a
reader takes in at once, and no module reaches into another's private names.

Read from the source text (ast), so it needs neither Ray nor torch. Function-level
(lazy) imports count as much as top-level ones: a loop hidden inside a function is
still a loop.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("jobs", "pipelines", "models")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80
LONG_FUNCTION_MARK = "# long:"
"""A function may exceed MAX_FUNCTION_LINES when a comment starting with this mark,
directly above its ``def`` (or its decorators), says why."""

GROUND_FLOOR = {"clray.jobs.config", "clray.jobs.runtime", "clray.jobs.events", "clray.jobs.views", "clray.jobs.report"}
"""Modules (and packages: their modules too) every command may use: configuration, the
runtime, the events a run sends, and rendering (the CLI's views, a run's report page)."""
COMMANDS = ("tune", "mine", "submit", "clustercheck", "eval")
"""Command packages under jobs/: none imports another's modules (jobs.cli dispatches to all)."""


def source_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["clray", *parts])


def imports(path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [a.name for a in node.names], node.lineno


def project_modules() -> dict[str, Path]:
    mods = {module_name(p): p for p in source_files(*PACKAGES)}
    mods["clray"] = ROOT / "__init__.py"
    return mods


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports (``from pkg import mod`` counts as importing pkg.mod)."""
    mods = project_modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for target, names, _ in imports(path):
            if not target.startswith("clray"):
                continue
            found = {f"{target}.{n}" for n in names if f"{target}.{n}" in mods}
            if not found and target in mods:
                found = {target}
            graph[mod] |= {t for t in found if t != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def _package_init_edges(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's __init__ re-exporting its own modules is not a loop with them."""
    out = {}
    for mod, targets in graph.items():
        out[mod] = {t for t in targets if not (t.startswith(mod + ".") and (ROOT / Path(*mod.split(".")[1:]) / "__init__.py").is_file())}
    return out


def test_no_import_loop() -> None:
    graph = _package_init_edges(import_graph())
    assert cycles(graph) == []


def layer(mod: str) -> str:
    parts = mod.split(".")
    if len(parts) < 2:
        return "api"
    if parts[1] != "jobs":
        return parts[1]
    if mod == "clray.jobs" or any(mod == g or mod.startswith(g + ".") for g in GROUND_FLOOR):
        return "jobs.ground"
    if len(parts) > 2 and parts[2] == "run":
        return "jobs.run"
    if mod == "clray.jobs.cli" or parts[-1] == "__main__":
        return "jobs.cli"  # program entry points dispatch to commands; nothing imports them
    return f"jobs.command.{parts[2]}"


ALLOWED = {
    "models": {"models"},
    "pipelines": {"pipelines", "models"},
    "jobs.ground": {"jobs.ground", "pipelines", "models"},
    "jobs.run": {"jobs.run", "jobs.ground", "pipelines", "models"},
}


def test_layers_import_downwards_and_commands_stay_apart() -> None:
    wrong = []
    for mod, targets in import_graph().items():
        here = layer(mod)
        for target in targets:
            there = layer(target)
            if here in ALLOWED:
                ok = there in ALLOWED[here]
            elif here.startswith("jobs.command."):
                ok = there == here or there in {"jobs.run", "jobs.ground", "pipelines", "models"}
            else:  # the CLI and the package's public API may use anything
                ok = True
            if not ok:
                wrong.append(f"{mod} ({here}) imports {target} ({there})")
    assert wrong == []


def test_no_file_over_the_limit() -> None:
    files = [*source_files(*PACKAGES, "benchmarks", "tests"), ROOT / "__init__.py", ROOT / "setup.py"]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert long == {}


def _long_functions(path: Path) -> Iterator[str]:
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        above = lines[first - 2].strip() if first >= 2 else ""
        if length > MAX_FUNCTION_LINES and not above.startswith(LONG_FUNCTION_MARK):
            yield f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)"


def test_no_function_over_the_limit_without_a_reason() -> None:
    found = [f for p in source_files(*PACKAGES, "benchmarks") for f in _long_functions(p)]
    assert found == []


def test_no_private_name_imported_across_modules() -> None:
    found = []
    for path in source_files(*PACKAGES):
        for target, names, line in imports(path):
            if target.startswith("clray"):
                found += [f"{path.relative_to(ROOT)}:{line} {target}.{n}" for n in names if n.startswith("_")]
    assert found == []


@pytest.mark.parametrize("case", ["loop", "upward", "command"])
def test_the_checks_can_fail(case: str) -> None:
    """The checks above find what they look for (so a passing run means something)."""
    if case == "loop":
        assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    elif case == "upward":
        assert layer("clray.models.towers") == "models" and "jobs.run" not in ALLOWED["models"]
        assert layer("clray.jobs.config") == "jobs.ground" and "jobs.run" not in ALLOWED["jobs.ground"]
    else:
        assert layer("clray.jobs.tune.trial") == "jobs.command.tune" != layer("clray.jobs.mine.command")
