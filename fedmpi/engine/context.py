"""What every rank builds before round 1 from the config alone: data, partition and initial model
(``initial.build_initial``), the model's schema, the local trainer, the algorithm. Identical on
every rank. The only MPI here is optional and passed in: ``load_once``
(``Communicator.load_once_per_node``) reads the dataset on one rank per node into shared memory."""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..algorithms import Algorithm, ModelInfo, build_algorithm
from ..algorithms.base import TrainData
from ..errors import ConfigError
from ..models import maskable_parameter_names
from ..models.flops import model_layer_flops
from ..timing import RunTiming
from ..training import LocalTrainer


@dataclass
class RunContext:
    cfg: dict
    partition: object
    sizes: dict[int, int]                 # client → training samples
    info: ModelInfo
    initial_weights: dict[str, np.ndarray]
    trainer: LocalTrainer
    algorithm: Algorithm
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    profile: RunTiming                    # each client's device profile and round-time model


def torch_device(cfg: dict) -> str:
    if cfg["device"]["torch"] == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("device.torch", "is 'cuda' but torch sees no GPU on this node")
    override = os.environ.get("FEDMPI_DEVICE")
    if override:
        return override
    local_rank = next((int(os.environ[v]) for v in ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK",
                                                    "SLURM_LOCALID") if v in os.environ), 0)
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def build_context(cfg: dict, load_once=None, mark=None) -> RunContext:
    """``load_once(load)``, when given, runs ``load`` (the dataset) once per node and shares it;
    ``mark(stage)`` is called as the data and partition stages end (``initial.build_initial``)."""
    from ..initial import build_initial

    torch.set_num_threads(1)
    initial = build_initial(cfg, load_once, mark)
    dataset, partition, model = initial.dataset, initial.partition, initial.model
    shapes = {n: tuple(w.shape) for n, w in initial.weights.items()}
    info = ModelInfo(shapes, maskable_parameter_names(model), model_layer_flops(cfg["model"], model, dataset.input_shape),
                     num_clients=partition.num_clients, model=cfg["model"],
                     input_shape=tuple(dataset.input_shape), num_classes=dataset.num_classes,
                     local_test_sizes=tuple(len(i) for i in partition.test_indices))
    timing = RunTiming.from_config(cfg, info)
    with warnings.catch_warnings():
        # shared data is read-only on purpose: torch warns that it cannot mark the tensors so
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        train = (torch.from_numpy(dataset.x_train), torch.from_numpy(dataset.y_train))
        test = (torch.from_numpy(dataset.x_test), torch.from_numpy(dataset.y_test))
    device = torch_device(cfg)
    trainer = LocalTrainer(model, cfg["local"], device, build_variant=initial.builder,
                           sparse_kernels=timing.kernel_policy())
    algorithm = build_algorithm(cfg, info)
    if algorithm.needs_train_data:   # views of the arrays every rank holds, not copies
        algorithm.train_data = TrainData(train[0], train[1], partition.train_indices, device)
    return RunContext(
        cfg=cfg, partition=partition,
        sizes={c: len(idx) for c, idx in enumerate(partition.train_indices)},
        info=info,
        initial_weights=initial.weights,
        trainer=trainer,
        algorithm=algorithm,
        train=train,
        test=test,
        profile=timing,
    )
