"""The methods: ``ALGORITHMS`` maps each ``algorithm:`` name to its class.

A method is one class that declares everything about itself (``Algorithm`` in base.py: name,
label, config section, tiering, columns, figures). fedmpi's own are the classes defined in this
package's modules, found by looking, so adding one touches only its own file; plug-in packages add
theirs through the entry-point group ``fedmpi.algorithms`` or an import path in the config
(``algorithm: my_package.my_module:MyMethod``).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

from ..errors import ConfigError, require
from ..plugins import Registry
from .base import Algorithm, ClientResult, ClientTask, ModelInfo
from .evaluation import EvalModel, EvalOutcome

# the config's own sections: a method may not declare one of these as its section
CORE_SECTIONS = ("data", "clients", "local", "eval", "device", "tiers", "aggregation", "checkpoint", "mpi",
                 "output")
_SECTION_TYPES = (bool, int, float, str, list, type(None))


def _builtin_algorithms() -> dict[str, type[Algorithm]]:
    found = {}
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
        for _, cls in inspect.getmembers(importlib.import_module(f"{__name__}.{module}"), inspect.isclass):
            if issubclass(cls, Algorithm) and cls.__dict__.get("name") and cls.__module__ == f"{__name__}.{module}":
                found[cls.name] = cls
    return found


def check_declaration(name: str, cls) -> None:
    """Everything fedmpi reads from a method class is declared and well formed (ConfigError if not)."""
    def need(condition: bool, problem: str) -> None:
        require(condition, "algorithm", problem)

    need(inspect.isclass(cls) and issubclass(cls, Algorithm), f"{cls!r} is not a subclass of fedmpi's Algorithm")
    need(cls.name == name, f"the class declares name {cls.name!r}, registered as {name!r}")
    need(name.isidentifier(), f"name {name!r} must be an identifier (letters, digits, _)")
    for attribute in ("label", "doc"):   # its own, not a parent's: a subclass is another method
        need(isinstance(cls.__dict__.get(attribute), str) and cls.__dict__[attribute],
             f"declares no {attribute} (a non-empty string in the class itself)")
    for attribute in ("tiered", "partial_sums"):
        need(isinstance(getattr(cls, attribute), bool), f"{attribute} must be True or False")
    need(isinstance(cls.figures, tuple) and all(isinstance(f, str) and f for f in cls.figures),
         "figures must be a tuple of figure-module names")
    if cls.partial_sums:
        need(cls.partial_sum_weight is not Algorithm.partial_sum_weight,
             "partial_sums is True but partial_sum_weight is not defined")
    need(cls.local_update is not Algorithm.local_update, "defines no local_update")
    need(cls.aggregate is not Algorithm.aggregate, "defines no aggregate")
    section = cls.section
    if section is None:
        need(not cls.defaults, "declares defaults but no section")
        return
    need(isinstance(section, str) and section.isidentifier(), f"section {section!r} must be an identifier")
    need(section not in CORE_SECTIONS, f"section {section!r} is one of fedmpi's own ({', '.join(CORE_SECTIONS)})")
    need(isinstance(cls.defaults, dict) and cls.defaults, f"section {section!r} declares no defaults")
    for key, value in cls.defaults.items():
        need(isinstance(key, str) and key.isidentifier(), f"{section}: key {key!r} must be an identifier")
        need(isinstance(value, _SECTION_TYPES), f"{section}.{key}: a default must be a bool, int, float, str, "
                                                f"list or None, got {type(value).__name__}")
    need(isinstance(cls.union_types, dict) and set(cls.union_types) <= set(cls.defaults),
         f"{section}: union_types names keys that are not in defaults")
    need(cls.check_config.__func__ is not Algorithm.check_config.__func__,
         f"section {section!r} declares no check_config")


ALGORITHMS = Registry("fedmpi.algorithms", "algorithm", "algorithm", _builtin_algorithms, check_declaration)


def algorithm_class(name: str) -> type[Algorithm]:
    """The class of a config's ``algorithm`` value (a registered name or an import path)."""
    return ALGORITHMS[ALGORITHMS.resolve(name)]


def config_sections(algorithm: str | None = None) -> dict[str, type[Algorithm]]:
    """The config sections a run has → the class that declares each (a subclass may share its
    parent's): every built-in method's, and a plug-in's only when it is the run's ``algorithm``
    (installing a plug-in changes no other run's config). Two different declarations of one
    section are a ConfigError."""
    sections: dict[str, type[Algorithm]] = {}
    for name, cls in ALGORITHMS.items():
        if cls.section is None or (ALGORITHMS.origin(name).source != "builtin" and name != algorithm):
            continue
        owner = sections.setdefault(cls.section, cls)
        if owner.defaults is not cls.defaults:
            raise ConfigError("algorithm", f"{cls.name} and {owner.name} both declare config section "
                                           f"{cls.section!r}; a section has one declaration")
    return sections


def build_algorithm(cfg: dict, info: ModelInfo) -> Algorithm:
    return algorithm_class(cfg["algorithm"])(cfg, info)


__all__ = ["ALGORITHMS", "Algorithm", "ClientResult", "ClientTask", "EvalModel", "EvalOutcome", "ModelInfo",
           "algorithm_class", "build_algorithm", "check_declaration", "config_sections"]
