"""fedmpi's fixed start-up cost, stage by stage, on every rank (``make bench-perf`` runs it).

Run as fedmpi runs (``python bench/perf/startup.py`` for P = 1, ``mpiexec -n P python
bench/perf/startup.py`` otherwise) with ``FEDMPI_PERF_T0`` set to the launcher's ``time.time()``
just before it started the command. Each rank does what ``python -m fedmpi run`` does before round
1, in order, timing each stage:

    launch       mpiexec + Python interpreter start, until this script's first line
    imports      numpy, torch, and fedmpi's modules (the CLI's import chain)
    mpi          MPI_Init and a first barrier (every rank up)
    data         reading and normalising the dataset (``load_dataset``; for P > 1 once per node
                 into shared memory, as ``mpi.share_data: true`` does, unless --no-share-data)
    partition    the federated partition (``partition_dataset``)
    model        model, initial weights, trainer and algorithm (the rest of ``build_context``,
                 which this script calls as ``Run.setup`` does, marking the stages above inside)
    lazy imports what round 1 pays on first use, measured as one local step of a two-sample
                 client through fedmpi's trainer (a ``torch.optim`` optimizer's first step would
                 import ``torch._dynamo`` here, seconds; fedmpi's own SGD does not)

Rank 0 prints one JSON line: per stage the slowest rank's seconds, and ``total`` (launch to the
end of the last stage, slowest rank); and the memory the ranks hold then (Linux): ``node_pss_mib``,
the sum of their proportional set sizes (shared pages counted once over the ranks that map them:
what the P ranks take from the node together), and ``max_rss_mib``, the largest resident set.

    FEDMPI_PERF_T0=$(python -c 'import time; print(time.time())') \
        python bench/perf/startup.py overhead [--no-share-data]
"""
import os
import sys
import time

T_SCRIPT = time.time()
T_LAUNCH = float(os.environ.get("FEDMPI_PERF_T0", T_SCRIPT))

import json  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def memory_mib() -> dict:
    """This process's resident and proportional set sizes (MiB), from /proc (Linux), else {}."""
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return {}
    kib = {line.split()[0].rstrip(":"): int(line.split()[1]) for line in rollup[1:] if line.split()[-1] == "kB"}
    return {"rss": kib["Rss"] / 1024, "pss": kib["Pss"] / 1024}


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    workload = args[0] if args else "overhead"
    share_data = "--no-share-data" not in sys.argv
    marks = [("launch", T_SCRIPT)]

    import numpy  # noqa: F401
    import torch  # noqa: F401

    import fedmpi.cli  # noqa: F401
    import fedmpi.engine  # noqa: F401
    from fedmpi.comm.transport import Communicator
    marks.append(("imports", time.time()))

    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    comm.Barrier()
    marks.append(("mpi", time.time()))

    from fedmpi.config import load_config
    from fedmpi.engine.context import build_context
    from workloads import fedmpi_config

    cfg = load_config(None, extra=fedmpi_config(workload, "fedavg", 1))
    fedmpi_comm = Communicator(comm)
    load_once = fedmpi_comm.load_once_per_node if comm.Get_size() > 1 and share_data else None
    # as ``Run.setup`` does; the data and partition stages end inside (``initial.build_initial``)
    ctx = build_context(cfg, load_once, mark=lambda stage: marks.append((stage, time.time())))
    marks.append(("model", time.time()))
    # round 1's first-use costs: one client of two samples through the trainer (a torch.optim
    # optimizer would import torch._dynamo here; fedmpi's own SGD does not)
    x, y = ctx.train[0][:2], ctx.train[1][:2]
    ctx.trainer.train(ctx.initial_weights, x, y, seed=0, round_=1, client_id=0)
    marks.append(("lazy imports", time.time()))

    durations = {name: end - (marks[i - 1][1] if i else T_LAUNCH) for i, (name, end) in enumerate(marks)}
    durations["total"] = marks[-1][1] - T_LAUNCH
    gathered = comm.gather((durations, memory_mib()), root=0)
    if comm.Get_rank() == 0:
        slowest = {k: max(d[k] for d, _ in gathered) for k in durations}
        memory = {}
        if all(m for _, m in gathered):
            memory = {"node_pss_mib": sum(m["pss"] for _, m in gathered),
                      "max_rss_mib": max(m["rss"] for _, m in gathered)}
        print(json.dumps({"ranks": comm.Get_size(), "workload": workload, "share_data": share_data,
                          "stages": slowest, "memory": memory}))
    fedmpi_comm.release_shared()
    return 0


if __name__ == "__main__":
    sys.exit(main())
