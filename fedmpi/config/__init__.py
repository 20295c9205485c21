"""Config: defaults, YAML loading, ``--set`` overrides and validation.

A config is a nested dict. Its keys are fedmpi's own (``DEFAULTS`` in ``defaults.py``) plus the
section each method declares (``Algorithm.section`` and ``defaults``): ``defaults()`` joins them.
The type of a default is the type the key must have (``None`` defaults accept a string or null).
Dotted keys, merging and ``--set`` parsing: ``keys.py``; the checks: ``validation.py``.
Validation runs on every rank before any data is loaded or any MPI message is exchanged, so a bad
config exits with status 2 everywhere at once.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from ..algorithms import ALGORITHMS
from ..errors import ConfigError
from .defaults import DEFAULTS, PARTITIONS, defaults
from .keys import flatten, get_dotted, merge, parse_override, set_dotted
from .validation import validate


class ConfigFileError(ConfigError):
    """A config file that cannot be read or parsed: the message names the file, not a key (exit 2)."""

    def __init__(self, path, problem: str):
        self.key, self.problem = str(path), problem
        Exception.__init__(self, f"{path}: {problem}")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """PyYAML's error as one sentence with the 1-based line and column of the problem (its own text
    names a "<unicode string>" instead of the file)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} started at line {context_mark.line + 1}, column {context_mark.column + 1})"
    hint = "indent with spaces, YAML does not allow tabs" if "'\\t'" in problem else "fix the syntax there"
    return f"not valid YAML{where}: {problem}; {hint}"


def _chosen(sources: list[dict], overrides: list[tuple[str, object]], key: str):
    """The value of dotted ``key`` that the sources give, last one winning, or None (before
    merging: it decides which plug-in, and so which config section, the merge needs)."""
    value = None
    for source in sources:
        node = source
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        value = node if node is not None else value
    for name, override in overrides:
        if name == key:
            value = override
    return value


def _resolve_plugins(sources: list[dict], overrides: list[tuple[str, object]]) -> dict[str, str]:
    """``algorithm``, ``model`` and ``data.name`` as registered names: an import path among them is
    loaded and registered (its declared name returned); an unknown name is a ConfigError."""
    names = {}
    for key, registry in _registries():
        value = _chosen(sources, overrides, key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ConfigError(key, f"must be str, got {type(value).__name__} {value!r}")
        names[key] = registry.resolve(value)
    return names


def _registries():
    from ..data import DATASETS
    from ..models import MODELS

    return (("algorithm", ALGORITHMS), ("model", MODELS), ("data.name", DATASETS))


def plugin_provenance(cfg: dict) -> dict[str, dict]:
    """For each of ``algorithm``, ``model`` and ``data.name`` that a plug-in provides: its name and
    where it came from (entry point or import path, its package and version). {} when the run
    uses only fedmpi's own."""
    used = {}
    for key, registry in _registries():
        name = get_dotted(cfg, key)
        origin = registry.origin(name)
        if origin.source != "builtin":
            used[key] = {"name": name, **origin.as_dict()}
    return used


def load_config(path: str | Path | None, overrides: list[str] = (), *, extra: dict | None = None) -> dict:
    """Defaults ← YAML file ← ``extra`` mapping ← ``--set`` overrides, then validated. An
    ``algorithm``, ``model`` or ``data.name`` given as an import path (``my_package.my_module:MyMethod``)
    is loaded and registered first, so that its section is known; the resolved config names it by
    its declared ``name``."""
    loaded = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigFileError(path, f"cannot read the config file ({exc.strerror})") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigFileError(path, _yaml_problem(exc)) from None
        if not isinstance(loaded, dict):
            raise ConfigFileError(path, "not a YAML mapping of config keys (`key: value` lines)")
    parsed = [parse_override(text) for text in overrides]
    names = _resolve_plugins([DEFAULTS, loaded, extra or {}], parsed)
    tree = defaults(names["algorithm"])
    cfg = copy.deepcopy(tree)
    merge(cfg, loaded)
    if extra:
        merge(cfg, extra)
    for key, value in parsed:
        set_dotted(cfg, key, value)
    for key, name in names.items():
        set_dotted(cfg, key, name)
    return validate(cfg, tree)


__all__ = ["ConfigFileError", "DEFAULTS", "PARTITIONS", "defaults", "flatten", "get_dotted", "load_config",
           "parse_override", "plugin_provenance", "set_dotted", "validate"]
