"""PruneFL and its baselines (SNIP, iterative magnitude pruning): the greedy reconfiguration
against brute force, a hand-made reconfiguration, the importance formula, the initial-pruning
round, exact importance bytes, rank-count invariance (P = 1, 2, 4) and SIGKILL + --resume."""
from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
import yaml

from helpers import (PRUNEFL, assert_all_columns_identical, fedmpi, needs_mpiexec, read_results, same_bits,
                     sigkill_and_resume)

from fedmpi import rng
from fedmpi.algorithms import ModelInfo, build_algorithm
from fedmpi.algorithms.prunefl import IMPORTANCE
from fedmpi.algorithms.prunefl_reconfiguration import (RoundTimeModel, apply_new_masks, gamma, greedy_count,
                                                       reconfigure, round_time_model)
from fedmpi.comm.codec import HEADER_BYTES_PER_TENSOR, mask_bytes
from fedmpi.config import load_config
from fedmpi.errors import ConfigError
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops
from fedmpi.training import LocalTrainer
from fedmpi.training.hooks import SummedGradientSquared

PF = PRUNEFL


def mlp_info():
    model = build_model("mlp", (60,), 10)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    info = ModelInfo(shapes, maskable_parameter_names(model), layer_flops(model, (60,)), num_clients=8,
                     model="mlp", input_shape=(60,), num_classes=10)
    return model, info


def n_params(info) -> int:
    return sum(math.prod(s) for s in info.shapes.values())


# ------------------------------------------------------------------------------ the importance hook
def test_summed_gradient_squared_is_the_square_of_the_summed_gradients_times_samples():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    params = dict(model.named_parameters())
    hook = SummedGradientSquared(params)
    grads, samples = [], 0
    for step, batch in enumerate((5, 5, 2)):
        x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        hook.after_backward(params, batch)
        grads.append({n: p.grad.detach().double().clone() for n, p in params.items()})
        samples += batch
    result = hook.result()
    for name in params:
        summed = sum(g[name] for g in grads)
        np.testing.assert_allclose(result[name], (summed ** 2 * samples).numpy(), rtol=1e-5)
        per_step = sum(g[name] ** 2 for g in grads).numpy()
        assert not np.allclose(result[name], per_step * samples)   # not Σ g² (the other hook)


# ------------------------------------------------------------------------------ reconfiguration
def brute_force_best(kept, importance, candidates, time_model, dense_importance):
    """max Γ over every subset of the candidates (kept weights always in)."""
    best = -1.0
    for size in range(len(candidates) + 1):
        for subset in itertools.combinations(candidates, size):
            masks = {n: k.copy() for n, k in kept.items()}
            for name, i in subset:
                masks[name].reshape(-1)[i] = True
            best = max(best, gamma(masks, importance, time_model, dense_importance))
    return best


@pytest.mark.parametrize("seed", range(8))
def test_greedy_reconfiguration_maximises_gamma_like_brute_force(seed):
    g = np.random.default_rng(seed)
    shapes = {"a": (3, 2), "b": (5,)}
    weights = {n: g.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    masks = {n: g.random(s) < 0.7 for n, s in shapes.items()}
    importance = {n: g.exponential(size=s) ** 2 for n, s in shapes.items()}
    time_model = RoundTimeModel(c0=float(g.uniform(0.5, 3)),
                                t={"a": float(g.uniform(0.2, 2)), "b": float(g.uniform(0.2, 2))})
    dense = float(g.uniform(0, 2))
    result = reconfigure(weights, masks, importance, 0.3, time_model, dense_importance=dense)
    kept = {n: np.zeros(s, bool) for n, s in shapes.items()}
    for name in shapes:   # kept by magnitude: the result holds them, and nothing else was forced
        active = np.flatnonzero(masks[name].reshape(-1))
        keep = len(active) - int(0.3 * len(active))
        order = active[np.argsort(-np.abs(weights[name].reshape(-1)[active]), kind="stable")][:keep]
        kept[name].reshape(-1)[order] = True
        assert np.all(result.masks[name][kept[name]])
        assert result.kept[name] == keep
    candidates = [(n, i) for n in shapes for i in np.flatnonzero(~kept[n].reshape(-1))]
    best = brute_force_best(kept, importance, candidates, time_model, dense)
    achieved = gamma(result.masks, importance, time_model, dense)
    assert achieved == pytest.approx(best, rel=1e-12)
    assert result.objective == pytest.approx(achieved, rel=1e-12)


def test_greedy_count_stops_at_the_first_candidate_below_the_running_ratio():
    # ratios 8, 6, 4, 1 against a running ratio that starts at 4/4.5
    assert greedy_count(4.0, 4.5, np.array([8.0, 3.0, 2.0, 0.5]), np.array([1.0, 0.5, 0.5, 0.5])) == 3
    assert greedy_count(4.0, 4.5, np.array([8.0, 3.0]), np.array([1.0, 0.5]), limit=1) == 1
    assert greedy_count(1.0, 1.0, np.array([0.5]), np.array([1.0])) == 0
    assert greedy_count(1.0, 1.0, np.zeros(0), np.zeros(0)) == 0


def hand_made():
    weights = {"a": np.array([5, 4, 3, 2, 1, 0], np.float32), "b": np.array([1, 0, 0, 0], np.float32)}
    masks = {"a": np.array([1, 1, 1, 1, 1, 0], bool), "b": np.array([1, 0, 0, 0], bool)}
    importance = {"a": np.array([1, 1, 1, 8, 0.1, 6]), "b": np.array([1, 3, 0.5, 2])}
    return weights, masks, importance, RoundTimeModel(1.0, {"a": 1.0, "b": 0.5})


def test_hand_made_reconfiguration_masks_densities_and_weights():
    """a: 5 active, d = 0.4 drops ⌊2⌋ → keep |w| 5, 4, 3; b: 1 active, keeps it. num = 3 + 1 = 4,
    den = 1 + 3·1 + 1·0.5 = 4.5. Candidates by G/t: a3 8, a5 6, b1 6, b3 4, b2 1, a4 0.1; the
    greedy adds a3 (→ 12/5.5), a5 (→ 18/6.5), b1 (→ 21/7), b3 (→ 23/7.5) and stops at b2 (1 < 3.07)."""
    weights, masks, importance, time_model = hand_made()
    result = reconfigure(weights, masks, importance, 0.4, time_model)
    np.testing.assert_array_equal(result.masks["a"], [1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(result.masks["b"], [1, 1, 0, 1])
    assert result.kept == {"a": 3, "b": 1} and result.added == {"a": 2, "b": 2}
    assert result.objective == pytest.approx(23 / 7.5)
    assert {n: m.mean() for n, m in result.masks.items()} == {"a": 5 / 6, "b": 3 / 4}
    new = apply_new_masks(weights, masks, result.masks)
    # a3 was active, dropped by magnitude and re-added: it keeps its value; a4 dropped → 0;
    # a5 and b1, b3 newly active → 0
    np.testing.assert_array_equal(new["a"], [5, 4, 3, 2, 0, 0])
    np.testing.assert_array_equal(new["b"], [1, 0, 0, 0])
    last = {"a": np.array([9, 9, 9, 9, 9, 7], np.float32), "b": np.array([9, 5, 9, 6], np.float32)}
    public = apply_new_masks(weights, masks, result.masks, last)   # regrow_value: last
    np.testing.assert_array_equal(public["a"], [5, 4, 3, 2, 0, 7])
    np.testing.assert_array_equal(public["b"], [1, 5, 0, 6])


def test_density_cap_stops_the_greedy():
    weights, masks, importance, time_model = hand_made()
    result = reconfigure(weights, masks, importance, 0.4, time_model, max_active=6)   # 4 kept + 2
    np.testing.assert_array_equal(result.masks["a"], [1, 1, 1, 1, 0, 1])
    np.testing.assert_array_equal(result.masks["b"], [1, 0, 0, 0])


def test_time_model_comes_from_fedmpi_timing_and_time_constant_replaces_c0():
    from fedmpi.timing import RunTiming

    _, info = mlp_info()
    cfg = load_config(None, extra=copy.deepcopy(PF), overrides=["prunefl.time_constant=-1"])
    # adaptive pruning: the FL rounds' clients compute every weight's gradient, and Γ's model says so
    model = RunTiming.from_config(cfg, info).time_model(None, steps_per_round=5, batch_size=16,
                                                        dense_weight_gradients=True)
    ours = round_time_model(cfg, info, 5)
    assert ours.c0 == model.c0 and dict(ours.t) == model.t
    cfg["prunefl"]["time_constant"] = 0.25
    assert round_time_model(cfg, info, 5).c0 == 0.25


# ------------------------------------------------------------------------------ config
def test_public_code_sets_every_deviation_and_defaults_are_the_paper():
    cfg = load_config(None, extra=copy.deepcopy(PF))
    # ip_data_batches: the authors' IP_DATA_BATCH = 10 is the default (configs/femnist.py, cifar10.py)
    assert (cfg["prunefl"]["ip_accuracy_factor"], cfg["prunefl"]["ip_data_batches"], cfg["prunefl"]["regrow_value"],
            cfg["prunefl"]["aggregation_weight"]) == (0.0, 10, "zero", "samples")
    cfg = load_config(None, extra=copy.deepcopy(PF), overrides=["prunefl.public_code=true"])
    assert (cfg["prunefl"]["ip_accuracy_factor"], cfg["prunefl"]["ip_data_batches"], cfg["prunefl"]["regrow_value"],
            cfg["prunefl"]["aggregation_weight"]) == (1.5, 10, "last", "processed")


@pytest.mark.parametrize("sets, key", [
    (["rounds=4", "prunefl.reconfigure_every=4"], "prunefl.reconfigure_every"),
    (["prunefl.max_drop=1.5"], "prunefl.max_drop"),
    (["prunefl.target_density=0.5", "prunefl.max_density=0.4"], "prunefl.target_density"),
    (["prunefl.regrow_value=random"], "prunefl.regrow_value"),
    (["snip.density=0"], "snip.density"),
    (["imp.prunes=0"], "imp.prunes"),
])
def test_bad_prunefl_settings_are_config_errors(sets, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, extra=copy.deepcopy(PF), overrides=sets)
    assert key in str(err.value)


def test_no_reconfiguration_needed_without_adaptive_pruning():
    """rounds 2 after the initial-pruning round 1 leave 2 − 1 = 1 FL round, fewer than ΔR = 2: with
    adaptive pruning no round would reconfigure (refused), without it that is expected (accepted)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, extra=copy.deepcopy(PF), overrides=["rounds=2"])
    assert "prunefl.reconfigure_every" in str(err.value) and "1 FL rounds" in str(err.value)
    cfg = load_config(None, extra=copy.deepcopy(PF), overrides=["rounds=2", "prunefl.adaptive=false"])
    assert cfg["prunefl"]["adaptive"] is False and cfg["rounds"] == 2


@pytest.mark.parametrize("adaptive, uploads", [(True, [3]), (False, [])])
def test_importance_is_uploaded_every_delta_r_fl_rounds_only_with_adaptive_pruning(adaptive, uploads):
    """rounds 5, ΔR = 2: round 1 prunes at one client, FL round = round − 1; importance is uploaded
    (and the model reconfigured for the next round) when the FL round is a multiple of 2 and a
    round follows to train the new mask: round 3, not the last round 5; never without adaptive
    pruning."""
    _, info = mlp_info()
    cfg = load_config(None, extra=copy.deepcopy(PF), overrides=["rounds=5", f"prunefl.adaptive={adaptive}"])
    algorithm = build_algorithm(cfg, info)
    assert [r for r in range(1, 6) if algorithm.is_ip_round(r)] == [1]
    assert [r for r in range(1, 6) if algorithm.is_upload_round(r)] == uploads


# ------------------------------------------------------------------------------ one client, in process
def test_client_accumulates_importance_in_its_state_and_uploads_it_on_the_delta_r_round():
    from fedmpi.algorithms import ClientTask
    from fedmpi.update import ModelUpdate

    model, info = mlp_info()
    # dense: all n values uploaded (with the default, a dense model uploads none: no pruned weight)
    cfg = load_config(None, extra=copy.deepcopy(PF),
                      overrides=["prunefl.initial_pruning=false", "prunefl.importance_upload=dense"])
    algorithm = build_algorithm(cfg, info)
    trainer = LocalTrainer(model, cfg["local"])
    weights = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    x, y = torch.randn(40, 60), torch.randint(0, 10, (40,))
    first = algorithm.local_update(ClientTask(1, 3, ModelUpdate(weights), {}, x, y, 11), trainer)
    assert IMPORTANCE not in first.update.values
    stored = first.state["importance"]
    assert stored.dtype == np.float32 and stored.size == n_params(info)
    second = algorithm.local_update(ClientTask(2, 3, ModelUpdate(weights), first.state, x, y, 12), trainer)
    uploaded = second.update.values[IMPORTANCE]                  # round 2: FL round 2 % ΔR = 0
    assert second.state == {"importance": None, "uploaded": 2}   # reset after the upload
    alone = algorithm.local_update(ClientTask(2, 3, ModelUpdate(weights), {}, x, y, 12), trainer)
    np.testing.assert_array_equal(uploaded, stored + alone.update.values[IMPORTANCE])


@pytest.mark.parametrize("steps, samples, processed", [(5, 40, 40 + 2 * 16), (5, 23, 2 * 23 + 16), (7, 16, 7 * 16),
                                                       (3, 7, 3 * 7), (0, 23, 2 * 23)])
def test_processed_weight_is_the_trainers_count_known_before_training(steps, samples, processed):
    """``aggregation_weight: processed``: the merge weighs a client by ``partial_sum_weight``, known
    before training, and it is the count the trainer returns (batch 16: steps run on into the next
    pass after a pass's short batch; 0 steps: local.epochs = 2 passes)."""
    from fedmpi.algorithms import ClientTask
    from fedmpi.update import ModelUpdate

    model, info = mlp_info()
    overrides = [f"prunefl.local_steps={steps}", "local.epochs=2", "prunefl.initial_pruning=false"]
    cfg = load_config(None, extra=copy.deepcopy(PF), overrides=overrides + ["prunefl.aggregation_weight=processed"])
    algorithm = build_algorithm(cfg, info)
    weights = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    x, y = torch.randn(samples, 60), torch.randint(0, 10, (samples,))
    task = ClientTask(2, 3, ModelUpdate(weights), {}, x, y, 5)
    _, _, counted = algorithm.train(task, LocalTrainer(model, cfg["local"]))
    assert algorithm.partial_sum_weight(3, samples) == counted == processed
    by_samples = build_algorithm(load_config(None, extra=copy.deepcopy(PF), overrides=overrides), info)
    assert by_samples.partial_sum_weight(3, samples) == samples


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("prunefl")


@pytest.fixture(scope="module")
def runs(work):
    cache = {}

    def get(name: str, ranks: int = 1, sets: tuple = ()):
        key = (name, ranks)
        if key not in cache:
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(PF))
            out = work / f"{name}_p{ranks}.h5"
            args = ["run", str(path), "--out", str(out), "--quiet"]
            for s in sets:
                args += ["--set", s]
            proc, _ = fedmpi(args, ranks, timeout=300)
            assert proc.returncode == 0, f"{name} P={ranks}:\n{proc.stderr[-3000:]}"
            cache[key] = (out, read_results(out))
        return cache[key]

    return get


@pytest.mark.slow
def test_initial_pruning_round_one_client_counted_bytes(runs):
    _, res = runs("prunefl")
    rounds, clients = res["rounds"], res["clients"]
    _, info = mlp_info()
    first = clients["round"] == 1
    assert first.sum() == 1
    chosen = int(rng.generator(0, rng.SAMPLING, 1).integers(8))
    assert int(clients["client_id"][first][0]) == chosen
    assert int(clients["download_bytes"][first][0]) == 4 * n_params(info)     # the dense init
    iterations, reconfigs = int(rounds["ip_iterations"][0]), int(rounds["ip_reconfigurations"][0])
    assert int(clients["ip_iterations"][first][0]) == iterations
    # stop rule: 3 stable reconfigurations in a row need at least 4, or the iteration cap
    assert iterations == 120 or (reconfigs >= 4 and iterations == 10 * reconfigs)
    assert rounds["density"][0] < 1.0
    active = int(rounds["active_params"][0])
    dense = sum(math.prod(info.shapes[n]) for n in info.shapes if n not in info.maskable)
    masked = active - dense
    layer_active = {n: int(round(rounds[f"layer_density[{n}]"][0] * math.prod(info.shapes[n])))
                    for n in info.maskable}
    assert sum(layer_active.values()) == masked
    expected = 4 * active + sum(mask_bytes(math.prod(info.shapes[n]), k) for n, k in layer_active.items())
    assert int(clients["upload_bytes"][first][0]) == expected      # values + the mask, once
    assert np.all(rounds["ip_iterations"][1:] == -1)


@pytest.mark.slow
def test_importance_upload_is_4_bytes_per_pruned_weight_per_client(runs):
    """importance_upload: pruned (the default, the authors' protocol): the extra tensor holds the
    pruned weights' importance only, 4 bytes each; the server derives the rest from the update."""
    _, res = runs("prunefl")
    rounds, clients = res["rounds"], res["clients"]
    _, info = mlp_info()
    maskable = sum(math.prod(info.shapes[n]) for n in info.maskable)
    dense = n_params(info) - maskable
    extra_header = HEADER_BYTES_PER_TENSOR + len(IMPORTANCE) + 3 + 4     # unregistered 1-D tensor
    for r in range(2, 8):
        this = clients["round"] == r
        model_bytes = 4 * int(rounds["active_params"][r - 1])            # round r's row: the mask it trained
        upload_round = (r - 1) % 2 == 0 and r < 7                        # FL round r − 1, ΔR = 2; not the last
        pruned = maskable - (int(rounds["active_params"][r - 1]) - dense)
        assert np.all(clients["upload_bytes"][this] == model_bytes + (4 * pruned if upload_round else 0)), r
        assert rounds["reconfigured"][r - 1] == int(upload_round)
        assert rounds["importance_uploads"][r - 1] == (4 if upload_round else 0)
        header = clients["header_bytes"][this]
        plain = HEADER_BYTES_PER_TENSOR * len(info.shapes)
        assert np.all(header == plain + (extra_header if upload_round else 0)), r
    assert np.all(np.isfinite(rounds["objective"][rounds["reconfigured"] == 1]))


@pytest.mark.slow
def test_download_carries_the_mask_only_when_the_clients_copy_is_older(runs):
    _, res = runs("prunefl")
    rounds, clients = res["rounds"], res["clients"]
    version = np.cumsum([1] + [int(x) for x in rounds["reconfigured"][1:]])   # mask version after each round
    held = {int(clients["client_id"][0]): 1}      # the initial-pruning client made version 1
    for r in range(2, 8):
        this = np.flatnonzero(clients["round"] == r)
        values = 4 * int(rounds["active_params"][r - 1])   # round r's row describes the mask it trained
        for row in this:
            c = int(clients["client_id"][row])
            stale = held.get(c) != version[r - 2]
            download = int(clients["download_bytes"][row])
            assert (download > values) if stale else (download == values), (r, c)
            held[c] = version[r - 2]


@needs_mpiexec
@pytest.mark.parametrize("name, sets, rank_counts", [
    ("prunefl", (), (2, 4)),
    ("prunefl_public", ("prunefl.public_code=true",), (2,)),
    ("snip", ("algorithm=snip", "snip.density=0.3"), (3,)),
    ("imp", ("algorithm=imp", "imp.density=0.3", "imp.prunes=3", "imp.every=2"), (3,)),
])
@pytest.mark.slow
def test_identical_metrics_for_1_2_4_ranks(runs, name, sets, rank_counts):
    _, base = runs(name, 1, sets)
    assert np.all(np.isfinite(base["rounds"]["test_accuracy"]))
    for ranks in rank_counts:
        _, other = runs(name, ranks, sets)
        assert_all_columns_identical(base, other, f"{name} P=1 vs P={ranks}")


@pytest.mark.slow
def test_without_initial_pruning_fl_starts_dense(runs):
    _, res = runs("prunefl_no_ip", 1, ("prunefl.initial_pruning=false",))
    rounds, clients = res["rounds"], res["clients"]
    assert np.sum(clients["round"] == 1) == 4
    assert rounds["density"][0] == 1.0 and np.all(rounds["ip_iterations"] == -1)
    np.testing.assert_array_equal(rounds["reconfigured"], [0, 1, 0, 1, 0, 1, 0])


@pytest.mark.slow
def test_snip_prunes_once_after_the_dense_first_round(runs):
    _, res = runs("snip", 1, ("algorithm=snip", "snip.density=0.3"))
    density = res["rounds"]["density"]
    # round 1 is a dense round, and its row describes that model: the mask comes after it
    assert density[0] == 1.0
    assert density[1] == pytest.approx(0.3, abs=1e-4) and np.all(density[1:] == density[1])
    # round 1 is a dense round: the uploads are the dense model's
    assert np.all(res["clients"]["upload_bytes"][:4] == 4 * n_params(mlp_info()[1]))


@pytest.mark.slow
def test_imp_prunes_a_fixed_fraction_every_few_rounds(runs):
    _, res = runs("imp", 1, ("algorithm=imp", "imp.density=0.3", "imp.prunes=3", "imp.every=2"))
    density = res["rounds"]["density"]
    q = 1 - 0.3 ** (1 / 3)
    # pruned after rounds 2, 4, 6; each row describes the mask its round trained
    expected = [1, 1, (1 - q), (1 - q), (1 - q) ** 2, (1 - q) ** 2, (1 - q) ** 3]
    np.testing.assert_allclose(density, expected, atol=2e-3)


@pytest.mark.parametrize("section", ["snip", "imp"])
def test_density_from_is_gone_the_campaign_passes_the_density(section):
    """PruneFL's final density reaches SNIP / IMP as a number: a campaign's from_run
    (tests/test_sweep.py), not a file the algorithm reads."""
    with pytest.raises(ConfigError, match=f"{section}.density_from"):
        load_config(None, extra=copy.deepcopy(PF),
                    overrides=[f"algorithm={section}", f"{section}.density_from=x_{{seed}}.h5"])


# ------------------------------------------------------------------------------ SIGKILL + resume
RESUME = ["--set", "checkpoint.every=1", "--set", "prunefl.local_steps=40", "--set", "eval.every=2"]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(runs, work):
    path = work / "resume.yaml"
    path.write_text(yaml.safe_dump(PF))
    a, b = sigkill_and_resume(path, work, RESUME, r"^round 4/7")
    assert_all_columns_identical(a, b, "prunefl resumed after SIGKILL")
    assert same_bits(a["rounds"]["reconfigured"], b["rounds"]["reconfigured"])


# ------------------------------------------------------------------------------ figures and table
def fake_run(algorithm, seed, accuracy, cum_sim, sections=None, active=None, upload=None, compute=None):
    from pathlib import Path

    from fedmpi.results.reader import RunResult

    n = len(accuracy)
    config = {"algorithm": algorithm, "seed": seed, "rounds": n, "experiment": "toy-prunefl",
              "model": "femnist_cnn", "clients": {"total": 2, "per_round": 2}, **(sections or {})}
    rounds = {"round": np.arange(1, n + 1), "test_accuracy": np.asarray(accuracy, float),
              "cum_sim_seconds": np.asarray(cum_sim, float), "sim_seconds": np.diff(cum_sim, prepend=0.0)}
    if active is not None:
        rounds["active_params"] = np.asarray(active, np.int64)
    clients = {}
    if upload is not None:
        clients = {"round": np.repeat(np.arange(1, n + 1), 2), "upload_bytes": np.full(2 * n, upload, np.int64)}
    if compute is not None:   # two clients per round: the given seconds and half of them
        clients = {"round": np.repeat(np.arange(1, n + 1), 2),
                   "compute_seconds": np.ravel([[c, c / 2] for c in compute])}
    return RunResult(path=Path(f"{algorithm}{seed}.h5"), config=config, finished=True, rounds=rounds,
                     attrs={}, clients=clients)


def test_time_to_target_table_and_figures(tmp_path):
    from fedmpi.figures.prunefl import draw, model_size, time_to_target_table
    from fedmpi.results import group_runs

    nan = float("nan")
    conventional = {"prunefl": {"initial_pruning": False, "adaptive": False}}
    runs = [
        # reference: finals 0.84 and 0.80 → target 0.81; seed 0 reaches it at round 4 (40 s), seed 1 never
        fake_run("prunefl", 0, [nan, 0.5, nan, 0.83, 0.84], [10, 20, 30, 40, 50], conventional,
                 active=[100] * 5),
        fake_run("prunefl", 1, [nan, 0.5, nan, 0.79, 0.80], [10, 20, 30, 40, 50], conventional,
                 active=[100] * 5),
        # PruneFL reaches it at round 4 in both seeds: 8 s and 12 s → 10 s, a quarter of 40 s
        # measured: the slowest client per round summed up to round 4: 1+2+3+4 = 10 s and 4 × 2 = 8 s
        fake_run("prunefl", 0, [nan, 0.7, nan, 0.82, 0.83], [2, 4, 6, 8, 10], active=[60, 50, 40, 30, 30],
                 compute=[1, 2, 3, 4, 5]),
        fake_run("prunefl", 1, [nan, 0.7, nan, 0.85, 0.86], [3, 6, 9, 12, 15], active=[60, 50, 40, 30, 20],
                 compute=[2, 2, 2, 2, 2]),
        fake_run("fedavg_like_dense", 0, [nan, 0.1, nan, 0.1, 0.2], [1, 2, 3, 4, 5], upload=400),
    ]
    groups = group_runs(runs)
    table = time_to_target_table(groups)
    assert "Target accuracy 0.8100" in table
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "method" not in line}
    assert rows["PruneFL"][3:8] == ["2/2", "10", "9.0", "4", "0.25"]
    assert rows["conventional FL (5 local iterations)"][3:8] == ["1/2", "40", "—", "4", "1.00"]
    assert rows["PruneFL"][2] == "25"                          # final model size, mean over seeds
    assert rows["fedavg_like_dense"][4] == "not reached"
    np.testing.assert_array_equal(model_size(runs[-1]), [100.0] * 5)   # no column: upload / 4
    colors = {g.label: "C0" for g in groups}
    written = draw("toy-prunefl", groups, colors, tmp_path, "toy")
    names = sorted(p.name for p in written)
    assert names == ["toy_prunefl_accuracy_vs_round.png", "toy_prunefl_accuracy_vs_time.png",
                     "toy_prunefl_model_size.png", "toy_prunefl_time_to_target.md"]
    assert all((tmp_path / n).stat().st_size > 0 for n in names)
