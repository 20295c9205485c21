"""One time model, charged alike (#23 point 4), each against a hand computation:

- (a) while PruneFL's clients gather importance they compute every weight's gradient: the FLOP
  model charges forward and input gradient at the live density and the weight gradient dense;
- (b) ``device.time_constant`` is charged to every client of every method and is in Γ's c₀;
- (c) the authors' per-weight coefficients (``profiles/prunefl-raspberry-pi.yaml``, a
  ``kind: coefficients`` profile) and ``prunefl.ip_time: zero``;
- (d) the authors' importance protocol: only the pruned positions' importance is uploaded (4 bytes
  each), the rest derived from the update; ``importance_upload: dense`` keeps all n values.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import yaml

from helpers import PRUNEFL, REPO, TINY, fedmpi, read_results, same_bits

from fedmpi.algorithms import ClientTask, ModelInfo, build_algorithm
from fedmpi.comm.codec import HEADER_BYTES_PER_TENSOR, decode, encode
from fedmpi.config import load_config
from fedmpi.errors import ConfigError
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops
from fedmpi.timing import DeviceProfile, RunTiming, TimeModel, load_profile
from fedmpi.training import LocalTrainer
from fedmpi.update import ModelUpdate

AUTHORS = str(REPO / "profiles" / "prunefl-raspberry-pi.yaml")
COMM = 5.561621025626998e-06          # the authors' COMM_COEFFICIENT (configs/femnist.py)

# the MLP (60 → 200 → 200 → 10): 2 forward FLOPs per weight per sample in every layer
MLP_MASKABLE = 60 * 200 + 200 * 200 + 200 * 10          # 54,000
MLP_BIASES = 200 + 200 + 10
LAPTOP = (20e9, 20e6 / 8, 100e6 / 8)                    # FLOP/s, uplink, downlink bytes/s

PF = {
    **PRUNEFL, "rounds": 4, "eval": {"every": 2},
    "prunefl": {"local_steps": 5, "reconfigure_every": 1, "ip_interval": 10, "ip_max_iterations": 30,
                "ip_patience": 2},
}


def toy_info() -> ModelInfo:
    """Two maskable layers, a (4×5, 40 forward FLOPs per sample) and b (2×4, 16), and a 4-value bias."""
    return ModelInfo({"a": (4, 5), "a.bias": (4,), "b": (2, 4)}, ["a", "b"], {"a": 40, "b": 16})


TOY = DeviceProfile("toy", flops_per_second=1000.0, uplink_bytes_per_second=100.0,
                    downlink_bytes_per_second=400.0, description="test")


def femnist_info(classes: int = 10) -> ModelInfo:
    model = build_model("femnist_cnn", (1, 28, 28), classes)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return ModelInfo(shapes, maskable_parameter_names(model), layer_flops(model, (1, 28, 28)), num_clients=10,
                     model="femnist_cnn", input_shape=(1, 28, 28), num_classes=classes)


def mlp_info() -> tuple[torch.nn.Module, ModelInfo]:
    # the same initial weights whatever ran before in this process (tests compare two calls)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_model("mlp", (60,), 10)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    return model, ModelInfo(shapes, maskable_parameter_names(model), layer_flops(model, (60,)), num_clients=8,
                            model="mlp", input_shape=(60,), num_classes=10)


# ------------------------------------------------------------------------------ (a) what is computed
def test_dense_weight_gradients_charge_the_weight_gradient_dense_by_hand():
    """10 samples at densities a 0.25 (5 of 20), b 0.5 (4 of 8), 1000 FLOP/s, 40 B up at 100 B/s,
    80 B down at 400 B/s (0.6 s). Live weights only: 3 · 10 · (40·0.25 + 16·0.5) = 540 FLOPs,
    0.54 s. Every weight's gradient: 10 · (2 · 18 + 56) = 920 FLOPs, 0.92 s."""
    timing = RunTiming(toy_info(), TOY)
    densities = {"a": 0.25, "b": 0.5}
    assert timing.train_flops(10, densities) == 540.0
    assert timing.train_flops(10, densities, dense_weight_gradients=True) == 920.0
    assert timing.client_seconds(0, 10, densities, 40, 80) == pytest.approx(0.54 + 0.6, rel=1e-12)
    assert timing.client_seconds(0, 10, densities, 40, 80, dense_weight_gradients=True) == \
        pytest.approx(0.92 + 0.6, rel=1e-12)
    # the linear model of 10 samples: a value each way costs 4/100 + 4/400 = 0.05 s, the bias's 4
    # values 0.2 s; dense weight gradients put 10 · 56 / 1000 = 0.56 s in c0 and leave 2 · 10 · 2 /
    # 1000 = 0.04 s per weight of a (0.06 s with live gradients)
    live = TimeModel.for_samples(TOY, toy_info(), 10)
    dense = TimeModel.for_samples(TOY, toy_info(), 10, dense_weight_gradients=True)
    assert live.c0 == pytest.approx(0.2) and live.t["a"] == pytest.approx(0.06 + 0.05)
    assert dense.c0 == pytest.approx(0.56 + 0.2) and dense.t["a"] == pytest.approx(0.04 + 0.05)
    assert dense.t["b"] == pytest.approx(2 * 10 * 2 / 1000 + 0.05)
    assert dense.round_seconds({"a": 5, "b": 4}) == pytest.approx(0.76 + 0.09 * 5 + 0.09 * 4)


def processed(num_samples: int, steps: int = 5, batch: int = 16) -> int:
    """Samples a client processes in ``steps`` minibatches of ``batch`` (a pass over its data ends
    in a short batch and the next pass starts over)."""
    passes, rest = divmod(steps, math.ceil(num_samples / batch))
    return passes * num_samples + rest * batch


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work, cache = tmp_path_factory.mktemp("time_model"), {}

    def get(name: str, base: dict, sets: tuple = ()) -> dict:
        if name not in cache:
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(base))
            out = work / f"{name}.h5"
            args = ["run", str(path), "--out", str(out), "--quiet"]
            for s in sets:
                args += ["--set", s]
            proc, _ = fedmpi(args, 1, timeout=300)
            assert proc.returncode == 0, f"{name}:\n{proc.stderr[-3000:]}"
            cache[name] = read_results(out)
        return cache[name]

    return get


@pytest.mark.slow
def test_prunefl_clients_are_charged_dense_weight_gradients_while_they_gather_importance(runs):
    """rounds 4, ΔR = 1: round 1 prunes at one client; FL rounds 1, 2 (rounds 2, 3) upload importance,
    the last round 4 does not (no round would train its reconfiguration), so its clients gather
    none. Each MLP weight costs 2 forward FLOPs per sample: with nnz active maskable weights, a
    client of s samples costs s · (2·2·nnz + 2·54,000) FLOPs while gathering, else 3 · s · 2·nnz;
    sim_seconds = FLOPs / 20e9 + bytes over the laptop links."""
    res = runs("prunefl", PF)
    rounds, clients = res["rounds"], res["clients"]
    for r, gathering in ((2, True), (3, True), (4, False)):
        nnz = int(rounds["active_params"][r - 1]) - MLP_BIASES     # round r's row: the mask it trained
        assert nnz < MLP_MASKABLE
        for row in np.flatnonzero(clients["round"] == r):
            s = processed(int(clients["num_samples"][row]))
            flops = s * (4 * nnz + 2 * MLP_MASKABLE) if gathering else 3 * s * 2 * nnz
            assert clients["train_flops"][row] == flops, (r, row)
            rate, up, down = LAPTOP
            expected = flops / rate + clients["upload_bytes"][row] / up + clients["download_bytes"][row] / down
            assert clients["sim_seconds"][row] == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------ (b) c0 for everyone
@pytest.mark.slow
def test_time_constant_adds_exactly_c0_per_round_to_fedavg_and_nothing_without_it(runs):
    """FedAvg under the laptop profile: with device.time_constant 2.5 every client's and every
    round's sim_seconds rise by 2.5 s (cum_sim_seconds by 2.5 · rounds), and nothing else moves;
    without it (the default 0) a client's time is its FLOPs / 20e9 + its bytes over the links."""
    base = copy.deepcopy(TINY)
    plain = runs("fedavg", base)
    charged = runs("fedavg_c0", base, ("device.time_constant=2.5",))
    for table in ("rounds", "clients"):
        for name, column in plain[table].items():
            other = charged[table][name]
            if name in ("sim_seconds", "cum_sim_seconds"):
                continue
            if name in ("wall_seconds", "cum_wall_seconds", "compute_seconds", "server_peak_rss_bytes",
                        "mpi_payload_bytes", "mpi_control_bytes"):
                continue   # machine measurements
            assert same_bits(column, other), f"{table}/{name}"
    np.testing.assert_allclose(charged["clients"]["sim_seconds"] - plain["clients"]["sim_seconds"], 2.5, rtol=1e-12)
    np.testing.assert_allclose(charged["rounds"]["sim_seconds"] - plain["rounds"]["sim_seconds"], 2.5, rtol=1e-12)
    rounds = len(plain["rounds"]["round"])
    assert charged["rounds"]["cum_sim_seconds"][-1] - plain["rounds"]["cum_sim_seconds"][-1] == \
        pytest.approx(2.5 * rounds, rel=1e-12)
    c = plain["clients"]
    rate, up, down = LAPTOP
    np.testing.assert_allclose(c["sim_seconds"], c["train_flops"] / rate + c["upload_bytes"] / up
                               + c["download_bytes"] / down, rtol=1e-12)


def test_time_constant_is_in_prunefl_objective_and_time_constant_of_prunefl_replaces_it_only_there():
    from fedmpi.algorithms.prunefl_reconfiguration import round_time_model

    _, info = mlp_info()
    cfg = load_config(None, extra=copy.deepcopy(PF))
    with_c0 = load_config(None, extra=copy.deepcopy(PF), overrides=["device.time_constant=0.7"])
    plain, charged = round_time_model(cfg, info, 5), round_time_model(with_c0, info, 5)
    assert charged.c0 == pytest.approx(plain.c0 + 0.7, rel=1e-12) and dict(charged.t) == dict(plain.t)
    with_c0["prunefl"]["time_constant"] = 0.25
    assert round_time_model(with_c0, info, 5).c0 == 0.25
    with pytest.raises(ConfigError, match="device.time_constant"):
        load_config(None, extra=copy.deepcopy(PF), overrides=["device.time_constant=-1"])


# ------------------------------------------------------------------------------ (c) the authors' coefficients
def test_authors_raspberry_pi_coefficients_by_hand():
    """femnist_cnn (10 classes), 5 steps of 20: t_l = 5 · COMP_COEFFICIENTS_SINGLE[l] + COMM; c0 =
    5 · SPARSE_TIME + the 32 + 64 + 2048 + 10 biases' traffic. Per weight, conv1 costs 0.85 × fc1
    and conv2 6.3 ×, where the FLOP-based raspberry-pi-4 profile (1.5 GFLOP/s, 10/50 Mbit/s) gives
    (3 · 100 · 1568 / 1.5e9 + 3.84e-6) / (3 · 100 · 2 / 1.5e9 + 3.84e-6) = 74.9 and 392 FLOPs: 19.4."""
    info = femnist_info()
    authors = TimeModel.for_profile(load_profile(AUTHORS), info, 5, 20)
    expected = {"conv1.weight": COMM, "conv2.weight": 5 * 7.098850e-6 + COMM,
                "fc1.weight": 5 * 1.927325e-7 + COMM, "fc2.weight": 5 * 1.782308e-7 + COMM}
    for name, value in expected.items():
        assert authors.t[name] == pytest.approx(value, rel=1e-12), name
    assert authors.c0 == pytest.approx(5 * 1.2492789765 + 2154 * COMM, rel=1e-12)
    ratio = {n: authors.t[n] / authors.t["fc1.weight"] for n in authors.t}
    assert round(ratio["conv1.weight"], 2) == 0.85 and round(ratio["conv2.weight"], 1) == 6.3
    flops = TimeModel.for_profile(load_profile("raspberry-pi-4"), info, 5, 20)
    value = 4 / 1.25e6 + 4 / 6.25e6
    fc1 = 3 * 100 * 2 / 1.5e9 + value
    assert flops.t["conv1.weight"] / flops.t["fc1.weight"] == pytest.approx((3 * 100 * 1568 / 1.5e9 + value) / fc1)
    assert round(flops.t["conv1.weight"] / flops.t["fc1.weight"]) == 75
    assert round(flops.t["conv2.weight"] / flops.t["fc1.weight"], 1) == 19.4
    # a dense 5-step round of the 10-class model: c0 + Σ t_l · n_l
    sizes = {"conv1.weight": 800, "conv2.weight": 51200, "fc1.weight": 6422528, "fc2.weight": 20480}
    assert authors.round_seconds() == pytest.approx(authors.c0 + sum(expected[n] * k for n, k in sizes.items()))


def test_authors_profile_refuses_another_model_or_input_naming_the_file():
    profile = load_profile(AUTHORS)
    _, mlp = mlp_info()
    with pytest.raises(ConfigError, match="prunefl-raspberry-pi.yaml.*femnist_cnn"):
        TimeModel.for_profile(profile, mlp, 5, 20)
    wrong = femnist_info()
    wrong.input_shape = (3, 28, 28)
    with pytest.raises(ConfigError, match="prunefl-raspberry-pi.yaml.*1x28x28"):
        TimeModel.for_profile(profile, wrong, 5, 20)
    assert set(profile.models) == {"femnist_cnn", "vgg11"}


@pytest.mark.slow
def test_a_coefficient_profile_gives_every_clients_sim_seconds(runs, tmp_path):
    """A coefficient profile for the MLP: 0.5 s per step of 16 samples + 1e-4 s per fc1 weight
    (12,000), 2e-5 per fc2 weight (40,000), 3e-4 per fc3 weight (2,000): 3.1 s per step; 0.25 s per
    round; a value up and down 8e-6 s, so 1e6 bytes/s each way. FedAvg trains one pass (s = its
    samples, dense): 0.25 + s / 16 · 3.1 + (upload + download) / 1e6."""
    path = tmp_path / "mlp_coefficients.yaml"
    path.write_text(yaml.safe_dump({
        "format": "fedmpi-profile/1", "kind": "coefficients", "name": "toy", "batch_size": 16,
        "value_seconds": 8e-6, "round_seconds": 0.25,
        "models": {"mlp": {"input_shape": [60], "step_seconds": 0.5,
                           "layers": {"fc1.weight": 1e-4, "fc2.weight": 2e-5, "fc3.weight": 3e-4}}}}))
    res = runs("fedavg_coefficients", copy.deepcopy(TINY), (f"device.profile={path}",))
    c = res["clients"]
    expected = 0.25 + c["num_samples"] / 16 * 3.1 + (c["upload_bytes"] + c["download_bytes"]) / 1e6
    np.testing.assert_allclose(c["sim_seconds"], expected, rtol=1e-12)


@pytest.mark.slow
def test_ip_time_zero_books_the_initial_pruning_round_at_zero_seconds(runs):
    """prunefl.ip_time: zero (the authors' simulation, list_est_time.append(0)): round 1 costs 0 s;
    every other round, and every byte and FLOP, stays as charged."""
    charged = runs("prunefl", PF)
    zero = runs("prunefl_ip_zero", PF, ("prunefl.ip_time=zero",))
    assert charged["rounds"]["sim_seconds"][0] > 0
    assert zero["rounds"]["sim_seconds"][0] == 0 and zero["clients"]["sim_seconds"][0] == 0
    assert same_bits(zero["rounds"]["sim_seconds"][1:], charged["rounds"]["sim_seconds"][1:])
    for name in ("train_flops", "upload_bytes", "download_bytes", "test_accuracy", "density"):
        assert same_bits(zero["rounds"][name], charged["rounds"][name]), name
    assert zero["rounds"]["cum_sim_seconds"][-1] == pytest.approx(
        charged["rounds"]["cum_sim_seconds"][-1] - charged["rounds"]["sim_seconds"][0], rel=1e-12)


# ------------------------------------------------------------------------------ (d) importance bytes
def importance_round(protocol: str | None):
    """Two MLP clients of FL round 1 (ΔR = 1, no initial pruning) with a hand-made mask that prunes
    every 4th weight of each layer (``protocol`` None: the default): their encoded uploads, their
    results as the server decodes them, and the round's setting."""
    model, info = mlp_info()
    overrides = ["prunefl.initial_pruning=false", "rounds=3"]
    overrides += [f"prunefl.importance_upload={protocol}"] if protocol else []
    cfg = load_config(None, extra=copy.deepcopy(PF), overrides=overrides)
    algorithm = build_algorithm(cfg, info)
    assert algorithm.is_upload_round(1)
    masks = {n: (np.arange(math.prod(info.shapes[n])) % 4 != 0).reshape(info.shapes[n]) for n in info.maskable}
    weights = {n: t.detach().numpy().copy() for n, t in model.state_dict().items()}
    weights = {n: np.where(masks[n], w, 0).astype(w.dtype) if n in masks else w for n, w in weights.items()}
    generator = torch.Generator().manual_seed(3)
    uploads, results = [], []
    for client in (2, 5):
        x, y = torch.randn(40, 60, generator=generator), torch.randint(0, 10, (40,), generator=generator)
        task = ClientTask(1, client, ModelUpdate(dict(weights), dict(masks)), {}, x, y, 7 + client)
        result = algorithm.local_update(task, LocalTrainer(model, cfg["local"]))
        encoded = encode(result.update, masks, schema=info.shapes)
        uploads.append(encoded)
        result.update = decode(encoded, masks, densify=False)     # what the server decodes
        results.append(result)
    return uploads, results, dict(weights=weights, masks=masks, names=algorithm.param_names, info=info,
                                  lr=cfg["local"]["lr"])


def server_importance(protocol: str) -> tuple[np.ndarray, dict]:
    """The importance the server sums from ``importance_round``'s uploads (and, for ``pruned``,
    from the updates)."""
    from fedmpi.algorithms.prunefl_importance import add_update_importance, summed_importance

    _, results, s = importance_round(protocol)
    vectors = [r.update.values["prunefl.importance"] for r in results]
    shapes = s["info"].shapes
    derived = None if protocol == "dense" else add_update_importance(
        None, results, s["weights"], s["masks"], s["names"], shapes, s["lr"])
    return summed_importance(vectors, derived, s["masks"], s["names"], shapes, protocol), s


def test_importance_bytes_by_hand_under_both_protocols():
    """Every 4th weight pruned: fc1 3,000 of 12,000, fc2 10,000 of 40,000, fc3 500 of 2,000, so
    40,500 active maskable weights + 410 biases = 40,910 values (163,640 bytes) and 13,500 pruned
    weights. pruned (the default): + 4 · 13,500 = 54,000 bytes of importance; dense: + 4 · 54,410 =
    217,640 bytes. Either way the importance row's description adds 9 + len("prunefl.importance")
    + 3 + 4 bytes."""
    extra_header = HEADER_BYTES_PER_TENSOR + len("prunefl.importance") + 3 + 4
    plain_header = HEADER_BYTES_PER_TENSOR * 6
    for protocol, importance_bytes in ((None, 4 * 13_500), ("pruned", 4 * 13_500), ("dense", 4 * 54_410)):
        uploads, _, _ = importance_round(protocol)
        for encoded in uploads:
            assert encoded.nbytes == 4 * 40_910 + importance_bytes, protocol
            assert encoded.header_bytes == plain_header + extra_header, protocol


def test_pruned_protocol_gives_the_server_the_dense_protocols_importance():
    """With plain SGD the update carries the active weights' importance: ((θ_k − θ)/lr)² · s equals
    the client's (Σ g)² · s up to float32 rounding of the weights; the pruned positions' values
    are the clients' own, summed the same way (bit for bit)."""
    from fedmpi.algorithms.prunefl_importance import pruned_positions

    pruned, s = server_importance("pruned")
    dense, _ = server_importance("dense")
    at_pruned = pruned_positions(s["masks"], s["names"], s["info"].shapes)
    assert at_pruned.size == 13_500
    assert same_bits(pruned[at_pruned], dense[at_pruned])
    assert np.count_nonzero(dense) > 40_000
    np.testing.assert_allclose(pruned, dense, rtol=2e-3, atol=1e-6 * float(dense.max()))
