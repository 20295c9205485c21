"""Every method's evaluation sees the model its clients trained. For every built-in algorithm, a
short run in this process with the server's merge and the evaluator watched: per round, the model
the evaluator got is compared, element by element, with the aggregate of what the round's clients
uploaded, recomputed here from their decoded uploads (per element the sample-weighted mean over
the clients that sent it), and the round's ``density`` and ``active_params`` with that model.
PruneFL reconfigures after every FL round but the last, SNIP and IMP prune within the run: a step
that changes the model between the merge and the evaluation fails here."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml

from helpers import TIERED, TINY, read_results, write_idx

from fedmpi.algorithms import ALGORITHMS
from fedmpi.algorithms.prunefl import IMPORTANCE
from fedmpi.cli import main
from fedmpi.engine.evaluation import Evaluator
from fedmpi.engine.server import Server
from fedmpi.models import build_model, maskable_parameter_names

BUILTIN = sorted(name for name in ALGORITHMS if ALGORITHMS.origin(name).source == "builtin")

# what each method needs for its model-changing steps to happen within the run (every other
# method runs TINY, or TIERED when it is tiered, as they are)
SETTINGS = {
    # initial pruning in round 1, then FL rounds 1–3: reconfigurations after FL rounds 1 and 2
    "prunefl": {"rounds": 4, "prunefl": {"local_steps": 5, "reconfigure_every": 1, "ip_interval": 10,
                                         "ip_max_iterations": 40, "ip_patience": 2, "time_constant": 0.05}},
    "snip": {"snip": {"density": 0.3}},                                  # the mask after round 1
    "imp": {"imp": {"density": 0.3, "prunes": 2, "every": 1}},           # prunes after rounds 1 and 2
    "feddst": {"sparsity": 0.5, "feddst": {"readjust_every": 1, "r_end": 3}},   # readjusts in rounds 1, 2
    "randommask": {"sparsity": 0.5},
    "lotteryfl": {"lotteryfl": {"acc_threshold": 0.0, "local_steps": 5}},       # every client prunes
}

# methods whose round model is more than the mean of the uploads, each for a reason of its own
# (the server step is part of forming the round's model, as its paper and code define it)
REPRUNED = {"feddst", "randommask"}   # the merge is re-pruned back to the layer densities: an
                                      # element is the mean of its holders or 0
GENERATED = {"hypemefed"}             # conv weights a shallow client did not train are generated
                                      # by the server's hypernetworks before the mean: only the
                                      # tensors every client of the round trained are checked
MOMENTUM = {"fedavgm"}                # θ ← θ − η·v, v ← β·v + (θ − mean): the server's optimizer step
UNWEIGHTED = {"heterofl"}             # the authors' plain mean over the clients that sent an element
QUERIED_BN = {"heterofl"}             # static BN: the evaluated model's BN statistics are queried on
                                      # the server from training data (test_heterofl_complete checks
                                      # them), never uploaded


def snapshot(arrays) -> dict:
    return {n: np.array(a) for n, a in (arrays or {}).items()}


def watch(monkeypatch) -> list[dict]:
    """Per round: the server's model before the merge, each client's decoded upload and sample
    count, and every model the evaluator was asked for (copies, taken when they were handed over)."""
    seen: list[dict] = []
    merge, evaluate = Server._merge, Evaluator.run

    def watched_merge(self, round_, results, sums):
        assert sums is None and all(r.update is not None for r in results)
        seen.append({"round": round_, "start": snapshot(self.algorithm.global_weights()),
                     "uploads": [(r.client_id, r.num_samples, snapshot(r.update.values),
                                  snapshot(r.update.masks), dict(r.update.slices)) for r in results]})
        return merge(self, round_, results, sums)

    def watched_evaluate(self, models):
        if models is not None:   # the server's call (P = 1: every call)
            seen[-1]["evaluated"] = {m.key: (snapshot(m.weights), snapshot(m.masks)) for m in models}
        return evaluate(self, models)

    monkeypatch.setattr(Server, "_merge", watched_merge)
    monkeypatch.setattr(Evaluator, "run", watched_evaluate)
    return seen


def config_for(name: str, tmp_path) -> dict:
    if ALGORITHMS[name].tiered:
        cfg = copy.deepcopy(TIERED)
        cfg["data"]["root"] = str(write_idx(tmp_path / "mnist", n_train=90, n_test=30))
        cfg["clients"] = {"total": 6, "per_round": 3}
    else:
        cfg = copy.deepcopy(TINY)
    cfg.update(copy.deepcopy(SETTINGS.get(name, {})), algorithm=name)
    return cfg


def maskable_names(cfg: dict) -> list[str]:
    shape = (60,) if cfg["model"] == "mlp" else (1, 28, 28)   # synthetic data / the MNIST files
    return maskable_parameter_names(build_model(cfg["model"], shape, 10))


def holders_mean(uploads, tensor: str, shape: tuple, weighted: bool = True):
    """(Σ_k n_k·θ_k / Σ_k n_k over the clients k that sent each element, Σ_k n_k, the number of
    clients that sent the tensor): an element is sent where the upload holds the tensor, inside
    its block (width slices) and its mask."""
    numerator, votes, senders = np.zeros(shape), np.zeros(shape), 0
    for _, samples, values, masks, slices in uploads:
        if tensor not in values:
            continue
        samples = samples if weighted else 1
        senders += 1
        region = tuple(slice(a, b) for a, b in slices[tensor]) if tensor in slices else ()
        held = masks[tensor] if tensor in masks else np.ones(np.shape(values[tensor]), bool)
        numerator[region] += samples * np.where(held, values[tensor], 0.0)
        votes[region] += samples * held
    with np.errstate(invalid="ignore", divide="ignore"):
        return numerator / votes, votes, senders


def check_round(name: str, record: dict, velocity: dict) -> list[str]:
    """Where the evaluated global model is not the aggregate of the round's uploads."""
    evaluated, _ = record["evaluated"]["global"]
    problems = []
    for tensor, value in evaluated.items():
        start = record["start"][tensor]
        if name in QUERIED_BN and tensor.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            continue
        mean, votes, senders = holders_mean(record["uploads"], tensor, start.shape, weighted=name not in UNWEIGHTED)
        if name in GENERATED and value.ndim == 4 and senders < len(record["uploads"]):
            continue
        expected = mean
        if name in MOMENTUM:
            beta, eta = (ALGORITHMS[name].defaults[k] for k in ("momentum", "server_lr"))   # the run's
            velocity[tensor] = beta * velocity.get(tensor, 0.0) + (start.astype(np.float64) - mean)
            expected = start - eta * velocity[tensor]
        held = votes > 0
        tolerance = 0.5 if np.issubdtype(value.dtype, np.integer) else 1e-6 + 1e-5 * np.abs(expected)
        close = np.abs(value - np.where(held, expected, 0.0)) <= tolerance
        if name in REPRUNED:
            close |= value == 0
        # an element nobody sent keeps the server's value, or is 0 (outside the global mask)
        ok = np.where(held, close, (value == start) | (value == 0))
        if not ok.all():
            where = np.flatnonzero(~ok.reshape(-1))
            problems.append(f"round {record['round']} {tensor}: {where.size} of {value.size} elements differ, "
                            f"e.g. evaluated {value.reshape(-1)[where[0]]!r}, the uploads' mean "
                            f"{np.asarray(expected).reshape(-1)[where[0]]!r}")
    return problems


def check_columns(record: dict, row: dict, maskable: list[str], masked_fedavg: bool) -> list[str]:
    """``density`` (and ``active_params``) of the round's row against the evaluated model: the
    clients' shared mask where they all trained one, else its nonzero fraction."""
    evaluated, _ = record["evaluated"]["global"]
    uploads = record["uploads"]
    masks = [u[3] for u in uploads]
    dense_size = sum(v.size for n, v in evaluated.items() if n not in maskable)
    if all(m and set(m) == set(masks[0]) and all(np.array_equal(m[n], masks[0][n]) for n in m) for m in masks):
        kept = sum(int(np.count_nonzero(m)) for m in masks[0].values())
        density = kept / sum(m.size for m in masks[0].values())
    elif not any(masks):
        kept = sum(int(np.count_nonzero(evaluated[n])) for n in maskable)
        density = kept / sum(evaluated[n].size for n in maskable)
        kept = sum(evaluated[n].size for n in maskable) if masked_fedavg else kept   # no mask: all active
    else:
        return []   # the clients' masks differ (FedDST after a readjustment, LotteryFL)
    problems = []
    if row["density"] != pytest.approx(density, rel=1e-12):
        problems.append(f"round {record['round']}: density {row['density']}, evaluated model's {density}")
    if masked_fedavg and "active_params" in row and row["active_params"] != kept + dense_size:
        problems.append(f"round {record['round']}: active_params {row['active_params']}, evaluated model's "
                        f"{kept + dense_size}")
    return problems


@pytest.mark.parametrize("name", BUILTIN)
def test_the_evaluated_model_is_the_aggregate_of_the_rounds_uploads(name, tmp_path, monkeypatch):
    from fedmpi.algorithms.lotteryfl import LotteryFL
    from fedmpi.algorithms.masked_fedavg import MaskedFedAvg

    cfg = config_for(name, tmp_path)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    seen = watch(monkeypatch)
    out = tmp_path / "run.h5"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    results = read_results(out)
    rounds = results["rounds"]
    assert [r["round"] for r in seen] == list(range(1, cfg["rounds"] + 1))
    assert all("evaluated" in r for r in seen)
    cls = ALGORITHMS[name]
    maskable = maskable_names(cfg)
    problems, velocity = [], {}
    for i, record in enumerate(seen):
        problems += check_round(name, record, velocity)
        if not issubclass(cls, LotteryFL):   # its density is the clients' mean mask density
            row = {k: v[i] for k, v in rounds.items()}
            problems += check_columns(record, row, maskable, issubclass(cls, MaskedFedAvg))
    assert not problems, f"{name}: the evaluated model is not what the clients trained:\n" + "\n".join(problems)
    if name == "prunefl":   # the run covers what it claims: reconfigurations that a round trained
        assert list(rounds["reconfigured"]) == [0, 1, 1, 0]
        # no importance upload in the last round: no reconfiguration follows it (upload: the values
        # under the mask the clients hold, 4 bytes each, nothing else)
        assert [any(IMPORTANCE in u[2] for u in r["uploads"]) for r in seen] == [False, True, True, False]
        last = results["clients"]["round"] == 4
        assert np.all(results["clients"]["upload_bytes"][last] == 4 * rounds["active_params"][3])
        assert not all(np.array_equal(a, b) for a, b in zip(seen[2]["uploads"][0][3].values(),
                                                              seen[1]["uploads"][0][3].values()))
    if name == "lotteryfl":   # each personalised model: the global weights under the mask the client uploaded last
        uploaded = {}
        for record in seen:
            uploaded.update({u[0]: u[3] for u in record["uploads"]})
            personal = {k: v for k, v in record["evaluated"].items() if k != "global"}
            assert personal and set(personal) == {f"client{c}" for c, m in uploaded.items() if m}
            for key, (weights, masks) in personal.items():
                mine = uploaded[int(key.removeprefix("client"))]
                assert set(masks) == set(mine) and all(np.array_equal(masks[n], mine[n]) for n in mine)
                assert all(np.array_equal(weights[n], record["evaluated"]["global"][0][n]) for n in weights)


def test_kept_chunk_results_own_their_memory():
    """The evaluator keeps every chunk's per-sample results until all models are evaluated
    (LotteryFL: 400 personalised models). They must be numpy copies, not views of torch's
    buffers: kept views pinned small blocks between the chunks' large temporaries, and the heap
    grew with every model (fedmpi/engine/evaluation.py ``_evaluate_chunk``)."""
    from types import SimpleNamespace

    import torch

    from fedmpi.engine.evaluation import SampleSet

    x, y = torch.randn(10, 3), torch.tensor([0, 1] * 5)
    evaluator = Evaluator(None, SimpleNamespace(device="cpu"), {"test": (x, y)},
                          SimpleNamespace(local_test_in_train=False), chunk=4)
    network = torch.nn.Linear(3, 2)
    with torch.no_grad():
        correct, losses = evaluator._evaluate_chunk(network, SampleSet("test", None), 4)
    assert len(losses) == 4 and all(len(c) == 4 for c in correct)
    assert losses.flags.owndata and all(c.flags.owndata for c in correct)
    assert losses.tolist() == pytest.approx(torch.nn.functional.cross_entropy(
        network(x[4:8]), y[4:8], reduction="none").tolist())
