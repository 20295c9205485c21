"""The config keys: ``DEFAULTS`` (every key that may appear, its default and so its type) and the
names some keys choose from (algorithms, partitions, optimizers)."""
from __future__ import annotations

from typing import Any

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
        # auto: models fedmpi can train without autograd (the MLP; fedmpi/training/explicit.py)
        # do so, with the same bits; autograd: always through autograd
        "backward": "auto",
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
    # how and where the round's weighted sum over clients runs (docs/performance.md, "Worker-side
    # aggregation"); only algorithms whose merge is such a sum take fixed_point and workers
    "aggregation": {
        "sum": "float64",      # float64: in client-id order | fixed_point: int64 on a per-element grid,
                               # the same bits whatever the grouping
        "where": "server",     # server: rank 0 decodes every upload and merges | workers: each rank
                               # sums its clients, MPI combines the ranks (needs sum: fixed_point)
    },
    "checkpoint": {"every": 0},    # rounds between checkpoints; 0 = only on SIGTERM
    # wait: sleep (wait on MPI without spinning a core) or spin (MPI's own busy-poll);
    # share_data: one rank per node reads the dataset into MPI shared memory for all of them
    "mpi": {"wait": "sleep", "share_data": True},
    "output": {"progress": "auto"},  # auto: a bar on a terminal, quiet in batch logs; true: a line per round
}

# Keys whose value may be one of several types.
UNION_TYPES = {"feddst.r_end": (int,), "output.progress": (str, bool)}
