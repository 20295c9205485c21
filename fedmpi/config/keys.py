"""Dotted config keys (``data.alpha``): flattening, reading and setting one, merging a mapping
into the defaults, and ``--set key=value`` parsing; an unknown key is a ConfigError with the
closest known key as a hint."""
from __future__ import annotations

import difflib
from typing import Any

import yaml

from ..errors import ConfigError


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: ``{"data": {"alpha": 1}}`` → ``{"data.alpha": 1}``."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _unknown_key(key: str, tree: dict) -> ConfigError:
    """``key`` is not in ``tree`` (the whole config): the error, with the closest known key."""
    flat = flatten(tree)
    sections = {k.rsplit(".", 1)[0] for k in flat if "." in k}
    close = difflib.get_close_matches(key, list(flat) + sorted(sections), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(key, f"unknown key{hint}")


def merge(base: dict, override: dict, prefix: str = "", root: dict | None = None) -> None:
    """Write ``override`` into ``base`` key by key; every key must exist in ``base``."""
    root = base if root is None else root
    for key, value in override.items():
        name = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(name, "keys must be strings")
        if key not in base:
            raise _unknown_key(name, root)
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(name, f"must be a mapping of settings, got {value!r}")
            merge(base[key], value, name + ".", root)
        else:
            base[key] = value


def set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise _unknown_key(".".join(parts[: i + 1]), cfg)
        node = node[part]
    if parts[-1] not in node:
        raise _unknown_key(dotted, cfg)
    if isinstance(node[parts[-1]], dict):
        raise ConfigError(dotted, "is a section; set one of its keys")
    node[parts[-1]] = value


def get_dotted(cfg: dict, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as a YAML scalar (``0.1``, ``true``, ``fedavgm``)."""
    if "=" not in text:
        raise ConfigError(text, "--set needs key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value {raw!r}: {exc}") from None
    return key.strip(), value
