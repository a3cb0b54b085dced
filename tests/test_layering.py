"""The engine does not depend on its plugins, and the library does not depend on its CLI.

drivepipe's own formats, stages, sources and targets are found through entry points
exactly like a third party's: no module under ``pipeline/drivepipe`` imports
``drivepipe_plugins`` (statically or inside a function), and no library module
imports ``drivepipe.cli``.  Read from the source with ``ast``, so a lazy import
inside a function is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from drivepipe import _registry

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "pipeline" / "drivepipe"
PLUGINS = ROOT / "plugins" / "drivepipe_plugins"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(path.parents[len(path.relative_to(ROOT).parts) - 2])
                       .with_suffix("").parts[:-1])
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.append((node.lineno, name))
    return found


def engine_files() -> list[Path]:
    return sorted(p for p in ENGINE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    # the checker itself: a lazy import in a function body is found
    mod = ENGINE / "_stage.py"
    names = [name for _, name in imported_modules(mod)]
    assert "drivepipe._errors" in names
    assert len(engine_files()) > 50


@pytest.mark.parametrize("path", engine_files(), ids=lambda p: str(p.relative_to(ENGINE)))
def test_no_engine_module_imports_plugins(path: Path) -> None:
    bad = [(line, name) for line, name in imported_modules(path)
           if name == "drivepipe_plugins" or name.startswith("drivepipe_plugins.")]
    assert not bad, f"{path.relative_to(ROOT)} imports plugin modules: {bad}"


@pytest.mark.parametrize(
    "path", [p for p in engine_files() if "cli" not in p.relative_to(ENGINE).parts],
    ids=lambda p: str(p.relative_to(ENGINE)))
def test_the_library_does_not_import_its_cli(path: Path) -> None:
    bad = [(line, name) for line, name in imported_modules(path)
           if name == "drivepipe.cli" or name.startswith("drivepipe.cli.")]
    assert not bad, f"{path.relative_to(ROOT)} imports the CLI: {bad}"


def test_every_builtin_plugin_is_declared_as_an_entry_point() -> None:
    # each plugin class in drivepipe_plugins that is a format, stage, source or target is
    # reachable by name, so the engine never needs to import it
    declared = {
        *(type(f).__module__ for f in _registry.formats().values()),
        *(c.__module__ for c in _registry.stages().values()),
        *(c.__module__ for c in _registry.targets().values()),
        *(getattr(c, "__module__", "") for c in _registry.byte_sources().values()),
    }
    for kind in ("formats", "stages", "sources", "targets"):
        for module in sorted((PLUGINS / kind).glob("[!_]*.py")):
            name = f"drivepipe_plugins.{kind}.{module.stem}"
            assert name in declared, f"{name} declares no entry point"


def library_files() -> list[Path]:
    """Engine modules outside the CLI and the server (which logs), and every plugin."""
    engine = [p for p in engine_files()
              if not {"cli", "server"} & set(p.relative_to(ENGINE).parts)]
    plugins = sorted(p for p in PLUGINS.rglob("*.py") if "__pycache__" not in p.parts)
    return engine + plugins


def is_terminal_write(func: ast.expr) -> bool:
    """``print(...)`` or ``sys.stdout.X(...)`` / ``sys.stderr.X(...)``."""
    if isinstance(func, ast.Name):
        return func.id == "print"
    owner = func.value if isinstance(func, ast.Attribute) else None
    return isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) \
        and owner.value.id == "sys" and owner.attr in ("stdout", "stderr")


def writes_to_the_terminal(path: Path) -> list[int]:
    """Lines that print, echo, or write to sys.stdout/sys.stderr."""
    found: list[int] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and is_terminal_write(node.func):
            found.append(node.lineno)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) \
                else [node.module or ""]
            if any(n == "typer" or n.startswith(("typer.", "rich")) for n in names):
                found.append(node.lineno)
    return sorted(found)


def test_the_terminal_check_sees_a_print(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nprint('x')\nsys.stderr.write('y')\nimport rich.console\n")
    assert writes_to_the_terminal(probe) == [2, 3, 4]


@pytest.mark.parametrize("path", library_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_never_prints(path: Path) -> None:
    # the CLI renders; the library reports through stats, notify callbacks and errors
    assert not writes_to_the_terminal(path), f"{path.relative_to(ROOT)} writes to the terminal"
