"""Coefficient profiles (``kind: coefficients``): a device described the way the PruneFL authors
describe their Raspberry Pi (jiangyuang/PruneFL, ``configs/femnist.py``, ``configs/cifar10.py``):

- per model, a fixed compute per local step (their ``SPARSE_TIME``; their constant
  c₀ = ``SPARSE_TIME · NUM_LOCAL_UPDATES`` + ``C_COMM``) and, per maskable layer, seconds per
  active weight per local step (``COMP_COEFFICIENTS_SINGLE``);
- seconds per 32-bit value uploaded and downloaded (``COMM_COEFFICIENT``) and a fixed
  communication per round (``C_COMM``).

The time of a round of s samples at batch B is then round_seconds + (s / B) · (step_seconds +
Σ_l coefficient_l · nnz_l) + the counted bytes over links of ``2 · 4 / value_seconds`` bytes per
second each way (one value up and down costs ``value_seconds``): the authors' est_time
(``bases/fl/simulation/adaptive.py``), charged alike to every method. The coefficients are a
linear fit of the authors' sparse implementation, which computes every weight's gradient (their
``AddmmFunction`` and ``sparse_conv2d`` backward), so that cost is in ``step_seconds`` for every
method. ``profiles/prunefl-raspberry-pi.yaml`` holds the authors' values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

from ..errors import ConfigError
from .profiles import BYTES_PER_VALUE, ProfileFields


@dataclass(frozen=True)
class ModelCoefficients:
    """One model's coefficients: fixed compute per local step, and seconds per active weight per
    local step of each maskable layer (by weight name)."""

    input_shape: tuple[int, ...]
    step_seconds: float
    layers: dict[str, float]


@dataclass(frozen=True)
class CoefficientProfile:
    name: str
    path: str
    batch_size: int                # the local batch the per-step coefficients were measured at
    value_seconds: float           # one 32-bit value uploaded and downloaded
    round_seconds: float           # fixed per round (connection, C_COMM)
    models: dict[str, ModelCoefficients]
    description: str = ""
    source: str = ""
    kind: ClassVar[str] = "coefficients"

    @property
    def latency_seconds(self) -> float:
        """The fixed per-round part, charged where a profile's latency is."""
        return self.round_seconds

    @property
    def uplink_bytes_per_second(self) -> float:
        """Half of ``value_seconds`` for a value's 4 bytes each way."""
        return 2 * BYTES_PER_VALUE / self.value_seconds

    @property
    def downlink_bytes_per_second(self) -> float:
        return 2 * BYTES_PER_VALUE / self.value_seconds

    def check_model(self, model: str, input_shape, num_classes: int, shapes: Mapping[str, tuple],
                    key: str = "device.profile") -> None:
        """ConfigError naming the file unless it has coefficients for this model, input shape and
        maskable layers (per weight, so any layer size and class count fit)."""
        if model not in self.models:
            raise ConfigError(key, f"{self.path}: has coefficients for {sorted(self.models)}, not for model "
                                   f"'{model}'; add them under models.{model} or use another profile")
        entry = self.models[model]
        if tuple(entry.input_shape) != tuple(input_shape):
            raise ConfigError(key, f"{self.path}: models.{model} was measured for input "
                                   f"{'x'.join(map(str, entry.input_shape))}, this run trains "
                                   f"{'x'.join(map(str, input_shape))}")
        if set(entry.layers) != set(shapes):
            raise ConfigError(key, f"{self.path}: models.{model}.layers {sorted(entry.layers)} do not match "
                                   f"the model's maskable layers {sorted(shapes)}")


def parse_coefficients(doc: dict, path: str, key: str = "device.profile") -> CoefficientProfile:
    """The ``kind: coefficients`` document ``doc`` (already YAML-parsed) of file ``path``."""

    fields = ProfileFields(path, key)
    bad, number = fields.bad, fields.number
    fields.text(doc, "name")
    batch = fields.positive_int(doc, "batch_size")
    models_doc = doc.get("models")
    if not isinstance(models_doc, dict) or not models_doc:
        raise bad("'models' must be a non-empty mapping of model names to their coefficients")
    models = {}
    for model, entry in models_doc.items():
        where = f"models.{model}."
        if not isinstance(entry, dict):
            raise bad(f"models.{model} must be a mapping, got {entry!r}")
        shape = fields.integers(entry.get("input_shape"), "input_shape", where)
        layers = entry.get("layers")
        if not isinstance(layers, dict) or not layers:
            raise bad(f"'{where}layers' must be a non-empty mapping of maskable weight names to seconds "
                      f"per active weight per local step")
        models[str(model)] = ModelCoefficients(
            input_shape=tuple(shape), step_seconds=number(entry, "step_seconds", where),
            layers={str(n): number(layers, n, f"{where}layers.") for n in layers})
    return CoefficientProfile(
        name=doc["name"], path=path, batch_size=batch,
        value_seconds=number(doc, "value_seconds", positive=True),
        round_seconds=number(doc, "round_seconds") if "round_seconds" in doc else 0.0,
        models=models, description=str(doc.get("description", "")), source=str(doc.get("source", "")))
