"""The per-layer round-time model T(m) = c₀ + Σ_l t_l · nnz_l(m) of a profile, and the run's
assignment of profiles to clients (``RunTiming``, held by ``RunContext.profile``)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import numpy as np

from ..errors import ConfigError
from ..tiers import tier_of_clients
from .coefficients import CoefficientProfile
from .profiles import BYTES_PER_VALUE, DeviceProfile, LayerLine, MeasuredProfile, Profile, load_profile


@dataclass(frozen=True)
class TimeModel:
    """One client's round time for ``samples`` training samples per round, as a function of the
    number of nonzero weights ``nnz[l]`` of each maskable layer l.

    - ``lines[l]``: seconds of layer l's forward + backward over the round, ``intercept + slope·nnz``,
      with the kernel of the sparse regime (modelled: FLOPs of the live weights, or with
      ``dense_weight_gradients`` the forward and input gradient of the live weights and the
      weight gradient of every weight; measured: the sparse kernel where the profile found it
      faster at some density, else the dense kernel; coefficients: the profile's per-weight cost).
    - ``dense_lines[l]`` (measured profiles only): the dense kernel's line; the device runs the
      faster kernel, so a layer costs ``min(lines[l](nnz), dense_lines[l](nnz))``.
    - ``fixed_compute``: compute outside the maskable layers (activations, loss, optimizer).
    - ``overhead``: compute per round whatever the samples (measured profiles: loading and
      exporting the model); ``latency``: fixed per round (connection set-up; a coefficient
      profile's ``round_seconds``); ``constant``: ``device.time_constant``, seconds charged to
      every client in every round, whatever the method.
    - ``value_seconds``: one 32-bit value uploaded and downloaded; ``dense_params`` values outside
      the maskable weights (biases, norms) always travel.

    ``c0``/``t`` are the linear model PruneFL maximises Γ = Σg²/T(m) with; ``round_seconds`` is
    the exact, piecewise-linear T(m) (equal to the linear one for modelled profiles and below
    break-even); ``linearize(nnz)`` its tangent at a given mask.
    """

    profile: str
    samples: int
    numel: dict[str, int]
    lines: dict[str, LayerLine]
    dense_lines: dict[str, LayerLine | None]
    fixed_compute: float
    value_seconds: float
    dense_params: int
    latency: float = 0.0
    overhead: float = 0.0
    constant: float = 0.0

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def for_profile(cls, profile: Profile, info, steps_per_round: int, batch_size: int, *,
                    dense_weight_gradients: bool = False, time_constant: float = 0.0) -> "TimeModel":
        """The model for a round of ``steps_per_round`` local steps of ``batch_size`` samples.
        ``info``: the run's ``ModelInfo`` (shapes, maskable, layer_flops, model, input_shape,
        num_classes). ``dense_weight_gradients``: the clients compute every weight's gradient,
        pruned or not (PruneFL gathering importance); ``time_constant``: ``constant``."""
        if steps_per_round < 0 or batch_size < 1:
            raise ValueError(f"need steps_per_round >= 0 and batch_size >= 1, got {steps_per_round}, {batch_size}")
        return cls.for_samples(profile, info, steps_per_round * batch_size,
                               dense_weight_gradients=dense_weight_gradients, time_constant=time_constant)

    @classmethod
    def for_samples(cls, profile: Profile, info, samples: float, *, dense_weight_gradients: bool = False,
                    time_constant: float = 0.0) -> "TimeModel":
        maskable = list(info.maskable)
        numel = {n: int(math.prod(info.shapes[n])) for n in maskable}
        dense_params = int(sum(math.prod(s) for n, s in info.shapes.items() if n not in numel))
        value = (BYTES_PER_VALUE / profile.uplink_bytes_per_second
                 + BYTES_PER_VALUE / profile.downlink_bytes_per_second)
        if isinstance(profile, MeasuredProfile):
            # its ``sparse`` line already computes every weight's gradient (``fedmpi profile``
            # measures PruneFL's case), and the dense kernel always does: dense_weight_gradients
            # changes nothing here
            profile.check_model(info.model, info.input_shape, info.num_classes,
                                {n: info.shapes[n] for n in maskable})
            steps = samples / profile.batch_size       # per-sample cost of the measured batch size
            lines, dense_lines = {}, {}
            for n in maskable:
                layer = profile.layers[n]
                if layer.sparse is not None and layer.break_even > 0:
                    lines[n], dense_lines[n] = layer.sparse.scaled(steps), layer.dense.scaled(steps)
                else:
                    lines[n], dense_lines[n] = layer.dense.scaled(steps), None
            fixed = profile.other_seconds * steps
        elif isinstance(profile, DeviceProfile):
            flops, rate = info.layer_flops, profile.flops_per_second
            if dense_weight_gradients:
                # forward and input gradient on the live weights (2 · d · F), the weight gradient
                # dense (F): the authors' sparse layers do the same (module doc of timing/__init__)
                lines = {n: LayerLine(samples * flops.get(n, 0) / rate,
                                      2.0 * samples * (flops.get(n, 0) / numel[n]) / rate) for n in maskable}
            else:
                lines = {n: LayerLine(0.0, 3.0 * samples * (flops.get(n, 0) / numel[n]) / rate) for n in maskable}
            dense_lines = {n: None for n in maskable}
            fixed = 0.0
        elif isinstance(profile, CoefficientProfile):
            # the authors' fit already holds their dense weight gradient (in step_seconds)
            profile.check_model(info.model, info.input_shape, info.num_classes,
                                {n: info.shapes[n] for n in maskable})
            coefficients = profile.models[info.model]
            steps = samples / profile.batch_size
            lines = {n: LayerLine(0.0, coefficients.layers[n] * steps) for n in maskable}
            dense_lines = {n: None for n in maskable}
            fixed = coefficients.step_seconds * steps
            value = profile.value_seconds
        else:
            raise TypeError(f"not a device profile: {profile!r}")
        return cls(profile=profile.name, samples=samples, numel=numel, lines=lines, dense_lines=dense_lines,
                   fixed_compute=fixed, value_seconds=value, dense_params=dense_params,
                   latency=profile.latency_seconds, constant=float(time_constant),
                   overhead=profile.overhead_seconds if isinstance(profile, MeasuredProfile) else 0.0)

    def scaled(self, samples: float) -> "TimeModel":
        """The same device for another number of samples per round (``overhead`` and ``latency``
        stay)."""
        f = samples / self.samples if self.samples else 0.0
        return replace(self, samples=samples, lines={n: l.scaled(f) for n, l in self.lines.items()},
                       dense_lines={n: (l.scaled(f) if l else None) for n, l in self.dense_lines.items()},
                       fixed_compute=self.fixed_compute * f)

    # -- the linear model ------------------------------------------------------------------------
    @property
    def c0(self) -> float:
        """Fixed seconds per round: latency, the constant, overhead, compute outside the maskable
        layers, the layer lines' intercepts and the communication of the ``dense_params`` values."""
        return (self.latency + self.constant + self.overhead + self.fixed_compute
                + sum(l.intercept for l in self.lines.values()) + self.dense_params * self.value_seconds)

    @property
    def t(self) -> dict[str, float]:
        """Seconds per nonzero weight of each layer per round: its compute + one value each way."""
        return {n: l.slope + self.value_seconds for n, l in self.lines.items()}

    def linear_seconds(self, nnz: Mapping[str, float]) -> float:
        """c₀ + Σ_l t_l · nnz_l (layers missing from ``nnz`` are dense)."""
        t = self.t
        return self.c0 + sum(t[n] * self._nnz(nnz, n) for n in self.numel)

    def linearize(self, nnz: Mapping[str, float]) -> tuple[float, dict[str, float]]:
        """(c₀, {l: t_l}) of the kernel each layer runs at ``nnz``: the tangent of ``round_seconds``."""
        c0 = self.latency + self.constant + self.overhead + self.fixed_compute + self.dense_params * self.value_seconds
        t = {}
        for n in self.numel:
            line = self._line(n, self._nnz(nnz, n))
            c0 += line.intercept
            t[n] = line.slope + self.value_seconds
        return c0, t

    # -- the exact model --------------------------------------------------------------------------
    def layer_compute_seconds(self, name: str, nnz: float) -> float:
        return self._line(name, nnz)(nnz)

    def compute_seconds(self, nnz: Mapping[str, float] | None = None) -> float:
        """Local training time of the round (no communication)."""
        nnz = nnz or {}
        layers = sum(self.layer_compute_seconds(n, self._nnz(nnz, n)) for n in self.numel)
        return self.overhead + self.fixed_compute + layers

    def round_seconds(self, nnz: Mapping[str, float] | None = None, *, dense_params: int | None = None) -> float:
        """T(m): latency + the constant + compute + every value (active weights and
        ``dense_params``, default the model's non-maskable values) uploaded and downloaded once."""
        nnz = nnz or {}
        values = sum(self._nnz(nnz, n) for n in self.numel)
        values += self.dense_params if dense_params is None else dense_params
        return self.latency + self.constant + self.compute_seconds(nnz) + values * self.value_seconds

    def _line(self, name: str, nnz: float) -> LayerLine:
        line, dense = self.lines[name], self.dense_lines[name]
        return dense if dense is not None and dense(nnz) < line(nnz) else line

    def _nnz(self, nnz: Mapping[str, float], name: str) -> float:
        value = nnz.get(name, self.numel[name])
        if not 0 <= value <= self.numel[name]:
            raise ValueError(f"nnz of {name} must be in [0, {self.numel[name]}], got {value}")
        return value


def nnz_of_densities(numel: Mapping[str, int], densities: Mapping[str, float] | None) -> dict[str, int]:
    """Nonzero counts from per-layer densities (missing layers dense), rounded to whole weights."""
    densities = densities or {}
    unknown = sorted(set(densities) - set(numel))
    if unknown:
        raise ValueError(f"densities given for non-maskable or unknown weights: {unknown}")
    return {n: int(round(float(densities.get(n, 1.0)) * size)) for n, size in numel.items()}


class RunTiming:
    """The profiles of a run (``RunContext.profile``): ``device.profile`` for every client, or
    ``device.tier_profiles[t]`` for the clients of tier t (tiers from ``tiers.mix`` and the seed,
    as the tiered algorithms draw them), ``device.time_constant`` (charged to every client of every
    round) and the sparse-kernel policy of local training."""

    def __init__(self, info, default: Profile, tier_profiles=(), tiers: np.ndarray | None = None,
                 sparse_kernels: str = "off", kernel_profile: MeasuredProfile | None = None,
                 time_constant: float = 0.0):
        self.info = info
        self.time_constant = float(time_constant)
        self.default = default
        self.tier_profiles = list(tier_profiles)
        self.tiers = tiers
        self.sparse_kernels = sparse_kernels
        self.kernel_profile = kernel_profile
        self._per_sample: dict[tuple, TimeModel] = {}
        self._compute_memo: dict[tuple, float] = {}

    @classmethod
    def from_config(cls, cfg: dict, info) -> "RunTiming":
        device = cfg["device"]
        shapes = {n: info.shapes[n] for n in info.maskable}

        def load(spec, key):
            profile = load_profile(spec, key)
            if isinstance(profile, (MeasuredProfile, CoefficientProfile)):
                profile.check_model(info.model, info.input_shape, info.num_classes, shapes, key)
            return profile

        default = load(device["profile"], "device.profile")
        tier_specs = device.get("tier_profiles") or []
        tier_profiles = [load(s, f"device.tier_profiles[{i}]") for i, s in enumerate(tier_specs)]
        tiers = None
        if tier_profiles:
            mix = cfg["tiers"]["mix"]
            if len(mix) != len(tier_profiles):
                raise ConfigError("device.tier_profiles", f"needs one profile per tier: tiers.mix has {len(mix)}")
            tiers = tier_of_clients(info.num_clients, mix, cfg["seed"])
        mode = device.get("sparse_kernels", "off")
        kernel_profile = None
        if mode == "auto":
            spec = device.get("kernel_profile") or device["profile"]
            key = "device.kernel_profile" if device.get("kernel_profile") else "device.profile"
            kernel_profile = load(spec, key)
            if not isinstance(kernel_profile, MeasuredProfile):
                raise ConfigError("device.sparse_kernels", "auto needs a measured profile of this machine "
                                  "(device.kernel_profile, or device.profile): run `fedmpi profile`")
        return cls(info, default, tier_profiles, tiers, mode, kernel_profile,
                   time_constant=device.get("time_constant", 0.0))

    def profile_of(self, client_id: int | None = None) -> Profile:
        if client_id is None or self.tiers is None:
            return self.default
        return self.tier_profiles[int(self.tiers[client_id])]

    def time_model(self, client_id: int | None = None, *, steps_per_round: int, batch_size: int,
                   dense_weight_gradients: bool = False) -> TimeModel:
        """The ``TimeModel`` of a client's profile (``None``: ``device.profile``), with
        ``device.time_constant``; ``dense_weight_gradients``: as ``TimeModel.for_profile``."""
        return TimeModel.for_profile(self.profile_of(client_id), self.info, steps_per_round, batch_size,
                                     dense_weight_gradients=dense_weight_gradients, time_constant=self.time_constant)

    def client_seconds(self, client_id: int, samples_processed: int, densities: Mapping[str, float] | None,
                       upload_bytes: int, download_bytes: int, *, dense_weight_gradients: bool = False) -> float:
        """A client's modelled round time: latency + ``device.time_constant`` + local compute for
        the samples it processed at its layer densities (``dense_weight_gradients``: it computed
        every weight's gradient) + its counted bytes over its links."""
        profile = self.profile_of(client_id)
        key = (id(profile), bool(dense_weight_gradients))
        if key not in self._per_sample:
            self._per_sample[key] = TimeModel.for_samples(profile, self.info, 1,
                                                          dense_weight_gradients=dense_weight_gradients)
        # clients of a round mostly repeat (samples, densities): their compute time is computed once
        memo = (key, samples_processed, tuple(sorted(densities.items())) if densities else None)
        compute = self._compute_memo.get(memo)
        if compute is None:
            per_sample = self._per_sample[key]
            compute = per_sample.scaled(samples_processed).compute_seconds(nnz_of_densities(per_sample.numel, densities))
            if len(self._compute_memo) > 100_000:
                self._compute_memo.clear()
            self._compute_memo[memo] = compute
        return (profile.latency_seconds + self.time_constant + compute + upload_bytes / profile.uplink_bytes_per_second
                + download_bytes / profile.downlink_bytes_per_second)

    def train_flops(self, samples_processed: int, densities: Mapping[str, float] | None,
                    dense_weight_gradients: bool = False) -> float:
        """A client's analytic training FLOPs: per sample 3 × the forward FLOPs of its live
        weights, or with ``dense_weight_gradients`` 2 × those (forward, input gradient) + the
        dense forward FLOPs (every weight's gradient)."""
        from ..models.flops import scale_flops

        flops = self.info.layer_flops
        if not dense_weight_gradients:
            return float(samples_processed * 3 * scale_flops(flops, densities))
        return float(samples_processed * (2 * scale_flops(flops, densities) + scale_flops(flops)))

    def kernel_policy(self):
        """The ``SparseKernelPolicy`` for ``LocalTrainer(sparse_kernels=...)`` from
        ``device.sparse_kernels``; None when it is off (dense kernels only)."""
        from ..sparse_kernels import SparseKernelPolicy

        if self.sparse_kernels == "off":
            return None
        if self.sparse_kernels != "auto":
            return SparseKernelPolicy(self.sparse_kernels)
        layers = self.kernel_profile.layers
        return SparseKernelPolicy("auto", {n: l.break_even for n, l in layers.items()},
                                  {n: l.break_even_active for n, l in layers.items() if l.sparse_active})
