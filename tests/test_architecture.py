"""The shape of the code: imports point down the layers, no cycles, one process table.

docs/architecture.md ("Layout") gives the layers in data-flow order; this test holds the code to
them. It reads every module's imports from the source (``ast``), so an import inside a function
counts like any other, and names what is wrong: the importing module, the imported one and the
rule broken. The last tests check the checker itself: an upward import and a cycle written into
a throw-away tree are reported.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.settings import Settings
from pipelines.processes import PROCESSES, ProcessKind

ROOT = Path(__file__).resolve().parents[1]

#: The layers, lowest first: a module imports its own top-level package and the layers below
#: it, never one beside it or above it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("schemas",),
    ("core", "dashboards"),
    ("client", "streams", "sinks"),
    ("ingress", "analytics"),
    ("pipelines",),
)
#: The public SDK ships on its own: the contract, and core's standard-library-only pieces.
CLIENT_MAY_IMPORT = frozenset({"schemas", "core.tls", "core.backoff"})
#: Modules allowed to import inside a function: the CLI defers loading a process's libraries
#: (uvicorn, the Cassandra driver, pandas) to the command that needs them — a second or more
#: per command otherwise — never to dodge a cycle.
LAZY_IMPORTERS = frozenset({"pipelines.cli", "pipelines.quality.cli"})


@dataclass(frozen=True, slots=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root`` by dotted name."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(root: Path, packages: tuple[str, ...]) -> Iterator[Import]:
    """The first-party imports of every module, resolved to the module they load."""
    known = modules(root, packages)

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        nested = {
            id(node)
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(function)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [f"{base}.{alias.name}" for alias in node.names] or [base]
            for target in targets:
                resolved = resolve(target)
                if resolved is not None and resolved != name:
                    yield Import(name, resolved, node.lineno, id(node) in nested)


def layer_of(module: str) -> int:
    top = module.partition(".")[0]
    return next(index for index, layer in enumerate(LAYERS) if top in layer)


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule, as ``importer:line -> imported: why``."""
    packages = tuple(package for layer in LAYERS for package in layer)
    found = []
    for item in imports(root, packages):
        where = f"{item.importer}:{item.line} -> {item.imported}"
        own, other = item.importer.partition(".")[0], item.imported.partition(".")[0]
        if own != other and layer_of(item.imported) >= layer_of(item.importer):
            side = "beside" if layer_of(item.imported) == layer_of(item.importer) else "above"
            found.append(f"{where}: imports a layer {side} its own")
        allowed = any(item.imported.startswith(name) for name in CLIENT_MAY_IMPORT)
        if own == "client" and other != "client" and not allowed:
            found.append(f"{where}: the SDK imports only {sorted(CLIENT_MAY_IMPORT)}")
        if item.in_function and item.importer not in LAZY_IMPORTERS:
            found.append(f"{where}: an import inside a function")
    return found


def cycles(root: Path) -> list[list[str]]:
    """The import cycles (strongly connected groups of more than one module)."""
    packages = tuple(package for layer in LAYERS for package in layer)
    graph: dict[str, set[str]] = {name: set() for name in modules(root, packages)}
    for item in imports(root, packages):
        graph[item.importer].add(item.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph is a few hundred modules
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_every_import_points_down_the_layers() -> None:
    assert violations(ROOT) == []


def test_no_import_cycles() -> None:
    assert cycles(ROOT) == []


def test_every_package_has_a_layer() -> None:
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "bench"} == {p for layer in LAYERS for p in layer}


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for layer in LAYERS:
        for package in layer:
            (root / package).mkdir(exist_ok=True)
            (root / package / "__init__.py").touch()
    return root


def test_an_upward_import_is_reported(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "core/settings.py": "from pipelines.cli import main\n",
            "pipelines/cli.py": "def main() -> None: ...\n",
            "streams/a.py": "from sinks.b import x\n",
            "sinks/b.py": "x = 1\n",
            "sinks/c.py": "def late() -> None:\n    from core import settings\n",
            "client/sdk.py": "from core.settings import Settings\n",
        },
    )
    assert sorted(violations(root)) == [
        "client.sdk:1 -> core.settings: the SDK imports only "
        "['core.backoff', 'core.tls', 'schemas']",
        "core.settings:1 -> pipelines.cli: imports a layer above its own",
        "sinks.c:2 -> core.settings: an import inside a function",
        "streams.a:1 -> sinks.b: imports a layer beside its own",
    ]


def test_a_cycle_is_reported(tmp_path: Path) -> None:
    root = write(
        tmp_path,
        {
            "sinks/a.py": "from sinks.b import y\nx = 1\n",
            "sinks/b.py": "from sinks import c\ny = 2\n",
            "sinks/c.py": "from sinks.a import x\n",
        },
    )
    assert cycles(root) == [["sinks.a", "sinks.b", "sinks.c"]]


# -- the process table and docs/architecture.md ------------------------------------------------


def documented_processes() -> list[list[str]]:
    """The rows of docs/architecture.md's process table (between its markers)."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("<!-- processes -->")[1].split("<!-- /processes -->")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


#: A process reading more topics than this is summarized (the audit reads them all).
MAX_LISTED_TOPICS = 6


def table_row(kind: ProcessKind, settings: Settings) -> list[str]:
    groups = kind.groups(settings)
    reads = "; ".join(
        f"`{group}`: "
        + (
            ", ".join(f"`{topic}`" for topic in topics)
            if len(topics) <= MAX_LISTED_TOPICS
            else f"every audited topic ({len(topics)})"
        )
        for group, topics in groups.items()
    )
    module = kind.entry.partition(":")[0].replace(".", "/")
    return [
        f"`{kind.name}`",
        f"`{module}.py`",
        kind.summary,
        reads or "-",
        "yes" if kind.sink else "no",
    ]


def test_the_documented_process_table_is_the_code_s() -> None:
    settings = Settings()
    assert documented_processes() == [table_row(kind, settings) for kind in PROCESSES]


def test_the_folder_map_lists_the_layers_in_order() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("<!-- layers -->")[1].split("<!-- /layers -->")[0]
    folders = re.findall(r"^\| `(\w+)/`", section, flags=re.MULTILINE)
    assert folders == [package for layer in LAYERS for package in layer]


@pytest.mark.parametrize("kind", PROCESSES, ids=lambda kind: kind.name)
def test_every_process_entry_is_importable(kind: ProcessKind) -> None:
    assert callable(kind.main())
