"""Validation of a merged config (``validate``): every key type-checked against its default, then
the constraints of fedmpi's own sections (one check function per section), then each method's
section by its class's ``check_config``.

A method's check may also complete its section: with ``public_code: true`` FedDST, PruneFL and
LotteryFL write out every deviation of their public code key by key, so the resolved config shows
each one.
"""
from __future__ import annotations

import math
from typing import Any

from ..aggregation import MAX_CONTRIBUTIONS, SUM_MODES
from ..algorithms import ALGORITHMS, config_sections
from ..errors import ConfigError
from ..data import DATASETS, UNIMIB_LAYOUTS, UNIMIB_TASKS
from ..models import MODELS, variant_options
from ..timing import MeasuredProfile, load_profile
from ..training import LOSSES, OPTIMIZERS
from .defaults import LEFTOVER_RULES, PARTITIONS, UNION_TYPES, defaults
from .keys import flatten, get_dotted, set_dotted


def validate(cfg: dict, tree: dict | None = None) -> dict:
    """Type-check every key of ``tree`` (the defaults: ``defaults()`` unless given) and the
    constraints between them; returns cfg (types normalised)."""
    tree = defaults(cfg.get("algorithm")) if tree is None else tree
    sections = {name: cls for name, cls in config_sections(cfg.get("algorithm")).items() if name in tree}
    union_types = dict(UNION_TYPES)
    for section, cls in sections.items():
        union_types.update({f"{section}.{key}": types for key, types in cls.union_types.items()})
    for key, default in flatten(tree).items():
        set_dotted(cfg, key, _check_type(key, get_dotted(cfg, key), default, union_types.get(key)))
    for check in CORE_CHECKS:
        check(cfg)
    for cls in sections.values():
        cls.check_config(cfg)
    for check in RUN_CHECKS:
        check(cfg)
    return cfg


def _check_type(key: str, value: Any, default: Any, allowed: tuple | None) -> Any:
    if allowed is None:
        allowed = (str,) if default is None else (type(default),)
    if default is None and value is None:
        return value
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if float in allowed and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(key, f"must be {allowed[0].__name__}, got {value!r}")
    if not isinstance(value, allowed):
        want = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(key, f"must be {want}, got {type(value).__name__} {value!r}")
    return value


def _require(cond: bool, key: str, problem: str) -> None:
    if not cond:
        raise ConfigError(key, problem)


# ---------------------------------------------------------------------------- run-wide sections

def _check_top_level(cfg: dict) -> None:
    """rounds, algorithm, sparsity."""
    _require(cfg["rounds"] >= 1, "rounds", "must be at least 1")
    _require(cfg["algorithm"] in ALGORITHMS, "algorithm",
             f"unknown algorithm '{cfg['algorithm']}'; choose one of {', '.join(ALGORITHMS)}")
    _require(cfg["model"] in MODELS, "model", f"unknown model '{cfg['model']}'; choose one of {', '.join(MODELS)}")
    _require(cfg["data"]["name"] in DATASETS, "data.name",
             f"unknown dataset '{cfg['data']['name']}'; choose one of {', '.join(DATASETS)}")
    _require(0.0 <= cfg["sparsity"] < 1.0, "sparsity", "must be in [0, 1)")


def _check_clients(cfg: dict) -> None:
    clients = cfg["clients"]
    _require(clients["total"] >= 1, "clients.total", "must be at least 1")
    _require(clients["per_round"] >= 1, "clients.per_round", "must be at least 1")
    _require(clients["per_round"] <= clients["total"], "clients.per_round",
             f"is {clients['per_round']} but clients.total is only {clients['total']}")


def _check_data(cfg: dict) -> None:
    data = cfg["data"]
    _require(data["partition"] in PARTITIONS, "data.partition",
             f"unknown partition '{data['partition']}'; choose one of {', '.join(PARTITIONS)}")
    _require(data["alpha"] > 0, "data.alpha", "must be > 0")
    _require(data["shard_size"] >= 1, "data.shard_size", "must be at least 1")
    _require(data["shards_per_client"] >= 1, "data.shards_per_client", "must be at least 1")
    _require(data["min_client_samples"] >= 0, "data.min_client_samples",
             "must be 0 (no minimum) or a positive number of samples")
    _require(data["min_client_samples"] == 0 or data["partition"] == "dirichlet",
             "data.min_client_samples", "applies only to data.partition: dirichlet; set it to 0")
    _require(0 <= data["local_test_fraction"] < 1, "data.local_test_fraction", "must be in [0, 1)")
    _require(data["unimib_layout"] in UNIMIB_LAYOUTS, "data.unimib_layout",
             f"unknown layout '{data['unimib_layout']}'; choose series (3x151 signals) or image "
             f"(HypeMeFed's 1x18x25 image)")
    _require(data["unimib_layout"] == "series" or data["name"] in UNIMIB_TASKS, "data.unimib_layout",
             f"image applies only to data.name {', '.join(UNIMIB_TASKS)}; set it to series")


def _check_local(cfg: dict) -> None:
    local = cfg["local"]
    _require(local["epochs"] >= 1, "local.epochs", "must be at least 1")
    _require(local["batch_size"] >= 1, "local.batch_size", "must be at least 1")
    _require(local["lr"] > 0, "local.lr", "must be > 0")
    _require(local["momentum"] >= 0, "local.momentum", "must be >= 0")
    _require(local["weight_decay"] >= 0, "local.weight_decay", "must be >= 0")
    _require(local["optimizer"] in OPTIMIZERS, "local.optimizer",
             f"unknown optimizer '{local['optimizer']}'; choose one of {', '.join(OPTIMIZERS)}")
    _require(len(local["betas"]) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in local["betas"]),
             "local.betas", "must be two numbers in [0, 1), e.g. [0.9, 0.999]")
    _require(local["eps"] > 0, "local.eps", "must be > 0")
    _require(local["loss"] in LOSSES, "local.loss",
             f"unknown loss '{local['loss']}'; choose one of {', '.join(LOSSES)}")
    own = getattr(ALGORITHMS[cfg["algorithm"]], "own_loss", None)
    _require(local["loss"] == "cross_entropy" or not own, "local.loss",
             f"{cfg['algorithm']} trains with a loss of its own ({own}); set local.loss=cross_entropy")
    _require(local["client_batch"] >= 1, "local.client_batch", "must be at least 1 (1: clients one by one)")
    _require(local["backward"] in ("auto", "autograd"), "local.backward", "must be 'auto' or 'autograd'")
    _require(not local["nesterov"] or (local["optimizer"] == "sgd" and local["momentum"] > 0), "local.nesterov",
             "needs local.optimizer: sgd and local.momentum > 0")


def _check_eval(cfg: dict) -> None:
    _require(cfg["eval"]["every"] >= 0, "eval.every", "must be >= 0 (0: only after the last round)")
    _require(cfg["eval"]["batch_size"] >= 1, "eval.batch_size", "must be at least 1")


def _check_tiers(cfg: dict) -> None:
    """tiers, and the multi-exit model the tiered algorithms need."""
    tiers = cfg["tiers"]
    _require(len(tiers["mix"]) >= 1 and all(isinstance(m, (int, float)) and m >= 0 for m in tiers["mix"])
             and sum(tiers["mix"]) > 0, "tiers.mix", "must be a list of non-negative shares, not all 0")
    for key in ("levels", "widths"):
        _require(len(tiers[key]) == len(tiers["mix"]), f"tiers.{key}",
                 f"needs one entry per tier: tiers.mix has {len(tiers['mix'])}")
    _require(all(isinstance(v, int) and 1 <= v <= 3 for v in tiers["levels"]), "tiers.levels",
             "entries must be exit levels 1, 2 or 3")
    _require(all(isinstance(v, (int, float)) and 0 < v <= 1 for v in tiers["widths"]), "tiers.widths",
             "entries must be width rates in (0, 1]")
    _require(tiers["leftover"] in LEFTOVER_RULES, "tiers.leftover",
             f"unknown rule '{tiers['leftover']}'; choose one of {', '.join(LEFTOVER_RULES)}")
    _require(not ALGORITHMS[cfg["algorithm"]].tiered or {"level", "width"} <= set(variant_options(cfg["model"])),
             "model", f"algorithm {cfg['algorithm']} trains submodels of a multi-exit family: use model: "
                      f"multiexit_vgg (or multiexit_vgg_small, or a model whose builder takes level and width)")


def _check_aggregation(cfg: dict) -> None:
    """aggregation: fixed_point and workers need an algorithm whose merge is a sum over holders."""
    agg, algorithm = cfg["aggregation"], cfg["algorithm"]
    _require(agg["sum"] in SUM_MODES, "aggregation.sum", "must be 'float64' or 'fixed_point'")
    _require(agg["where"] in ("server", "workers"), "aggregation.where", "must be 'server' or 'workers'")
    if agg["where"] == "workers":
        _require(agg["sum"] == "fixed_point", "aggregation.where",
                 "workers needs aggregation.sum: fixed_point (a float64 sum would change with the way "
                 "clients are spread over ranks); set aggregation.sum=fixed_point, or aggregation.where=server")
    if agg["sum"] == "fixed_point" or agg["where"] == "workers":
        summed = [name for name, cls in ALGORITHMS.items() if cls.partial_sums]
        key = "aggregation.where" if agg["where"] == "workers" else "aggregation.sum"
        _require(algorithm not in ALGORITHMS or ALGORITHMS[algorithm].partial_sums, key,
                 f"{agg['where'] if key == 'aggregation.where' else agg['sum']} needs an algorithm whose merge "
                 f"is a weighted sum over the clients ({', '.join(summed)}); {algorithm} merges otherwise: "
                 f"set aggregation.sum=float64 and aggregation.where=server")
        _require(cfg["clients"]["per_round"] <= MAX_CONTRIBUTIONS, "aggregation.sum",
                 f"fixed_point sums at most {MAX_CONTRIBUTIONS} (2^20) clients per round in int64; "
                 f"clients.per_round is {cfg['clients']['per_round']}")


def _check_run_control(cfg: dict) -> None:
    """checkpoint, mpi, output."""
    _require(cfg["checkpoint"]["every"] >= 0, "checkpoint.every", "must be >= 0")
    _require(cfg["mpi"]["wait"] in ("sleep", "spin"), "mpi.wait", "must be 'sleep' or 'spin'")
    progress = cfg["output"]["progress"]
    _require(isinstance(progress, bool) or progress == "auto", "output.progress",
             "must be auto, true or false")


def _check_device(cfg: dict) -> None:
    """device: the profiles are loaded (a measured profile file is read and checked)."""
    device = cfg["device"]
    _require(device["torch"] in ("cpu", "cuda"), "device.torch", "must be 'cpu' or 'cuda'")
    load_profile(device["profile"], "device.profile")   # a built-in name, or a valid measured file
    _require(math.isfinite(device["time_constant"]) and device["time_constant"] >= 0, "device.time_constant",
             "must be >= 0 seconds per round (0: no constant beyond the profile's own)")
    _require(all(isinstance(p, str) for p in device["tier_profiles"]), "device.tier_profiles",
             "must be a list of profile names or measured profile paths")
    _require(not device["tier_profiles"] or len(device["tier_profiles"]) == len(cfg["tiers"]["mix"]),
             "device.tier_profiles", f"needs one profile per tier: tiers.mix has {len(cfg['tiers']['mix'])}")
    for i, spec in enumerate(device["tier_profiles"]):
        load_profile(spec, f"device.tier_profiles[{i}]")
    _require(device["sparse_kernels"] in ("off", "auto", "always"), "device.sparse_kernels",
             "must be off, auto (a sparse kernel where the measured profile found it faster) or always")
    if device["kernel_profile"] is not None:
        _require(isinstance(load_profile(device["kernel_profile"], "device.kernel_profile"), MeasuredProfile),
                 "device.kernel_profile", "must be a measured profile (profiles/NAME.yaml from `fedmpi profile`)")
    elif device["sparse_kernels"] == "auto":
        _require(isinstance(load_profile(device["profile"]), MeasuredProfile), "device.sparse_kernels",
                 "auto needs the break-even densities of a measured profile of this machine: set "
                 "device.kernel_profile (or device.profile) to a file written by `fedmpi profile`")


# The order in which the sections are checked (the methods' sections between the two): the first
# failing constraint is the one reported.
CORE_CHECKS = (_check_top_level, _check_clients, _check_data, _check_local, _check_eval, _check_tiers)
RUN_CHECKS = (_check_aggregation, _check_run_control, _check_device)
