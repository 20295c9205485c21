"""The package's shape: modules small enough to read, no import circle between its parts, and the
docs' key table in step with what fedmpi and each method declare."""
from __future__ import annotations

import ast
import re

import yaml

from helpers import REPO

from fedmpi.algorithms import ALGORITHMS
from fedmpi.config import defaults, flatten

PACKAGE = REPO / "fedmpi"
MAX_LINES = 350


def test_no_module_is_over_350_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _imports(path) -> set[str]:
    """The fedmpi modules a module imports, at its top or inside a function."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[:len(package) - node.level + 1])
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return {name for name in found if name.split(".")[0] == "fedmpi"}


def _part(module: str) -> str:
    """fedmpi.config.keys → config: the package's parts are its subpackages and root modules."""
    names = module.split(".")
    return names[1] if len(names) > 1 else "fedmpi"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_circle_between_the_parts_of_the_package():
    edges: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for imported in _imports(path):
            if _part(module) != _part(imported) and _part(imported) != "fedmpi":
                edges.setdefault(_part(module), set()).add(_part(imported))
    assert "algorithms" in edges["config"]   # the walk saw the imports
    assert not _cycles(edges), f"import circles between fedmpi's parts: {_cycles(edges)}"


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}}) == []


def _documented_keys() -> dict[str, str]:
    text = (REPO / "docs" / "interface.md").read_text()
    table = text[text.index("## Config keys"):]
    return dict(re.findall(r"^\| `([a-z_][a-z0-9_.]*)` \| `([^`]*)` \|", table, re.M))


def _same_default(written: str, value) -> bool:
    if isinstance(value, str):
        return written == value or written == f'"{value}"'   # off, sgd, ... or ""
    read = yaml.safe_load(written)
    if isinstance(value, float) and isinstance(read, (str, int)) and not isinstance(read, bool):
        read = float(read)   # YAML 1.1 reads 1e-8 as a string; fedmpi's config takes it as a float
    return read == value and type(read) is type(value)


def test_the_docs_key_table_is_every_key_with_its_declared_default():
    """docs/interface.md lists fedmpi's keys and every built-in method's section as declared;
    plug-ins document theirs themselves."""
    plugin_sections = {ALGORITHMS[n].section for n in ALGORITHMS.plugins()}
    keys = {k: v for k, v in flatten(defaults()).items() if k.split(".")[0] not in plugin_sections}
    documented = _documented_keys()
    assert sorted(set(keys) - set(documented)) == [], "keys missing from docs/interface.md"
    assert sorted(set(documented) - set(keys)) == [], "docs/interface.md lists keys that do not exist"
    wrong = {k: (documented[k], v) for k, v in keys.items() if not _same_default(documented[k], v)}
    assert not wrong, f"defaults in docs/interface.md that differ from the declared ones: {wrong}"


def test_the_compiled_parts_load_only_when_first_used():
    """``fedmpi run`` imports the engine before MPI_Init; a C library loaded by then made MPICH's
    PMI-2 start-up fail under srun (tests/test_two_node_slurm.py). Importing everything a run
    imports before it initialises MPI must load none of them."""
    import subprocess
    import sys

    probe = ("import fedmpi.cli, fedmpi.engine, fedmpi.training; "
             "from fedmpi.aggregation import quantise; from fedmpi.sparse_kernels import simd; "
             "print(quantise.GRID_PASS.loaded, simd.LIBRARY.loaded)")     # None: not looked for yet
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "None"], out.stdout


def test_a_compiled_part_that_does_not_load_leaves_the_torch_numpy_path(tmp_path, monkeypatch):
    """A library built for another machine (a shared file system) must not stop the run."""
    import types

    from fedmpi import native

    broken = tmp_path / "_broken.so"
    broken.write_text("not a shared object")
    monkeypatch.setattr(native.importlib.util, "find_spec", lambda module: types.SimpleNamespace(origin=str(broken)))
    library = native.Library("fedmpi.aggregation._broken", {})
    assert library.get() is None and "does not load here" in library.why
