"""Config: defaults, YAML loading, ``--set`` overrides and validation.

A config is a nested dict. Every key that may appear is in ``DEFAULTS`` (``defaults.py``); the
type of the default is the type the key must have (``None`` defaults accept a string or null).
Dotted keys, merging and ``--set`` parsing: ``keys.py``; the checks: ``validation.py``.
Validation runs on every rank before any data is loaded or any MPI message is exchanged, so a bad
config exits with status 2 everywhere at once.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from ..errors import ConfigError
from .defaults import ALGORITHMS, DEFAULTS, OPTIMIZERS, PARTITIONS, TIERED
from .keys import flatten, get_dotted, merge, parse_override, set_dotted
from .validation import validate


def load_config(path: str | Path | None, overrides: list[str] = (), *, extra: dict | None = None) -> dict:
    """Defaults ← YAML file ← ``extra`` mapping ← ``--set`` overrides, then validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read config file: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(str(path), f"not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(str(path), "must be a YAML mapping of config keys")
        merge(cfg, loaded)
    if extra:
        merge(cfg, extra)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(cfg, key, value)
    return validate(cfg)


def to_json(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


__all__ = ["ALGORITHMS", "DEFAULTS", "OPTIMIZERS", "PARTITIONS", "TIERED", "flatten", "get_dotted", "load_config",
           "parse_override", "set_dotted", "to_json", "validate"]
