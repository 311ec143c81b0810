"""pyproject.toml declares what the code imports: the cli extra brings what the commands need."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the dev extra installs tomli
    import tomli as tomllib  # type: ignore[import-not-found, unused-ignore]

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
#: The CLI's modules: every import in them counts, even one made inside a function.
COMMAND_MODULES = ["pgfailover.cli", "pgfailover.drill"] + [
    f"pgfailover.drill.{p.stem}" for p in sorted((SRC / "pgfailover" / "drill").glob("[!_]*.py"))
]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _path(module: str) -> Path | None:
    base = SRC.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _guards_imports(node: ast.Try) -> bool:
    caught: list[ast.expr] = []
    for handler in node.handlers:
        if isinstance(handler.type, ast.Tuple):
            caught.extend(handler.type.elts)
        elif handler.type is not None:
            caught.append(handler.type)
    return any(
        isinstance(e, ast.Name) and e.id in {"ImportError", "ModuleNotFoundError"} for e in caught
    )


class _Imports(ast.NodeVisitor):
    """The imports of one pgfailover module: ``third_party`` top-level names it needs at run
    time, ``internal`` pgfailover modules it imports.

    ``everywhere`` (a command's module): count every import, even one inside a function or
    one guarded by ``except ImportError`` (a command that checks for a module still needs
    it). Otherwise count only what runs at import and is not guarded (a guarded import has
    a fallback). Internal imports under ``if TYPE_CHECKING`` are followed anyway (a lazy
    package names its submodules there); third-party ones there are not counted.
    """

    def __init__(self, module: str, *, everywhere: bool) -> None:
        path = _path(module)
        assert path is not None, module
        self.package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        self.everywhere = everywhere
        self.third_party: set[str] = set()
        self.internal: set[str] = set()
        self._not_needed = 0  # > 0 inside TYPE_CHECKING or an import guard
        self.visit(ast.parse(path.read_text()))

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        if self.everywhere:
            self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node):
            self._not_needed_in(node.body)
            self._visit_all(node.orelse)
        else:
            self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        if not self.everywhere and _guards_imports(node):
            self._not_needed_in(node.body)
            self._visit_all([*node.handlers, *node.orelse, *node.finalbody])
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            target = f"{base}.{node.module}" if node.module else base
        else:
            target = node.module or ""
        self._add(target)
        for alias in node.names:  # `from package import submodule`
            self._add(f"{target}.{alias.name}")

    def _add(self, name: str) -> None:
        top = name.partition(".")[0]
        if top == "pgfailover":
            if _path(name) is not None:
                self.internal.add(name)
        elif not (self._not_needed or top in sys.stdlib_module_names or top == "__future__"):
            self.third_party.add(top)

    def _visit_all(self, nodes: Sequence[ast.AST]) -> None:
        for node in nodes:
            self.visit(node)

    def _not_needed_in(self, nodes: Sequence[ast.AST]) -> None:
        self._not_needed += 1
        self._visit_all(nodes)
        self._not_needed -= 1


def _imported_by_the_commands() -> dict[str, set[str]]:
    """Third-party top-level name -> the pgfailover modules that import it at run time."""
    found: dict[str, set[str]] = {}
    todo = list(COMMAND_MODULES)
    seen: set[str] = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        # importing a module imports its packages first
        parents = [module.rsplit(".", n)[0] for n in range(1, module.count(".") + 1)]
        todo.extend(parents)
        imports = _Imports(module, everywhere=module in COMMAND_MODULES)
        todo.extend(imports.internal)
        for name in imports.third_party:
            found.setdefault(name, set()).add(module)
    return found


def _requirements(extra: str | None) -> set[str]:
    """Normalized distribution names the core (None) or an extra brings, self-references
    expanded."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    names: set[str] = set() if extra is None else _requirements(None)
    for line in lines:
        requirement = Requirement(line)
        if _normalize(requirement.name) == _normalize(project["name"]):
            for sub in requirement.extras:
                names |= _requirements(sub)
        else:
            names.add(_normalize(requirement.name))
    return names


def _distribution(import_name: str) -> str:
    dists = importlib.metadata.packages_distributions().get(import_name, [import_name])
    return _normalize(dists[0])


def test_the_cli_extra_brings_every_third_party_module_the_commands_import() -> None:
    """Every third-party module `pgfailover drill` and the other commands import (directly,
    or through pgfailover modules they import) is brought by the core or the cli extra."""
    imported = _imported_by_the_commands()
    assert {"psycopg", "psycopg_pool", "sqlalchemy", "matplotlib"} <= set(imported), imported
    declared = _requirements("cli")
    missing = {
        name: sorted(modules)
        for name, modules in imported.items()
        if _distribution(name) not in declared
    }
    assert missing == {}, f"not in the cli extra: {missing}"


def test_psycopg_is_pinned_to_the_minors_whose_private_methods_we_override() -> None:
    """The core dependency on psycopg has an upper bound below the next minor."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (psycopg,) = [r for r in map(Requirement, project["dependencies"]) if r.name == "psycopg"]
    upper = [s for s in psycopg.specifier if s.operator == "<"]
    assert upper, f"psycopg must be pinned below the next minor: {psycopg}"
    assert not psycopg.specifier.contains("3.4.0")
