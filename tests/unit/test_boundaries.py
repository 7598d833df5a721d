"""Architecture rules, checked by parsing every module of federation/ and nodes/ with ast.

1. Raw records stay in nodes/: federation/ never imports ``nodes`` (except local.py, which
   only launches node processes) and never calls a file reader, bar an allow-list of
   config and certificate readers, each with its reason.
2. No module deserialises with pickle (or its relatives) or runs code with eval/exec.
3. Only the wire converter, the client stub, the servicer and the server (and the generated
   code itself) import ``federation._proto``.

Each checker is also run on small synthetic sources, so a rule that stopped detecting
anything would fail here too.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("federation", "nodes")

NODES_IMPORT_ALLOWED = {"federation/local.py"}  # DESIGN.md: it only starts node processes

# Called by qualified name (after resolving import aliases): open or read a file.
READER_FUNCTIONS = frozenset(
    {
        "open",
        "builtins.open",
        "io.open",
        "os.open",
        "os.fdopen",
        "codecs.open",
        "numpy.load",
        "numpy.loadtxt",
        "numpy.genfromtxt",
        "numpy.fromfile",
        "numpy.memmap",
        "pyarrow.memory_map",
        "pyarrow.OSFile",
        "pyarrow.input_stream",
        "pyarrow.csv.read_csv",
        "pyarrow.csv.open_csv",
        "pyarrow.parquet.read_table",
        "pyarrow.parquet.read_pandas",
        "pyarrow.parquet.ParquetFile",
        "pyarrow.parquet.ParquetDataset",
        "pyarrow.feather.read_table",
        "pyarrow.feather.read_feather",
        "pyarrow.json.read_json",
        "pyarrow.orc.read_table",
        "pyarrow.orc.ORCFile",
        "pyarrow.dataset.dataset",
        "pyarrow.ipc.open_file",
        "pyarrow.ipc.open_stream",
    }
)
READER_PREFIXES = ("pandas.read_",)
# Called as a method on any object (a Path, usually): reported as ".name".
READER_METHODS = frozenset({"open", "read_text", "read_bytes"})

# (module, call as reported) -> why it is not a data reader. Every entry must be in use.
READER_ALLOWED = {
    ("federation/config.py", ".read_text"): "reads the coordinator's federation.toml",
    ("federation/pki.py", ".read_bytes"): "reads PEM certificates and private keys",
    ("federation/pki.py", "os.open"): "creates a new PEM file exclusively, mode 0600/0644",
    ("federation/pki.py", "os.fdopen"): "wraps that new file's descriptor to write the PEM",
    ("federation/local.py", ".open"): "opens a child node's log, append-only, as its stdout",
    ("federation/local.py", ".read_text"): "reads that log's tail for a start-up error message",
    ("federation/_workdir.py", ".read_text"): "reads owner.json and /proc/<pid>/stat of its dirs",
    ("federation/coordinator/_checkpoint.py", ".open"): "writes a model or checkpoint file",
    ("federation/coordinator/_checkpoint.py", ".read_text"): "reads its own checkpoint.json",
    ("federation/coordinator/_checkpoint.py", "os.open"): "opens a directory to fsync a rename",
    ("federation/coordinator/training.py", ".read_text"): "reads a saved model's JSON sidecar",
}

PICKLE_LIKE = frozenset(
    {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "marshal"}
)
CODE_RUNNERS = frozenset({"eval", "exec", "builtins.eval", "builtins.exec"})

PROTO_PACKAGE = "federation._proto"
PROTO_IMPORT_ALLOWED = {
    "federation/wire.py",
    "federation/coordinator/client.py",
    "nodes/service.py",
}


@dataclass(frozen=True, slots=True)
class Module:
    path: str  # relative to the repository root, with '/'
    name: str  # dotted module name
    tree: ast.Module


def _module_name(relative: Path) -> str:
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _parse(source: str, *, path: str, name: str) -> Module:
    return Module(path=path, name=name, tree=ast.parse(source, filename=path))


def _modules(package: str) -> list[Module]:
    found = []
    for file in sorted((ROOT / package).rglob("*.py")):
        relative = file.relative_to(ROOT)
        found.append(
            _parse(file.read_text(), path=relative.as_posix(), name=_module_name(relative))
        )
    return found


ALL_MODULES = [m for package in PACKAGES for m in _modules(package)]
FEDERATION_MODULES = [m for m in ALL_MODULES if m.path.startswith("federation/")]


# ------------------------------------------------------------------ analysis


def _resolve_from(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module an ``import from`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    is_package = module.path.endswith("__init__.py")
    base = module.name.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imported_names(module: Module) -> Iterator[tuple[str, int]]:
    """Every dotted name a module imports (``from a import b`` gives ``a`` and ``a.b``)."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node)
            yield source, node.lineno
            for alias in node.names:
                yield f"{source}.{alias.name}", node.lineno


def _aliases(module: Module) -> dict[str, str]:
    """Local name -> the qualified name it was imported as."""
    table: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    table[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    table[top] = top
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(module, node)
            for alias in node.names:
                table[alias.asname or alias.name] = f"{source}.{alias.name}"
    return table


def _dotted(expr: ast.expr) -> list[str] | None:
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if isinstance(expr, ast.Name):
        return [expr.id, *reversed(parts)]
    return None


def called_names(module: Module) -> Iterator[tuple[str, int]]:
    """Every call, named by its qualified name when the callee resolves to an import."""
    aliases = _aliases(module)
    for node in ast.walk(module.tree):
        if not isinstance(node, ast.Call):
            continue
        parts = _dotted(node.func)
        if parts is None:
            if isinstance(node.func, ast.Attribute):
                yield f".{node.func.attr}", node.lineno
            continue
        head = aliases.get(parts[0])
        if head is not None:
            yield ".".join([head, *parts[1:]]), node.lineno
        elif len(parts) == 1:
            yield parts[0], node.lineno  # a builtin or a local function
        else:
            yield f".{parts[-1]}", node.lineno  # a method on a local object


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def nodes_imports(module: Module) -> list[str]:
    return [
        f"{module.path}:{line} imports {n}"
        for n, line in imported_names(module)
        if _is_under(n, "nodes")
    ]


def _is_reader(call: str) -> bool:
    if call in READER_FUNCTIONS or call.startswith(READER_PREFIXES):
        return True
    return call.startswith(".") and call[1:] in READER_METHODS


def file_reader_calls(module: Module) -> list[tuple[str, str, int]]:
    return [(module.path, call, line) for call, line in called_names(module) if _is_reader(call)]


def unsafe_code(module: Module) -> list[str]:
    found = [
        f"{module.path}:{line} imports {name}"
        for name, line in imported_names(module)
        if any(_is_under(name, p) for p in PICKLE_LIKE)
    ]
    found += [
        f"{module.path}:{line} calls {call}"
        for call, line in called_names(module)
        if call in CODE_RUNNERS
    ]
    return found


def imports_proto(module: Module) -> bool:
    return any(_is_under(name, PROTO_PACKAGE) for name, _ in imported_names(module))


# ------------------------------------------------------------------ the rules


def test_the_scan_sees_both_packages() -> None:
    paths = {m.path for m in ALL_MODULES}
    for expected in ("federation/wire.py", "federation/config.py", "nodes/data.py"):
        assert expected in paths
    assert any(p.startswith("federation/_proto/") for p in paths)


def test_federation_never_imports_nodes() -> None:
    found = [
        line
        for m in FEDERATION_MODULES
        if m.path not in NODES_IMPORT_ALLOWED
        for line in nodes_imports(m)
    ]
    assert found == [], "federation/ must not import nodes/ (DESIGN.md: arrows point one way)"


def test_federation_calls_no_file_reader_outside_the_allow_list() -> None:
    found = [
        f"{path}:{line} calls {call}"
        for m in FEDERATION_MODULES
        for path, call, line in file_reader_calls(m)
        if (path, call) not in READER_ALLOWED
    ]
    assert found == [], "only nodes/data.py reads data; add a reason to READER_ALLOWED if not data"


def test_reader_allow_list_has_no_stale_entries() -> None:
    used = {(path, call) for m in FEDERATION_MODULES for path, call, _ in file_reader_calls(m)}
    assert set(READER_ALLOWED) - used == set(), "remove allow-list entries no longer needed"


def test_no_pickle_eval_or_exec() -> None:
    assert [line for m in ALL_MODULES for line in unsafe_code(m)] == []


def test_only_the_wire_client_servicer_and_server_import_generated_code() -> None:
    importers = {
        m.path
        for m in ALL_MODULES
        if imports_proto(m) and not m.path.startswith("federation/_proto/")
    }
    assert importers - PROTO_IMPORT_ALLOWED == set(), "convert in federation/wire.py instead"
    assert PROTO_IMPORT_ALLOWED - importers == set(), (
        "the allow-list names a module that no longer imports it"
    )


# ------------------------------------------------------------------ the checkers can fail


def _synthetic(source: str, *, path: str = "federation/coordinator/bad.py") -> Module:
    name = _module_name(Path(path))
    return _parse(source, path=path, name=name)


@pytest.mark.parametrize(
    "source",
    [
        "import nodes",
        "import nodes.ledger as l",
        "from nodes import data",
        "from nodes.data import load_table",
        "def f():\n    from nodes.data import Table\n",
    ],
)
def test_nodes_import_is_detected(source: str) -> None:
    assert nodes_imports(_synthetic(source))


def test_relative_import_is_resolved() -> None:
    module = _synthetic("from .._proto.v1 import node_pb2\nfrom . import client")
    assert imports_proto(module)
    assert ("federation.coordinator.client", 2) in set(imported_names(module))
    assert not nodes_imports(_synthetic("from .nodes_like import x"))


@pytest.mark.parametrize(
    ("source", "call"),
    [
        ("open('x')", "open"),
        ("import io\nio.open('x')", "io.open"),
        ("import pyarrow.parquet as pq\npq.read_table('x')", "pyarrow.parquet.read_table"),
        ("import pyarrow.parquet\npyarrow.parquet.ParquetFile('x')", "pyarrow.parquet.ParquetFile"),
        ("from pyarrow.csv import read_csv as rc\nrc('x')", "pyarrow.csv.read_csv"),
        ("from pyarrow import csv\ncsv.read_csv('x')", "pyarrow.csv.read_csv"),
        ("import pandas as pd\npd.read_parquet('x')", "pandas.read_parquet"),
        ("import numpy as np\nnp.loadtxt('x')", "numpy.loadtxt"),
        ("from numpy import load\nload('x')", "numpy.load"),
        ("import numpy\nnumpy.fromfile('x')", "numpy.fromfile"),
        ("from pathlib import Path\nPath('x').read_text()", ".read_text"),
        ("def f(p):\n    return p.read_bytes()", ".read_bytes"),
        ("def f(p):\n    with p.open() as fh:\n        return fh", ".open"),
    ],
)
def test_file_reader_is_detected(source: str, call: str) -> None:
    assert [c for _, c, _ in file_reader_calls(_synthetic(source))] == [call]


@pytest.mark.parametrize(
    "source",
    [
        "from pathlib import Path\nPath('x').write_text('y')",
        "import re\nre.compile('x')",
        "import numpy as np\nnp.savetxt('x', [1])",
        "from pyarrow.parquet import write_table\nwrite_table(t, 'x')",
        "import tomllib\ntomllib.loads('a = 1')",
    ],
)
def test_writers_and_parsers_of_strings_are_not_readers(source: str) -> None:
    assert file_reader_calls(_synthetic(source)) == []


def test_allow_list_is_per_module_and_per_call() -> None:
    config = _synthetic("def f(p):\n    return p.read_bytes()", path="federation/config.py")
    [(path, call, _)] = file_reader_calls(config)
    assert (path, call) not in READER_ALLOWED  # config.py may read_text, not read_bytes


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "from pickle import loads",
        "import cloudpickle as cp",
        "import marshal",
        "eval('1')",
        "exec('x = 1')",
        "import builtins\nbuiltins.eval('1')",
    ],
)
def test_unsafe_code_is_detected(source: str) -> None:
    assert unsafe_code(_synthetic(source, path="nodes/bad.py"))
