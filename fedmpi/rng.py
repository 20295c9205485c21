"""Every random draw in fedmpi derives from (seed, purpose, round, client) -- never from the rank.

``generator(seed, PURPOSE, round, client)`` returns a fresh numpy Generator; ``torch_seed``
gives an int to seed torch for the same key. Purposes are small fixed integers so that adding
a new purpose never shifts the streams of the existing ones.
"""
import hashlib

import numpy as np

PARTITION = 1
SAMPLING = 2
CLIENT = 3
INIT = 4
SYNTHETIC = 5
SERVER = 6
LOCAL_SPLIT = 7
REGROWTH = 8
EVAL = 9
TIERS = 10
# 11: HypeMeFed's hypernetworks (fedmpi/algorithms/hypernetworks.py). A method's own streams are its
# own: a small constant above these in its module, or ``method_stream(name)``.


def method_stream(name: str) -> int:
    """A purpose key of its own for the method (or plug-in) ``name``: derived from the name, above
    every small constant here, the same on every rank and in every run."""
    return 2**32 + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def seed_sequence(seed: int, *keys: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed), *(int(k) for k in keys)])


def generator(seed: int, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, *keys)))


def torch_seed(seed: int, *keys: int) -> int:
    return int(seed_sequence(seed, *keys).generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def seed_torch_global(seed: int, device="cpu") -> None:
    """``torch.manual_seed(seed)`` for training on ``device``. On CPU only the CPU generator draws,
    so only it is seeded: ``torch.manual_seed`` also queues a seeding of every accelerator backend
    (CUDA, XPU, MTIA), and while they are uninitialised each records a formatted stack trace for
    it, a fraction of a millisecond that the trainer would pay for every client."""
    import torch

    if torch.device(device).type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)
