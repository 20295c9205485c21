"""Device profiles: *modelled* (a FLOP rate and link bandwidths, built in) and *measured* (per-layer
step-time lines fitted by ``fedmpi profile`` on a real machine, loaded from a YAML file).

``load_profile(spec)`` takes a built-in name (``laptop``, ``raspberry-pi-4``, ``jetson-nano``,
``phone-lte``) or the path of a profile file (``profiles/NAME.yaml``; relative to the working
directory): a measured profile, or a coefficient profile (``kind: coefficients``, coefficients.py,
such as the PruneFL authors' ``profiles/prunefl-raspberry-pi.yaml``); anything wrong with the file
is a ``ConfigError`` (exit 2) that names it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from ..errors import ConfigError

FORMAT = "fedmpi-profile/1"
BYTES_PER_VALUE = 4          # a float32 value on the wire
_MBIT = 1e6 / 8


@dataclass(frozen=True)
class DeviceProfile:
    """Modelled device: training costs 3 × forward FLOPs at ``flops_per_second``; a sparse layer
    does only the FLOPs of its live weights; bytes move at the link bandwidths."""

    name: str
    flops_per_second: float      # sustained training throughput
    uplink_bytes_per_second: float
    downlink_bytes_per_second: float
    description: str
    latency_seconds: float = 0.0   # fixed per round (connection set-up); 0 for the built-ins
    kind: ClassVar[str] = "modelled"


PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile("laptop", 20e9, 20 * _MBIT, 100 * _MBIT, "laptop CPU on home broadband"),
        DeviceProfile("raspberry-pi-4", 1.5e9, 10 * _MBIT, 50 * _MBIT, "Raspberry Pi 4 on Wi-Fi"),
        DeviceProfile("jetson-nano", 10e9, 10 * _MBIT, 50 * _MBIT, "Jetson Nano (GPU) on Wi-Fi"),
        DeviceProfile("phone-lte", 5e9, 5 * _MBIT, 20 * _MBIT, "smartphone on LTE"),
    )
}


@dataclass(frozen=True)
class LayerLine:
    """Seconds of one training step of a layer (forward + backward, batch ``batch_size`` of the
    profile) as a line in the layer's number of nonzero weights."""

    intercept: float
    slope: float

    def __call__(self, nnz: float) -> float:
        return self.intercept + self.slope * nnz

    def scaled(self, factor: float) -> "LayerLine":
        return LayerLine(self.intercept * factor, self.slope * factor)

    def to_dict(self) -> dict:
        return {"intercept": float(self.intercept), "slope": float(self.slope)}


@dataclass(frozen=True)
class MeasuredLayer:
    shape: tuple[int, ...]
    dense: LayerLine                       # the masked dense kernel (flat in nnz, up to noise)
    sparse: LayerLine | None = None        # sparse kernel, gradient of every weight (PruneFL's case)
    sparse_active: LayerLine | None = None  # sparse kernel, gradient of the active weights only
    break_even: float = 0.0                # density below which ``sparse`` beats ``dense`` (0: never)
    break_even_active: float = 0.0         # the same for ``sparse_active``

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class MeasuredProfile:
    """A machine measured by ``fedmpi profile`` for one model, input shape and class count.

    Per step at ``batch_size``: each maskable layer costs ``min(dense(nnz), sparse(nnz))`` (the
    device runs the faster kernel, as ``device.sparse_kernels: auto`` does), the rest of the step
    (activations, pooling, loss, optimizer, re-masking) ``other_seconds``. Per round, whatever the
    steps: ``overhead_seconds`` (loading the weights and masks into the model, exporting them).
    """

    name: str
    path: str
    model: str
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    other_seconds: float
    layers: dict[str, MeasuredLayer]
    uplink_bytes_per_second: float
    downlink_bytes_per_second: float
    latency_seconds: float = 0.0
    overhead_seconds: float = 0.0
    description: str = ""
    extra: dict = field(default_factory=dict, compare=False)   # machine, measurement settings
    kind: ClassVar[str] = "measured"

    def check_model(self, model: str, input_shape, num_classes: int, shapes: Mapping[str, tuple],
                    key: str = "device.profile") -> None:
        """ConfigError naming the file unless the profile was measured for this very model."""
        want = f"{model} {'x'.join(map(str, input_shape))} with {num_classes} classes"
        have = f"{self.model} {'x'.join(map(str, self.input_shape))} with {self.num_classes} classes"
        hint = (f"; measure this one with `fedmpi profile --model {model} --data-shape "
                f"{','.join(map(str, input_shape))} --classes {num_classes} --out profiles/NAME.yaml`")
        if (self.model, tuple(self.input_shape), self.num_classes) != (model, tuple(input_shape), num_classes):
            raise ConfigError(key, f"{self.path}: measured for {have}, but this run trains {want}{hint}")
        if set(self.layers) != set(shapes) or any(tuple(self.layers[n].shape) != tuple(shapes[n]) for n in shapes):
            raise ConfigError(key, f"{self.path}: its layers {sorted(self.layers)} do not match the "
                                   f"model's maskable layers {sorted(shapes)}{hint}")


Profile = DeviceProfile | MeasuredProfile


# --------------------------------------------------------------------------- loading
def is_profile_path(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) or os.sep in spec or "/" in spec


_CACHE: dict[tuple, MeasuredProfile] = {}


def load_profile(spec: str, key: str = "device.profile") -> Profile:
    """A built-in profile by name, or a measured profile from a YAML path (validated)."""
    if not isinstance(spec, str) or not spec:
        raise ConfigError(key, f"must be a profile name ({', '.join(PROFILES)}) or the path of a "
                               f"measured profile (profiles/NAME.yaml), got {spec!r}")
    if spec in PROFILES:
        return PROFILES[spec]
    if not is_profile_path(spec):
        raise ConfigError(key, f"unknown profile '{spec}'; choose one of {', '.join(PROFILES)} or give "
                               f"the path of a measured profile (profiles/NAME.yaml, written by `fedmpi profile`)")
    path = Path(spec)
    try:
        stat = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(key, f"{spec}: cannot read measured profile: {exc.strerror or exc}") from None
    cache_key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if cache_key not in _CACHE:
        _CACHE[cache_key] = parse_profile(text, spec, key)
    return _CACHE[cache_key]


class ProfileFields:
    """Reading a profile file's fields (measured or coefficients): each bad one is exit 2 naming
    ``key``, the file and the field."""

    def __init__(self, path: str, key: str):
        self.path, self.key = path, key

    def bad(self, problem: str) -> ConfigError:
        return ConfigError(self.key, f"{self.path}: {problem}")

    def number(self, mapping: dict, name: str, where: str = "", *, minimum: float | None = 0.0,
               positive: bool = False) -> float:
        value = mapping.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.bad(f"{where}'{name}' must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.bad(f"{where}'{name}' must be > 0, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.bad(f"{where}'{name}' must be >= {minimum}, got {value!r}")
        return float(value)

    def integers(self, value, name: str, where: str = "") -> tuple[int, ...]:
        if not isinstance(value, list) or not value or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise self.bad(f"{where}'{name}' must be a list of positive integers, got {value!r}")
        return tuple(value)

    def positive_int(self, mapping: dict, name: str) -> int:
        value = mapping.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise self.bad(f"'{name}' must be a positive integer, got {value!r}")
        return value

    def text(self, mapping: dict, name: str) -> str:
        if not isinstance(mapping.get(name), str) or not mapping[name]:
            raise self.bad(f"'{name}' must be a non-empty string, got {mapping.get(name)!r}")
        return mapping[name]


def parse_profile(text: str, path: str, key: str = "device.profile"):
    """A ``MeasuredProfile``, or a ``CoefficientProfile`` (coefficients.py) for ``kind: coefficients``."""
    import yaml

    fields = ProfileFields(path, key)
    bad, number, integers = fields.bad, fields.number, fields.integers

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise bad(f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise bad("must be a YAML mapping (a measured profile written by `fedmpi profile`)")
    if doc.get("format") != FORMAT:
        raise bad(f"'format' must be '{FORMAT}', got {doc.get('format')!r}")
    if doc.get("kind") == "coefficients":   # per-weight coefficients (the PruneFL authors' kind)
        from .coefficients import parse_coefficients

        return parse_coefficients(doc, path, key)
    if doc.get("kind") != "measured":
        raise bad(f"'kind' must be 'measured' (written by `fedmpi profile`) or 'coefficients', "
                  f"got {doc.get('kind')!r}")

    def line(mapping: dict, name: str, where: str, required: bool) -> LayerLine | None:
        value = mapping.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, dict):
            raise bad(f"{where}'{name}' must be a mapping with intercept and slope, got {value!r}")
        return LayerLine(number(value, "intercept", f"{where}{name}."),
                         number(value, "slope", f"{where}{name}."))

    for name in ("name", "model"):
        fields.text(doc, name)
    classes, batch = fields.positive_int(doc, "num_classes"), fields.positive_int(doc, "batch_size")
    layers_doc = doc.get("layers")
    if not isinstance(layers_doc, dict) or not layers_doc:
        raise bad("'layers' must be a non-empty mapping of maskable weight names")
    layers = {}
    for lname, ldoc in layers_doc.items():
        where = f"layers.{lname}."
        if not isinstance(ldoc, dict):
            raise bad(f"layers.{lname} must be a mapping, got {ldoc!r}")
        fractions = {}
        for fname in ("break_even", "break_even_active"):
            fractions[fname] = number(ldoc, fname, where) if fname in ldoc else 0.0
            if fractions[fname] > 1:
                raise bad(f"{where}'{fname}' must be a density in [0, 1], got {fractions[fname]!r}")
        layers[str(lname)] = MeasuredLayer(
            shape=integers(ldoc.get("shape"), "shape", where), dense=line(ldoc, "dense", where, True),
            sparse=line(ldoc, "sparse", where, False), sparse_active=line(ldoc, "sparse_active", where, False),
            **fractions)
    return MeasuredProfile(
        name=doc["name"], path=path, model=doc["model"],
        input_shape=integers(doc.get("input_shape"), "input_shape"), num_classes=classes, batch_size=batch,
        other_seconds=number(doc, "other_seconds", ""), layers=layers,
        uplink_bytes_per_second=number(doc, "uplink_bytes_per_second", "", positive=True),
        downlink_bytes_per_second=number(doc, "downlink_bytes_per_second", "", positive=True),
        latency_seconds=number(doc, "latency_seconds", "") if "latency_seconds" in doc else 0.0,
        overhead_seconds=number(doc, "overhead_seconds", "") if "overhead_seconds" in doc else 0.0,
        description=str(doc.get("description", "")),
        extra={k: doc[k] for k in ("machine", "measurement") if k in doc})


def profile_document(profile: MeasuredProfile,
                     medians: Mapping[str, Mapping[str, list]] | None = None) -> dict[str, Any]:
    """The YAML document of a measured profile (``medians``: raw per-density medians to keep)."""
    layers = {}
    for name, layer in profile.layers.items():
        entry: dict[str, Any] = {"shape": list(layer.shape), "dense": layer.dense.to_dict()}
        if layer.sparse is not None:
            entry["sparse"] = layer.sparse.to_dict()
            entry["break_even"] = float(layer.break_even)
        if layer.sparse_active is not None:
            entry["sparse_active"] = layer.sparse_active.to_dict()
            entry["break_even_active"] = float(layer.break_even_active)
        if medians and name in medians:
            entry["medians"] = {k: [float(v) for v in vs] for k, vs in medians[name].items()}
        layers[name] = entry
    return {
        "format": FORMAT, "kind": "measured", "name": profile.name, "description": profile.description,
        "model": profile.model, "input_shape": list(profile.input_shape), "num_classes": profile.num_classes,
        "batch_size": profile.batch_size,
        "uplink_bytes_per_second": float(profile.uplink_bytes_per_second),
        "downlink_bytes_per_second": float(profile.downlink_bytes_per_second),
        "latency_seconds": float(profile.latency_seconds),
        "overhead_seconds": float(profile.overhead_seconds),
        "other_seconds": float(profile.other_seconds),
        **profile.extra,
        "layers": layers,
    }
