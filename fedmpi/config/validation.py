"""Validation of a merged config (``validate``): every key type-checked against its default, then
the constraints of each section in turn, one check function per section (``SECTION_CHECKS``).

The feddst, prunefl and lotteryfl checks also complete their section: with ``public_code: true``
they write out every deviation of that algorithm's public code key by key, so the resolved config
shows each one.
"""
from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .defaults import ALGORITHMS, OPTIMIZERS, PARTITIONS, TIERED, UNION_TYPES
from .keys import DEFAULT_FLAT, get_dotted, set_dotted


def validate(cfg: dict) -> dict:
    """Type-check every key and the constraints between them; returns cfg (types normalised)."""
    for key in DEFAULT_FLAT:
        set_dotted(cfg, key, _check_type(key, get_dotted(cfg, key)))
    for check in SECTION_CHECKS:
        check(cfg)
    return cfg


def _check_type(key: str, value: Any) -> Any:
    default = DEFAULT_FLAT[key]
    allowed = UNION_TYPES.get(key)
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
    _require(0 <= data["local_test_fraction"] < 1, "data.local_test_fraction", "must be in [0, 1)")


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
    _require(cfg["algorithm"] not in TIERED or cfg["model"] in ("multiexit_vgg", "multiexit_vgg_small"), "model",
             f"algorithm {cfg['algorithm']} trains submodels of a multi-exit family: use model: multiexit_vgg "
             f"(or multiexit_vgg_small)")


def _check_aggregation(cfg: dict) -> None:
    """aggregation: fixed_point and workers need an algorithm whose merge is a sum over holders."""
    from ..aggregate import MAX_CONTRIBUTIONS, SUM_MODES

    agg, algorithm = cfg["aggregation"], cfg["algorithm"]
    _require(agg["sum"] in SUM_MODES, "aggregation.sum", "must be 'float64' or 'fixed_point'")
    _require(agg["where"] in ("server", "workers"), "aggregation.where", "must be 'server' or 'workers'")
    if agg["where"] == "workers":
        _require(agg["sum"] == "fixed_point", "aggregation.where",
                 "workers needs aggregation.sum: fixed_point (a float64 sum would change with the way "
                 "clients are spread over ranks); set aggregation.sum=fixed_point, or aggregation.where=server")
    if agg["sum"] == "fixed_point" or agg["where"] == "workers":
        from ..algorithms import ALGORITHMS   # local import: the algorithms import the config module

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
    from ..timing import MeasuredProfile, load_profile  # local import: timing imports nothing from config

    device = cfg["device"]
    _require(device["torch"] in ("cpu", "cuda"), "device.torch", "must be 'cpu' or 'cuda'")
    load_profile(device["profile"], "device.profile")   # a built-in name, or a valid measured file
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


# ---------------------------------------------------------------------------- algorithm sections

def _check_fedprox(cfg: dict) -> None:
    _require(cfg["fedprox"]["mu"] >= 0, "fedprox.mu", "must be >= 0")


def _check_fedavgm(cfg: dict) -> None:
    _require(0 <= cfg["fedavgm"]["momentum"] < 1, "fedavgm.momentum", "must be in [0, 1)")
    _require(cfg["fedavgm"]["server_lr"] > 0, "fedavgm.server_lr", "must be > 0")


def _check_feddst(cfg: dict) -> None:
    from ..sparsity import DISTRIBUTIONS, READJUST_RULES, readjustment_round, resolve_r_end

    dst = cfg["feddst"]
    if dst["public_code"]:   # every deviation of the public code at once, written out key by key
        dst.update({"distribution": "erk_public", "constant_alpha": True, "grow_over_all": True,
                    "aggregation_weight": "batches2", "sample_with_replacement": True,
                    "detached_prox": True, "readjust_rule": "public", "server_reprune": "public"})
    _require(0 <= dst["alpha"] <= 1, "feddst.alpha", "must be in [0, 1]")
    _require(dst["readjust_every"] >= 1, "feddst.readjust_every", "must be at least 1")
    _require(dst["r_end"] >= -1, "feddst.r_end", "must be -1 (rounds // 2) or a round number")
    _require(dst["grad_batches"] >= 1, "feddst.grad_batches", "must be at least 1")
    _require(dst["distribution"] in DISTRIBUTIONS, "feddst.distribution",
             f"unknown distribution '{dst['distribution']}'; choose one of {', '.join(DISTRIBUTIONS)}")
    _require(dst["prox_mu"] >= 0, "feddst.prox_mu", "must be >= 0")
    _require(0 <= dst["server_momentum"] < 1, "feddst.server_momentum", "must be in [0, 1)")
    _require(dst["server_lr"] > 0, "feddst.server_lr", "must be > 0")
    _require(dst["aggregation_weight"] in ("samples", "batches2"), "feddst.aggregation_weight",
             "must be 'samples' (the paper) or 'batches2' (the public code: 2 × local batches)")
    for key in ("readjust_rule", "server_reprune"):
        _require(dst[key] in READJUST_RULES, f"feddst.{key}", "must be 'paper' or 'public'")
    _require(dst["regrow_pruned"] or not dst["grow_over_all"], "feddst.regrow_pruned",
             "false has no effect with feddst.grow_over_all: true (growth ranks every position)")
    if cfg["algorithm"] == "feddst" and cfg["sparsity"] > 0:
        # a FedDST run whose masks never move is RandomMask under another name
        r_end = resolve_r_end(dst["r_end"], cfg["rounds"])
        test = ("(r - 2) % ΔR == 0 and r <= R_end" if dst["readjust_rule"] == "public"
                else "r % ΔR == 0 and r < R_end")
        _require(any(readjustment_round(r, dst["readjust_every"], r_end, dst["readjust_rule"])
                     for r in range(1, min(cfg["rounds"], r_end) + 1)),
                 "feddst.r_end" if r_end <= 1 else "feddst.readjust_every",
                 f"no round readjusts the mask: with rounds {cfg['rounds']}, feddst.readjust_every "
                 f"ΔR = {dst['readjust_every']} and feddst.r_end R_end = {r_end}, {test} never holds. "
                 f"Lower feddst.readjust_every or raise feddst.r_end (or use algorithm: randommask "
                 f"for a static mask)")


def _check_hypemefed(cfg: dict) -> None:
    hype = cfg["hypemefed"]
    _require(hype["hypernetwork"] in ("lrf", "naive"), "hypemefed.hypernetwork", "must be 'lrf' or 'naive'")
    _require(hype["rank"] >= 0, "hypemefed.rank", "must be >= 0 (0: full rank)")
    for key in ("hidden", "naive_hidden", "epochs"):
        _require(hype[key] >= 1, f"hypemefed.{key}", "must be at least 1")
    _require(hype["lr"] > 0, "hypemefed.lr", "must be > 0")
    _require(hype["aggregation"] in ("samples", "uniform"), "hypemefed.aggregation",
             "must be 'samples' (the paper) or 'uniform' (the public code)")


def _check_scalefl(cfg: dict) -> None:
    scale, tiers = cfg["scalefl"], cfg["tiers"]
    _require(len(scale["widths"]) == len(tiers["mix"]) or cfg["algorithm"] != "scalefl", "scalefl.widths",
             f"needs one entry per tier: tiers.mix has {len(tiers['mix'])}")
    _require(all(isinstance(v, (int, float)) and 0 < v <= 1 for v in scale["widths"]), "scalefl.widths",
             "entries must be width rates in (0, 1]")
    _require(scale["kd_gamma"] >= 0, "scalefl.kd_gamma", "must be >= 0")
    _require(scale["kd_temperature"] > 0, "scalefl.kd_temperature", "must be > 0")
    _require(0 <= scale["kd_after"] <= 1, "scalefl.kd_after", "must be a fraction of the rounds in [0, 1]")


def _check_prunefl(cfg: dict) -> None:
    pf = cfg["prunefl"]
    if pf["public_code"]:   # every deviation of the public code at once, written out key by key
        pf.update({"ip_accuracy_factor": 1.5, "ip_data_batches": 10, "regrow_value": "last",
                   "aggregation_weight": "processed"})
    for key in ("local_steps", "ip_data_batches"):
        _require(pf[key] >= 0, f"prunefl.{key}", "must be >= 0")
    for key in ("reconfigure_every", "ip_interval", "ip_patience", "ip_max_iterations"):
        _require(pf[key] >= 1, f"prunefl.{key}", "must be at least 1")
    _require(0 <= pf["max_drop"] <= 1, "prunefl.max_drop", "must be in [0, 1]")
    _require(pf["half_life"] == -1 or pf["half_life"] >= 1, "prunefl.half_life", "must be -1 (rounds) or >= 1")
    _require(0 < pf["max_density"] <= 1, "prunefl.max_density", "must be in (0, 1] (1: no cap)")
    _require(pf["target_density"] == -1 or 0 < pf["target_density"] <= pf["max_density"],
             "prunefl.target_density", "must be -1 (off) or in (0, prunefl.max_density]")
    _require(pf["ip_threshold"] >= 0, "prunefl.ip_threshold", "must be >= 0")
    _require(pf["ip_accuracy_factor"] >= 0, "prunefl.ip_accuracy_factor", "must be >= 0 (0: off)")
    _require(pf["time_constant"] == -1 or pf["time_constant"] >= 0, "prunefl.time_constant",
             "must be -1 (the device profile's) or >= 0 seconds")
    _require(pf["regrow_value"] in ("zero", "last"), "prunefl.regrow_value", "must be 'zero' or 'last'")
    _require(pf["aggregation_weight"] in ("samples", "processed"), "prunefl.aggregation_weight",
             "must be 'samples' or 'processed' (the public code: samples processed in the round)")
    if cfg["algorithm"] == "prunefl" and pf["adaptive"]:
        fl_rounds = cfg["rounds"] - (1 if pf["initial_pruning"] else 0)
        _require(fl_rounds >= pf["reconfigure_every"], "prunefl.reconfigure_every",
                 f"no FL round reconfigures: {fl_rounds} FL rounds"
                 f"{' after the initial-pruning round 1' if pf['initial_pruning'] else ''} and "
                 f"ΔR = {pf['reconfigure_every']}; lower it or set prunefl.adaptive: false")


def _check_pruning_baseline(cfg: dict, section: str) -> None:
    """What the snip and imp sections share."""
    sec = cfg[section]
    _require(0 < sec["density"] <= 1, f"{section}.density", "must be in (0, 1]")
    _require(sec["local_steps"] >= 0, f"{section}.local_steps", "must be >= 0")


def _check_snip(cfg: dict) -> None:
    _check_pruning_baseline(cfg, "snip")


def _check_imp(cfg: dict) -> None:
    _check_pruning_baseline(cfg, "imp")
    _require(cfg["imp"]["prunes"] >= 1, "imp.prunes", "must be at least 1")
    _require(cfg["imp"]["every"] == -1 or cfg["imp"]["every"] >= 1, "imp.every",
             "must be -1 (rounds / (2 · prunes)) or at least 1")


def _check_lotteryfl(cfg: dict) -> None:
    lf = cfg["lotteryfl"]
    if lf["public_code"]:   # every deviation of the public code at once, written out key by key
        lf.update({"overshoot": True, "aggregation": "uniform", "rewind_biases": True})
    _require(0 < lf["prune_step"] < 1, "lotteryfl.prune_step", "must be in (0, 1)")
    _require(0 <= lf["acc_threshold"] <= 1, "lotteryfl.acc_threshold", "must be in [0, 1]")
    _require(0 < lf["target_density"] <= 1, "lotteryfl.target_density", "must be in (0, 1]")
    _require(lf["local_steps"] >= 0, "lotteryfl.local_steps", "must be >= 0")
    _require(lf["check_samples"] >= 0, "lotteryfl.check_samples", "must be >= 0 (0: the whole local test set)")
    _require(lf["aggregation"] in ("samples", "uniform"), "lotteryfl.aggregation", "must be 'samples' or 'uniform'")


# The order in which the sections are checked: the first failing constraint is the one reported.
SECTION_CHECKS = (
    _check_top_level, _check_clients, _check_data, _check_local, _check_eval,
    _check_fedprox, _check_fedavgm, _check_feddst, _check_tiers, _check_hypemefed, _check_scalefl,
    _check_prunefl, _check_snip, _check_imp, _check_lotteryfl, _check_aggregation,
    _check_run_control, _check_device,
)
