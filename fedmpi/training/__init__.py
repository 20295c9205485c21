"""Local training as parts: optimizer, objective, step hooks, model variants (see trainer.py)."""
from .hooks import SquaredGradientAccumulator, StepHook
from .objectives import LOSSES, bce_onehot, cross_entropy, exit_outputs, weighted_exits
from .optim import OPTIMIZERS, OptimizerSpec
from .trainer import LocalTrainer, variant_key

__all__ = ["LOSSES", "LocalTrainer", "OPTIMIZERS", "OptimizerSpec", "SquaredGradientAccumulator", "StepHook",
           "bce_onehot", "cross_entropy", "exit_outputs", "variant_key", "weighted_exits"]
