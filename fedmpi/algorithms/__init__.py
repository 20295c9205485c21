"""Algorithm registry: config ``algorithm`` name → class."""
from __future__ import annotations

from .base import Algorithm, ClientResult, ClientTask, ModelInfo
from .evaluation import EvalModel, EvalOutcome
from .feddst import FedDST, RandomMask
from .fedavg import FedAvg, FedAvgM, FedProx
from .heterogeneous import DepthFL, FedAvgS, HeteroFL
from .hypemefed import HypeMeFed
from .lotteryfl import LotteryFL
from .prunefl import PruneFL
from .pruning_baselines import SNIP, IterativeMagnitudePruning
from .scalefl import ScaleFL

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedAvgM, FedProx, FedDST, RandomMask, DepthFL, FedAvgS, HeteroFL,
                              HypeMeFed, ScaleFL, PruneFL, SNIP, IterativeMagnitudePruning, LotteryFL)}


def build_algorithm(cfg: dict, info: ModelInfo) -> Algorithm:
    from ..errors import ConfigError

    try:
        cls = ALGORITHMS[cfg["algorithm"]]
    except KeyError:
        raise ConfigError("algorithm", f"'{cfg['algorithm']}' is not available; choose one of "
                          f"{', '.join(ALGORITHMS)}") from None
    return cls(cfg, info)


__all__ = ["ALGORITHMS", "Algorithm", "ClientResult", "ClientTask", "EvalModel", "EvalOutcome", "ModelInfo",
           "build_algorithm"]
