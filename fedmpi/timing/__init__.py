"""Modelled round time (``sim_seconds``) under device profiles: the per-layer model
T(m) = c₀ + Σ_l t_l · nnz_l(m) of PruneFL, for every algorithm and every client.

API (stable; PruneFL, HypeMeFed and the engine call it)
------------------------------------------------------
Profiles (``fedmpi.timing.profiles``)::

    PROFILES: dict[str, DeviceProfile]            # built-in modelled profiles by name
    load_profile(spec: str, key: str = "device.profile") -> DeviceProfile | MeasuredProfile | CoefficientProfile
        # a built-in name, or the path of a profile YAML: measured (``fedmpi profile`` writes it)
        # or coefficients (``kind: coefficients``, coefficients.py: the PruneFL authors' kind,
        # profiles/prunefl-raspberry-pi.yaml); a missing/invalid file raises
        # ConfigError(key, "<path>: <problem>") → exit 2
    DeviceProfile(name, flops_per_second, uplink_bytes_per_second, downlink_bytes_per_second,
                  description, latency_seconds=0.0)                       # kind == "modelled"
    MeasuredProfile(name, path, model, input_shape, num_classes, batch_size, other_seconds,
                    layers: {weight name: MeasuredLayer}, uplink_bytes_per_second,
                    downlink_bytes_per_second, latency_seconds, overhead_seconds, ...)
                    # kind == "measured"; seconds per step of batch_size samples, overhead per round
    profile.check_model(model, input_shape, num_classes, shapes, key)   # ConfigError unless it fits
    MeasuredLayer(shape, dense: LayerLine, sparse: LayerLine | None,
                  sparse_active: LayerLine | None, break_even: float, break_even_active: float)
    LayerLine(intercept, slope)        # seconds per step = intercept + slope · nnz

The time model (``fedmpi.timing.model``)::

    TimeModel.for_profile(profile, info: ModelInfo, steps_per_round: int, batch_size: int, *,
                          dense_weight_gradients=False, time_constant=0.0) -> TimeModel
    TimeModel.for_samples(profile, info, samples: float, *, dense_weight_gradients=False,
                          time_constant=0.0) -> TimeModel
        # dense_weight_gradients: the clients compute every weight's gradient (PruneFL gathering
        # importance): a modelled profile charges forward and input gradient at the live density,
        # the weight gradient dense; time_constant: seconds added per round (``tm.constant``)
    tm.c0 -> float                      # fixed seconds per round
    tm.t -> dict[str, float]            # seconds per nonzero weight of each maskable layer per round
                                        # (its forward+backward for the round's samples + one 32-bit
                                        #  value uploaded and downloaded)
    tm.linear_seconds(nnz: Mapping[str, float]) -> float        # c0 + Σ t_l nnz_l
    tm.round_seconds(nnz=None, *, dense_params=None) -> float   # exact T(m) (kernel choice of a
                                        # measured profile: min(dense, sparse) per layer)
    tm.linearize(nnz) -> (c0, {layer: t_l})                       # tangent of round_seconds at nnz
    tm.compute_seconds(nnz=None) -> float                         # local compute only
    tm.scaled(samples) -> TimeModel
    nnz_of_densities(numel, densities) -> {layer: int}
    # layers missing from ``nnz`` count as dense; ``tm.numel`` gives each layer's size

The run's profiles (``RunContext.profile`` is a ``RunTiming``)::

    RunTiming.from_config(cfg, info) -> RunTiming
    timing.profile_of(client_id | None) -> DeviceProfile | MeasuredProfile
    timing.time_model(client_id=None, *, steps_per_round, batch_size, dense_weight_gradients=False) -> TimeModel
    timing.client_seconds(client_id, samples_processed, densities, upload_bytes, download_bytes, *,
                          dense_weight_gradients=False) -> float
    timing.train_flops(samples_processed, densities, dense_weight_gradients=False) -> float
    timing.kernel_policy() -> fedmpi.sparse_kernels.SparseKernelPolicy | None   # None: off

Config: ``device.profile`` (name or path; every client), ``device.time_constant`` (seconds per
round charged to every client of every method, and in c₀), ``device.tier_profiles`` (one name or
path per tier of ``tiers.mix``; a client's tier is ``tier_of_clients(num_clients, tiers.mix,
seed)``, the tiered algorithms' own draw), ``device.sparse_kernels`` (off | auto | always) and
``device.kernel_profile`` (the measured profile whose break-even densities ``auto`` uses;
default ``device.profile``).

``sim_seconds`` of a client (every algorithm, ``Server._client_row``) = latency +
``device.time_constant`` + its local compute under its profile for the samples it processed at
its layer densities (``TimeModel.compute_seconds``) + its counted upload bytes / uplink +
download bytes / downlink; a round lasts as long as its slowest client (0 where
``Algorithm.charges_round_time`` is False). Modelled profiles: compute = 3 × forward FLOPs of the
live weights / FLOP rate, or, where ``Algorithm.dense_weight_gradients(round)``, (2 × live + 1 ×
dense) forward FLOPs / rate. Measured and coefficient profiles scale per-step costs by
samples / batch_size. See docs/timing.md.

Sparse kernels: ``fedmpi.sparse_kernels`` (``LocalTrainer(..., sparse_kernels=policy)`` or
``train(..., sparse_layers=[...])``); measuring: ``fedmpi.timing.measure`` (the protocol),
``fedmpi.timing.fits`` (lines, break-evens) and ``fedmpi.timing.profile_machine`` (``fedmpi
profile``); bench/kernels.py uses the same modules.
"""
from __future__ import annotations

from .coefficients import CoefficientProfile, ModelCoefficients
from .model import RunTiming, TimeModel, nnz_of_densities
from .profiles import (BYTES_PER_VALUE, PROFILES, DeviceProfile, LayerLine, MeasuredLayer, MeasuredProfile,
                       Profile, load_profile)

__all__ = ["BYTES_PER_VALUE", "PROFILES", "CoefficientProfile", "DeviceProfile", "ModelCoefficients", "LayerLine", "MeasuredLayer", "MeasuredProfile",
           "Profile", "RunTiming", "TimeModel", "load_profile", "nnz_of_densities"]
