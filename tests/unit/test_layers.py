"""The layers of docs/architecture.md: imports run one way, and ``vecpipe --help`` stays light.

The walk reads every module of vecpipe/, producers/ and workers/ with ``ast`` (nothing is
imported) and checks the rules the architecture page states.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("vecpipe", "producers", "workers")
OURS = (*PACKAGES,)

# Which layers a layer may import (its own included). Leaves import only leaves.
LEAVES = {"vecpipe.errors", "vecpipe.config", "vecpipe.logs", "vecpipe.health",
          "vecpipe.resources", "vecpipe.messages", "vecpipe.model", "vecpipe.tracing",
          "vecpipe.localhome", "vecpipe.redact", "vecpipe.jsonbounds", "vecpipe.declare"}
ALLOWED: dict[str, set[str]] = {
    "leaf": {"leaf"},
    "retry": {"leaf"},
    "kafka": {"leaf", "kafka"},
    "db": {"leaf", "retry", "db"},
    "deadletter": {"leaf", "kafka", "deadletter"},
    "stages": {"leaf", "retry", "kafka", "deadletter", "stages"},
    "devservices": {"leaf", "devservices"},
    # The upstream library loads neither torch nor psycopg (retry, db and stages would).
    "producers": {"leaf", "kafka", "deadletter", "producers"},
    "workers": {"leaf", "retry", "kafka", "db", "deadletter", "stages", "producers", "workers"},
    "bench": {"leaf", "retry", "kafka", "db", "deadletter", "stages", "devservices", "producers",
              "workers", "bench"},
    "cli": {"leaf", "retry", "kafka", "db", "deadletter", "stages", "devservices", "producers",
            "workers", "bench", "cli"},
    "package": {"leaf", "cli"},
}


def layer(module: str) -> str:
    """The layer a module belongs to."""
    if module in LEAVES:
        return "leaf"
    parts = module.split(".")
    if parts[0] in ("producers", "workers"):
        return parts[0]
    if module == "vecpipe.retry":
        return "retry"
    if len(parts) > 1 and parts[1] in ("kafka", "db", "deadletter", "stages", "devservices",
                                        "bench", "cli"):
        return parts[1]
    if module in ("vecpipe", "vecpipe.__main__"):
        return "package"
    raise AssertionError(f"{module} belongs to no layer; add it to test_layers.py")


def modules() -> Iterator[tuple[str, Path]]:
    """Every module of our packages, with its file."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    base = node.module or ""
    if node.level:
        pkg = module.split(".")[: -node.level] if node.level else []
        base = ".".join([*pkg, base] if base else pkg)
    known = {name for name, _ in modules()}
    # ``from vecpipe.db import indexes`` imports the module vecpipe.db.indexes.
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def imports(module: str, path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module of ours, line, inside a function) for every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))

    def walk(node: ast.AST, in_function: bool) -> Iterator[tuple[str, int, bool]]:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] in OURS:
                        yield a.name, child.lineno, in_function
            elif isinstance(child, ast.ImportFrom):
                for target in _resolve(module, child):
                    if target.split(".")[0] in OURS:
                        yield target, child.lineno, in_function
            yield from walk(child, inside)

    yield from walk(tree, False)


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in modules():
        graph[module] = {t for t, _, nested in imports(module, path) if not nested and t != module}
    return graph


def test_nothing_imports_the_cli() -> None:
    """Only the CLI's own modules and the entry points import vecpipe.cli."""
    offenders = [f"{m} (line {line})" for m, path in modules() for t, line, _ in imports(m, path)
                 if t.startswith("vecpipe.cli") and not m.startswith("vecpipe.cli")
                 and m != "vecpipe.__main__"]
    assert offenders == []


def test_every_import_goes_to_a_layer_below_or_beside() -> None:
    """The kernel never imports producers/ or workers/; only cli and bench sit above them."""
    offenders = []
    for module, path in modules():
        for target, line, _ in imports(module, path):
            if layer(target) not in ALLOWED[layer(module)]:
                offenders.append(f"{module} (line {line}) imports {target}")
    assert offenders == []


def test_no_import_cycles() -> None:
    """Module-level imports form no cycle."""
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own submodules is how a package exports them.
    cycles = [c for c in cycles if not all(m.startswith(c[0]) or c[0].startswith(m) for m in c)]
    assert cycles == []


def test_imports_inside_functions_only_in_command_handlers() -> None:
    """An own-module import written inside a function means the layers are wrong, except in a
    CLI command handler that loads a heavy library only when its command runs."""
    offenders = [f"{m} (line {line}) imports {t}" for m, path in modules()
                 for t, line, nested in imports(m, path)
                 if nested and not m.startswith("vecpipe.cli")]
    assert offenders == []


def _loaded_after(code: str, heavy: tuple[str, ...]) -> list[str]:
    script = (
        "import json, sys\n" + code +
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)
    loaded: list[str] = json.loads(proc.stdout.strip().splitlines()[-1])
    return loaded


def test_the_upstream_library_loads_neither_torch_nor_psycopg() -> None:
    """An upstream system imports producers/ without the model's or the database's libraries."""
    code = "import producers.publisher, producers.chunking, producers.readers, producers.produce\n"
    assert _loaded_after(code, ("torch", "psycopg", "sentence_transformers")) == []


def test_help_loads_no_client_library() -> None:
    """``vecpipe --help`` builds every command's parser without torch, Kafka, PostgreSQL or
    OpenTelemetry."""
    code = ("from vecpipe.cli.main import main\n"
            "try:\n"
            "    main(['--help'])\n"
            "except SystemExit:\n"
            "    pass\n")
    heavy = ("torch", "confluent_kafka", "psycopg", "numpy", "sentence_transformers",
             "jsonschema", "prometheus_client", "tenacity", "opentelemetry")
    assert _loaded_after(code, heavy) == []
