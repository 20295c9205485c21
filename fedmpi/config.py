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
              "hypemefed", "scalefl")
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
    },
    "eval": {
        "every": 1,
        "batch_size": 1000,    # evaluation chunk size; fixed so results do not depend on the rank count
    },
    "device": {
        "profile": "laptop",   # see fedmpi/timing.py: PROFILES
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
    },
    # ScaleFL (fedmpi/algorithms/scalefl.py): tier t trains depth tiers.levels[t] at width widths[t]
    "scalefl": {"widths": [0.7, 0.75, 1.0], "kd_gamma": 0.05, "kd_temperature": 3.0, "kd_after": 0.25},
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
    _require(cfg["algorithm"] not in TIERED or cfg["model"] == "multiexit_vgg", "model",
             f"algorithm {cfg['algorithm']} trains submodels of a multi-exit family: use model: multiexit_vgg")
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
    _require(cfg["checkpoint"]["every"] >= 0, "checkpoint.every", "must be >= 0")
    _require(cfg["mpi"]["wait"] in ("sleep", "spin"), "mpi.wait", "must be 'sleep' or 'spin'")
    _require(cfg["device"]["torch"] in ("cpu", "cuda"), "device.torch", "must be 'cpu' or 'cuda'")
    progress = cfg["output"]["progress"]
    _require(isinstance(progress, bool) or progress == "auto", "output.progress",
             "must be auto, true or false")
    from .timing import PROFILES  # local import: timing imports nothing from config

    _require(cfg["device"]["profile"] in PROFILES, "device.profile",
             f"unknown profile '{cfg['device']['profile']}'; choose one of {', '.join(PROFILES)}")
    return cfg


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
