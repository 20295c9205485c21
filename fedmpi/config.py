"""Config: defaults, YAML loading, ``--set`` overrides and validation.

A config is a nested dict. Every key that may appear is in ``DEFAULTS``; the type of the default
is the type the key must have (``None`` defaults accept a string or null). Validation runs on every
rank before any data is loaded or any MPI message is exchanged, so a bad config exits with status 2
everywhere at once.
"""
from __future__ import annotations

import copy
import difflib
import json
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "feddst", "randommask", "depthfl", "fedavg_s", "heterofl",
              "hypemefed", "scalefl", "prunefl", "snip", "imp", "lotteryfl")
TIERED = ("depthfl", "fedavg_s", "heterofl", "hypemefed", "scalefl")
PARTITIONS = ("iid", "dirichlet", "shards", "natural")
OPTIMIZERS = ("sgd", "adam", "adamw")

DEFAULTS: dict[str, Any] = {
    "experiment": "",          # names the figure set this run belongs to (plots group by it)
    "seed": 0,
    "rounds": 20,
    "algorithm": "fedavg",
    "model": "mnistnet",
    "sparsity": 0.0,           # target fraction of zeros in maskable weights (sparse algorithms)
    "data": {
        "name": "fashion_mnist",
        "root": None,          # None: the dataset's default location (Fashion-MNIST: Debian package)
        "partition": "shards",
        "alpha": 0.5,          # Dirichlet concentration
        "shard_size": 20,
        "shards_per_client": 2,
        # > 0: hold out this fraction of each client's own data as its local test split
        # (HypeMeFed's 80/20); 0: a client's local test set is the global test images of its labels
        "local_test_fraction": 0.0,
        "synthetic": {"alpha": 1.0, "beta": 1.0, "dim": 60, "classes": 10, "test_fraction": 0.2},
    },
    "clients": {"total": 100, "per_round": 10},
    "local": {
        "epochs": 1,
        "batch_size": 32,
        "lr": 0.01,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "optimizer": "sgd",    # sgd | adam | adamw (momentum/nesterov: SGD; betas/eps: Adam, AdamW)
        "nesterov": False,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        # clients of a rank trained at once (fedmpi/training/multi_client.py): the round's sorted
        # clients in consecutive blocks of this many, a block never split across ranks; results
        # are the same as one by one, bit for bit; 1: one by one
        "client_batch": 1,
    },
    "eval": {
        "every": 1,
        "batch_size": 1000,    # evaluation chunk size; fixed so results do not depend on the rank count
    },
    "device": {
        # the device profile behind sim_seconds (docs/timing.md): a built-in name (laptop,
        # raspberry-pi-4, jetson-nano, phone-lte) or a measured profile (profiles/NAME.yaml,
        # written by `fedmpi profile`)
        "profile": "laptop",
        "tier_profiles": [],      # one profile per tier of tiers.mix for that tier's clients; []: profile
        "sparse_kernels": "off",  # off | auto (sparse kernel below the measured break-even) | always
        "kernel_profile": None,   # measured profile whose break-evens auto uses; None: device.profile
        "torch": "cpu",        # "cpu", or "cuda" to put each rank on GPU (local rank modulo GPU count)
    },
    "fedavgm": {"momentum": 0.9, "server_lr": 0.1},   # effective step η/(1−β) = 1, as FedAvg
    "fedprox": {"mu": 0.01},
    "feddst": {
        "alpha": 0.05,             # initial readjustment fraction
        "readjust_every": 5,       # ΔR; with the default 20 rounds (R_end 10) round 5 readjusts
        "r_end": -1,               # readjustment only before this round; -1 means rounds // 2
        "distribution": "erk",     # erk | uniform | erk_public
        "prox_mu": 0.0,            # >0: FedDST+FedProx
        "server_momentum": 0.0,    # >0: FedDST with FedAvgM server momentum
        "server_lr": 1.0,
        "grad_batches": 1,         # local batches used for the regrowth gradient
        "regrow_pruned": True,     # false: growth may not pick a weight pruned in the same readjustment
        # deviations of the public code (bibikar/feddst), off by default; see
        # fedmpi/algorithms/feddst.py. public_code: true sets every one of them (validate writes
        # them out, so the resolved config shows each key).
        "public_code": False,
        "constant_alpha": False,             # readjust the constant α until R_end
        "grow_over_all": False,              # grow the top-|g| over all positions
        "aggregation_weight": "samples",     # samples | batches2 (2 × number of local batches)
        "sample_with_replacement": False,    # draw clients with replacement
        "detached_prox": False,              # inert proximal term: prox_mu has no effect
        "readjust_rule": "paper",            # paper: r % ΔR == 0 | public: (s − 1) % ΔR == 0, s = r − 1
        "server_reprune": "paper",           # paper | public: n − c smallest |w| over the whole tensor
    },
    # heterogeneous clients (depthfl, fedavg_s, heterofl): tier t holds mix[t] of the clients and
    # trains depth levels[t] (multi-exit blocks/exits) or width widths[t] (channel fraction)
    "tiers": {"mix": [1.0, 1.0, 1.0], "levels": [1, 2, 3], "widths": [0.25, 0.5, 1.0]},
    # HypeMeFed (fedmpi/algorithms/hypemefed.py): server-side hypernetworks generate the deeper conv
    # weights of shallow clients; tiers.levels give the depths
    "hypemefed": {
        "hypernetwork": "lrf",     # lrf (low-rank, the paper) | naive (flatten → MLP → flatten)
        "rank": 100,               # SVD rank r, clipped to min(out·k, in·k); 0 = full rank
        "hidden": 512,             # hidden width of the two LRF MLPs
        "naive_hidden": 64,        # hidden width of the naive MLP (the public code's NaiveHyperNetwork)
        "epochs": 25,              # server training epochs per round
        "lr": 0.0005,              # server Adam learning rate
        "aggregation": "samples",  # samples | uniform (the public code's equal weights)
        # the public code's effective behaviour: generated weights are discarded and a client's
        # untrained tensors count as the global values it was sent (fedmpi/algorithms/hypemefed.py)
        "public_generation": False,
    },
    # ScaleFL (fedmpi/algorithms/scalefl.py): tier t trains depth tiers.levels[t] at width widths[t]
    "scalefl": {"widths": [0.7, 0.75, 1.0], "kd_gamma": 0.05, "kd_temperature": 3.0, "kd_after": 0.25},
    # PruneFL (fedmpi/algorithms/prunefl.py): initial pruning at one client (round 1), then
    # masked FedAvg with dense importance uploads and a reconfiguration every ΔR FL rounds.
    # The paper's scale: reconfigure_every 50, ip_interval 500, ip_max_iterations 10000.
    "prunefl": {
        "local_steps": 5,            # local iterations per round (0: local.epochs)
        "initial_pruning": True,     # false: the public code's --no-init-pruning
        "adaptive": True,            # false: --no-adaptive (initial pruning only)
        "reconfigure_every": 5,      # ΔR, in FL rounds
        "max_drop": 0.3,             # d_0: at most this fraction of the active weights is dropped
        "half_life": -1,             # d_r = d_0 · 0.5^(r / half_life), in FL rounds; -1: rounds
        "max_density": 1.0,          # density cap (--max-density); 1: none
        "target_density": -1.0,      # cap falls linearly to this over the run (--target-density); -1: off
        "ip_interval": 50,           # initial pruning: local iterations between reconfigurations
        "ip_threshold": 0.1,         # ... stable when the density changed by at most this (relative)
        "ip_patience": 5,            # ... stop after this many stable reconfigurations in a row
        "ip_max_iterations": 1000,   # ... or after this many iterations
        "time_constant": -1.0,       # c_0 in seconds; -1: from the device profile's time model
        # deviations of the public code (jiangyuang/PruneFL), off by default; public_code: true
        # sets every one of them (see fedmpi/algorithms/prunefl.py)
        "public_code": False,
        "ip_accuracy_factor": 0.0,   # public 1.5: reconfigure once train accuracy >= factor / classes
        "ip_data_batches": 0,        # public 10: initial pruning on a fixed subset of this many batches
        "regrow_value": "zero",      # zero | last (public: a re-activated weight resumes its last value)
        "aggregation_weight": "samples",   # samples | processed (public: samples processed in the round)
    },
    # PruneFL's baselines (fedmpi/algorithms/pruning_baselines.py): SNIP after a dense round 1, and
    # iterative magnitude pruning; density_from: a results file ("{seed}" → the seed) whose final
    # density is the target (the density PruneFL ends with)
    "snip": {"density": 0.1, "density_from": None, "local_steps": 5},
    "imp": {"density": 0.1, "density_from": None, "prunes": 20, "every": -1, "local_steps": 5},
    # LotteryFL (fedmpi/algorithms/lotteryfl.py): personalised masks
    "lotteryfl": {
        "prune_step": 0.2,           # fraction of a client's remaining weights pruned per layer
        "acc_threshold": 0.5,        # prune when the personalised accuracy before training exceeds this
        "target_density": 0.1,       # ... and the client's density is above this
        "local_steps": 0,            # local iterations per round (0: local.epochs)
        "check_samples": 0,          # >0: the pre-training check uses a fixed subset of this many samples
        # deviations of the public code (charleslipku/LotteryFL); public_code: true sets them all
        "public_code": False,
        "overshoot": False,          # the last prune step may go below the target density
        "aggregation": "samples",    # samples | uniform (public)
        "rewind_biases": False,      # rewinding also resets the biases to their initial values
    },
    "checkpoint": {"every": 0},    # rounds between checkpoints; 0 = only on SIGTERM
    "mpi": {"wait": "sleep"},      # sleep: wait on MPI without spinning a core; spin: MPI's own busy-poll
    "output": {"progress": "auto"},  # auto: a bar on a terminal, quiet in batch logs; true: a line per round
}

# Keys whose value may be one of several types.
_UNION_TYPES = {"feddst.r_end": (int,), "output.progress": (str, bool)}


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


_DEFAULT_FLAT = flatten(DEFAULTS)
_SECTIONS = {k.rsplit(".", 1)[0] for k in _DEFAULT_FLAT if "." in k}


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_DEFAULT_FLAT) + sorted(_SECTIONS), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(key, f"unknown key{hint}")


def _merge(base: dict, override: dict, prefix: str = "") -> None:
    for key, value in override.items():
        name = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(name, "keys must be strings")
        if key not in base:
            raise _unknown_key(name)
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(name, f"must be a mapping of settings, got {value!r}")
            _merge(base[key], value, name + ".")
        else:
            base[key] = value


def set_dotted(cfg: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = cfg
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise _unknown_key(".".join(parts[: i + 1]))
        node = node[part]
    if parts[-1] not in node:
        raise _unknown_key(dotted)
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


def _check_type(key: str, value: Any) -> Any:
    default = _DEFAULT_FLAT[key]
    allowed = _UNION_TYPES.get(key)
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


def validate(cfg: dict) -> dict:
    """Type-check every key and the constraints between them; returns cfg (types normalised)."""
    for key in _DEFAULT_FLAT:
        set_dotted(cfg, key, _check_type(key, get_dotted(cfg, key)))
    _require(cfg["rounds"] >= 1, "rounds", "must be at least 1")
    _require(cfg["algorithm"] in ALGORITHMS, "algorithm",
             f"unknown algorithm '{cfg['algorithm']}'; choose one of {', '.join(ALGORITHMS)}")
    _require(0.0 <= cfg["sparsity"] < 1.0, "sparsity", "must be in [0, 1)")
    clients = cfg["clients"]
    _require(clients["total"] >= 1, "clients.total", "must be at least 1")
    _require(clients["per_round"] >= 1, "clients.per_round", "must be at least 1")
    _require(clients["per_round"] <= clients["total"], "clients.per_round",
             f"is {clients['per_round']} but clients.total is only {clients['total']}")
    data = cfg["data"]
    _require(data["partition"] in PARTITIONS, "data.partition",
             f"unknown partition '{data['partition']}'; choose one of {', '.join(PARTITIONS)}")
    _require(data["alpha"] > 0, "data.alpha", "must be > 0")
    _require(data["shard_size"] >= 1, "data.shard_size", "must be at least 1")
    _require(data["shards_per_client"] >= 1, "data.shards_per_client", "must be at least 1")
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
    _require(not local["nesterov"] or (local["optimizer"] == "sgd" and local["momentum"] > 0), "local.nesterov",
             "needs local.optimizer: sgd and local.momentum > 0")
    _require(0 <= data["local_test_fraction"] < 1, "data.local_test_fraction", "must be in [0, 1)")
    _require(cfg["eval"]["every"] >= 0, "eval.every", "must be >= 0 (0: only after the last round)")
    _require(cfg["eval"]["batch_size"] >= 1, "eval.batch_size", "must be at least 1")
    _require(cfg["fedprox"]["mu"] >= 0, "fedprox.mu", "must be >= 0")
    _require(0 <= cfg["fedavgm"]["momentum"] < 1, "fedavgm.momentum", "must be in [0, 1)")
    _require(cfg["fedavgm"]["server_lr"] > 0, "fedavgm.server_lr", "must be > 0")
    dst = cfg["feddst"]
    from .sparsity import DISTRIBUTIONS, READJUST_RULES, readjustment_round, resolve_r_end

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
    hype = cfg["hypemefed"]
    _require(hype["hypernetwork"] in ("lrf", "naive"), "hypemefed.hypernetwork", "must be 'lrf' or 'naive'")
    _require(hype["rank"] >= 0, "hypemefed.rank", "must be >= 0 (0: full rank)")
    for key in ("hidden", "naive_hidden", "epochs"):
        _require(hype[key] >= 1, f"hypemefed.{key}", "must be at least 1")
    _require(hype["lr"] > 0, "hypemefed.lr", "must be > 0")
    _require(hype["aggregation"] in ("samples", "uniform"), "hypemefed.aggregation",
             "must be 'samples' (the paper) or 'uniform' (the public code)")
    scale = cfg["scalefl"]
    _require(len(scale["widths"]) == len(tiers["mix"]) or cfg["algorithm"] != "scalefl", "scalefl.widths",
             f"needs one entry per tier: tiers.mix has {len(tiers['mix'])}")
    _require(all(isinstance(v, (int, float)) and 0 < v <= 1 for v in scale["widths"]), "scalefl.widths",
             "entries must be width rates in (0, 1]")
    _require(scale["kd_gamma"] >= 0, "scalefl.kd_gamma", "must be >= 0")
    _require(scale["kd_temperature"] > 0, "scalefl.kd_temperature", "must be > 0")
    _require(0 <= scale["kd_after"] <= 1, "scalefl.kd_after", "must be a fraction of the rounds in [0, 1]")
    _validate_pruning(cfg)
    _require(cfg["checkpoint"]["every"] >= 0, "checkpoint.every", "must be >= 0")
    _require(cfg["mpi"]["wait"] in ("sleep", "spin"), "mpi.wait", "must be 'sleep' or 'spin'")
    _require(cfg["device"]["torch"] in ("cpu", "cuda"), "device.torch", "must be 'cpu' or 'cuda'")
    progress = cfg["output"]["progress"]
    _require(isinstance(progress, bool) or progress == "auto", "output.progress",
             "must be auto, true or false")
    from .timing import MeasuredProfile, load_profile  # local import: timing imports nothing from config

    device = cfg["device"]
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
    return cfg


def _validate_pruning(cfg: dict) -> None:
    """The prunefl, snip, imp and lotteryfl sections."""
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
    for section in ("snip", "imp"):
        sec = cfg[section]
        _require(0 < sec["density"] <= 1, f"{section}.density", "must be in (0, 1]")
        _require(sec["local_steps"] >= 0, f"{section}.local_steps", "must be >= 0")
    _require(cfg["imp"]["prunes"] >= 1, "imp.prunes", "must be at least 1")
    _require(cfg["imp"]["every"] == -1 or cfg["imp"]["every"] >= 1, "imp.every",
             "must be -1 (rounds / (2 · prunes)) or at least 1")
    lf = cfg["lotteryfl"]
    if lf["public_code"]:
        lf.update({"overshoot": True, "aggregation": "uniform", "rewind_biases": True})
    _require(0 < lf["prune_step"] < 1, "lotteryfl.prune_step", "must be in (0, 1)")
    _require(0 <= lf["acc_threshold"] <= 1, "lotteryfl.acc_threshold", "must be in [0, 1]")
    _require(0 < lf["target_density"] <= 1, "lotteryfl.target_density", "must be in (0, 1]")
    _require(lf["local_steps"] >= 0, "lotteryfl.local_steps", "must be >= 0")
    _require(lf["check_samples"] >= 0, "lotteryfl.check_samples", "must be >= 0 (0: the whole local test set)")
    _require(lf["aggregation"] in ("samples", "uniform"), "lotteryfl.aggregation", "must be 'samples' or 'uniform'")


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
        _merge(cfg, loaded)
    if extra:
        _merge(cfg, extra)
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(cfg, key, value)
    return validate(cfg)


def to_json(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)
