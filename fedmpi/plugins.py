"""Registries of methods, models and data sets: fedmpi's own, those of installed plug-in packages
(Python entry points), and one named by import path in a config (``my_package.my_module:MyMethod``).

A ``Registry`` maps a config name to a declared object (an ``Algorithm`` subclass, a ``ModelSpec``,
a ``DatasetSpec``) and remembers where each came from, so that ``fedmpi info`` and the results'
provenance can name a plug-in and its version. Whatever cannot be loaded or declares itself badly
is a ``ConfigError`` naming it: the run stops before round 1 with exit status 2.
"""
from __future__ import annotations

import importlib
import importlib.metadata as metadata
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Origin:
    """Where a registered name comes from: ``builtin``, ``entry point`` or ``import path``."""

    source: str
    target: str = ""         # module:attribute
    distribution: str = ""   # the installed package that provides it ("" if none)
    version: str = ""

    def describe(self) -> str:
        if self.source == "builtin":
            return "built in"
        package = f"{self.distribution} {self.version}".strip() or "not an installed package"
        return f"{self.source} {self.target} ({package})"

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "target": self.target, "distribution": self.distribution,
                "version": self.version}


def load_target(target: str, what: str, key: str) -> Any:
    """Import ``module:attribute``; any failure is a ConfigError naming ``target``."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigError(key, f"{what} {target!r}: an import path is module:attribute, e.g. "
                               f"my_package.my_module:MyMethod")
    try:
        obj = importlib.import_module(module_name)
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - a plug-in's own error, reported as the config's
        raise ConfigError(key, f"cannot load {what} {target!r}: {type(exc).__name__}: {exc}") from None
    return obj


def _distribution_of(module_name: str) -> tuple[str, str]:
    """The installed distribution (name, version) that provides top-level package of
    ``module_name``, or ("", "") for code that is not installed (a path on PYTHONPATH)."""
    top = module_name.split(".")[0]
    for dist in metadata.packages_distributions().get(top, []):
        try:
            return dist, metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "", ""


class Registry(Mapping):
    """name → declared object, built in or plugged in. ``builtins`` is called once, on first use;
    entry points of ``group`` are loaded then too; ``check(name, obj)`` rejects a bad declaration
    by raising ConfigError."""

    def __init__(self, group: str, what: str, key: str, builtins: Callable[[], dict[str, Any]],
                 check: Callable[[str, Any], None]):
        self.group, self.what, self.key = group, what, key
        self._builtins, self._check = builtins, check
        self._items: dict[str, Any] | None = None
        self._origins: dict[str, Origin] = {}

    # ---- Mapping over every registered name ------------------------------------------------
    def _loaded(self) -> dict[str, Any]:
        if self._items is None:
            self._items, self._origins = {}, {}
            try:
                self._load_all()
            except BaseException:
                self._items = None   # the next use reports the same error, not a partial registry
                raise
        return self._items

    def _load_all(self) -> None:
        for name, obj in self._builtins().items():
            self._add(name, obj, Origin("builtin"))
        for entry in metadata.entry_points(group=self.group):
            dist = entry.dist.name if entry.dist else ""
            version = entry.dist.version if entry.dist else ""
            where = f"entry point {entry.name} = {entry.value} of {dist or 'an unnamed distribution'}"
            try:
                obj = entry.load()
            except Exception as exc:  # noqa: BLE001
                raise ConfigError(self.key, f"cannot load {self.what} plug-in ({where}): "
                                            f"{type(exc).__name__}: {exc}") from None
            self._add(entry.name, obj, Origin("entry point", entry.value, dist, version), where)

    def _add(self, name: str, obj: Any, origin: Origin, where: str = "") -> None:
        where = where or origin.describe()
        if name in self._items:
            raise ConfigError(self.key, f"{self.what} {name!r} ({where}) is registered twice: it is also "
                                        f"{self._origins[name].describe()}")
        try:
            self._check(name, obj)
        except ConfigError as exc:
            raise ConfigError(self.key, f"{self.what} plug-in {name!r} ({where}): {exc.problem}") from None
        self._items[name] = obj
        self._origins[name] = origin

    def __getitem__(self, name: str) -> Any:
        return self._loaded()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaded())

    def __len__(self) -> int:
        return len(self._loaded())

    # ---- names in a config ------------------------------------------------------------------
    def resolve(self, value: str) -> str:
        """The registered name for a config value: a name as it is, or an import path
        (``module:attribute``), loaded and registered under its declared name."""
        items = self._loaded()
        if value in items or ":" not in value:
            if value not in items:
                raise ConfigError(self.key, f"unknown {self.what} {value!r}; choose one of {', '.join(items)}, "
                                            f"or give an import path module:attribute")
            return value
        for name, origin in self._origins.items():
            if origin.source == "import path" and origin.target == value:
                return name
        obj = load_target(value, self.what, self.key)
        name = getattr(obj, "name", "")
        if not isinstance(name, str) or not name:
            raise ConfigError(self.key, f"{self.what} plug-in {value!r} declares no name")
        if items.get(name) is obj:   # already registered (an installed plug-in named by its path)
            return name
        module_name = value.partition(":")[0]
        self._add(name, obj, Origin("import path", value, *_distribution_of(module_name)))
        return name

    def origin(self, name: str) -> Origin:
        self._loaded()
        return self._origins[name]

    def plugins(self) -> dict[str, Origin]:
        """The names that are not built in, with their origins."""
        self._loaded()
        return {name: o for name, o in self._origins.items() if o.source != "builtin"}
