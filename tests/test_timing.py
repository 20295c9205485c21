"""The round-time model (fedmpi.timing): modelled and measured profiles, T(m) = c₀ + Σ t_l·nnz_l,
``fedmpi profile``, the ``device`` config keys, and ``sim_seconds`` end to end."""
from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from helpers import BATCH_SCRIPT

from fedmpi.algorithms import ModelInfo
from fedmpi.config import DEFAULTS, load_config
from fedmpi.errors import ConfigError
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops
from fedmpi.timing import (PROFILES, LayerLine, MeasuredLayer, MeasuredProfile, RunTiming, TimeModel,
                           load_profile)
from fedmpi.timing.fits import break_even, build_profile, fit_line
from fedmpi.timing.measure import LayerTimes
from fedmpi.timing.profiles import profile_document

REPO = Path(__file__).resolve().parents[1]
MBIT = 1e6 / 8


def model_info(name, shape, classes, num_clients=0) -> ModelInfo:
    model = build_model(name, shape, classes)
    state = model.state_dict()
    return ModelInfo({n: tuple(t.shape) for n, t in state.items() if t.is_floating_point()},
                     maskable_parameter_names(model), layer_flops(model, shape), num_clients=num_clients,
                     model=name, input_shape=tuple(shape), num_classes=classes)


MLP = ("mlp", (60,), 10)       # what the tiny synthetic runs train: 60 → 200 → 200 → 10


def synthetic_profile(info: ModelInfo, path="synthetic.yaml") -> MeasuredProfile:
    """Hand-chosen lines for the MLP: fc1 has a sparse kernel that wins below density 0.25."""
    lines = {"fc1.weight": (LayerLine(4e-3, 0.0), LayerLine(1e-3, 1e-3 / 1000)),     # 12,000 weights
             "fc2.weight": (LayerLine(2e-3, 1e-9), LayerLine(3e-3, 1e-7)),            # never wins
             "fc3.weight": (LayerLine(1e-4, 0.0), None)}
    layers = {}
    for n, (dense, sparse) in lines.items():
        numel = math.prod(info.shapes[n])
        layers[n] = MeasuredLayer(info.shapes[n], dense, sparse, None,
                                  break_even(dense, sparse, numel) if sparse else 0.0, 0.0)
    return MeasuredProfile("synthetic", path, info.model, info.input_shape, info.num_classes, batch_size=10,
                           other_seconds=5e-3, layers=layers, uplink_bytes_per_second=1e6,
                           downlink_bytes_per_second=4e6, latency_seconds=0.5, overhead_seconds=0.02)


def write_profile(path: Path, profile: MeasuredProfile) -> Path:
    path.write_text(yaml.safe_dump(profile_document(profile)))
    return path


# ------------------------------------------------------------------------------ fitting
def test_fit_recovers_a_known_line_from_synthetic_timings():
    rng = np.random.default_rng(0)
    nnz = np.array([0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]) * 6_422_528
    true = LayerLine(1.5e-3, 2.0e-9)
    noisy = [true(n) * (1 + 0.01 * rng.standard_normal()) for n in nnz]
    line = fit_line(nnz, noisy)
    assert line.intercept == pytest.approx(true.intercept, rel=0.05)
    assert line.slope == pytest.approx(true.slope, rel=0.02)
    exact = fit_line(nnz, [true(n) for n in nnz])
    assert exact.intercept == pytest.approx(true.intercept, rel=1e-9) and exact.slope == pytest.approx(true.slope)
    # a flat (dense) kernel with noise never gets a negative slope; a line through ~0 no negative intercept
    flat = fit_line(nnz, [0.01 - 1e-12 * n for n in nnz])
    assert flat.slope == 0.0 and flat.intercept == pytest.approx(0.01, rel=1e-3)
    through = fit_line(nnz, [3e-9 * n - 1e-5 for n in nnz])
    assert through.intercept == 0.0 and through.slope == pytest.approx(3e-9, rel=0.01)
    # crossover of dense 10 ms and sparse 1 ms + 1e-8 s per weight: 9e5 weights
    assert break_even(LayerLine(0.01, 0.0), LayerLine(1e-3, 1e-8), 6_422_528) == pytest.approx(9e5 / 6_422_528)
    assert break_even(LayerLine(0.01, 0.0), LayerLine(0.02, 1e-8), 1000) == 0.0
    assert break_even(LayerLine(0.01, 0.0), LayerLine(0.001, 1e-12), 1000) == 1.0


def test_build_profile_fits_every_kernel_and_the_rest_of_the_step():
    densities = [0.1, 0.5, 1.0]
    numel = 200 * 60
    nnz = [int(d * numel) for d in densities]
    lt = LayerTimes("fc1.weight", (200, 60), (10, 60), densities, nnz, {
        "dense": [[4e-3] * 3 for _ in nnz],
        "sparse": [[1e-3 + 1e-6 * n] * 3 for n in nnz],
        "sparse_active": [[5e-4 + 5e-7 * n] * 3 for n in nnz]})
    profile = build_profile("p", "mlp", (60,), 10, 10, {"fc1.weight": lt}, [9e-3, 1e-2, 11e-3], uplink=1.0,
                            downlink=2.0, overhead=[0.3, 0.1, 0.2])
    layer = profile.layers["fc1.weight"]
    assert layer.dense.slope == 0 and layer.dense.intercept == pytest.approx(4e-3)
    assert layer.sparse.slope == pytest.approx(1e-6) and layer.sparse.intercept == pytest.approx(1e-3)
    assert layer.break_even == pytest.approx(3000 / numel)
    assert layer.break_even_active == pytest.approx(7000 / numel)
    assert profile.other_seconds == pytest.approx(1e-2 - 4e-3) and profile.overhead_seconds == 0.2


# ------------------------------------------------------------------------------ modelled profiles
def test_modelled_t_l_against_a_hand_computation():
    """MNISTNet on the laptop profile, 5 local steps of 20 samples (PruneFL's round)."""
    info = model_info("mnistnet", (1, 28, 28), 10)
    tm = TimeModel.for_profile(PROFILES["laptop"], info, steps_per_round=5, batch_size=20)
    rate, samples = 20e9, 100
    value = 4 / (20 * MBIT) + 4 / (100 * MBIT)          # one float32 up (20 Mbit/s) and down (100 Mbit/s)
    # FLOPs per weight per sample: 2 × output positions (conv1 24×24, conv2 18×18), 2 for a Linear
    per_weight = {"conv1.weight": 2 * 24 * 24, "conv2.weight": 2 * 18 * 18, "fc1.weight": 2, "fc2.weight": 2}
    for name, flops in per_weight.items():
        assert tm.t[name] == pytest.approx(3 * samples * flops / rate + value, rel=1e-12), name
    biases = 10 + 20 + 50 + 10
    assert tm.c0 == pytest.approx(biases * value, rel=1e-12)
    dense = tm.round_seconds()
    params = 250 + 5000 + 5120 * 50 + 500
    hand = 3 * samples * sum(info.layer_flops.values()) / rate + (params + biases) * value
    assert dense == pytest.approx(hand, rel=1e-12)
    assert tm.linear_seconds({}) == pytest.approx(dense, rel=1e-12)


def test_round_seconds_for_a_hand_made_mask():
    info = model_info(*MLP)
    nnz = {"fc1.weight": 1200, "fc2.weight": 20000, "fc3.weight": 2000}   # fc3 dense
    # modelled: every weight costs 3 × 2 FLOPs per sample plus one value each way
    tm = TimeModel.for_profile(PROFILES["phone-lte"], info, steps_per_round=5, batch_size=20)
    value = 4 / (5 * MBIT) + 4 / (20 * MBIT)
    biases = 200 + 200 + 10
    hand = sum(3 * 100 * 2 / 5e9 * n for n in nnz.values()) + (sum(nnz.values()) + biases) * value
    assert tm.round_seconds(nnz) == pytest.approx(hand, rel=1e-12)
    assert tm.linear_seconds(nnz) == pytest.approx(hand, rel=1e-12)
    assert tm.round_seconds(nnz, dense_params=0) == pytest.approx(hand - biases * value, rel=1e-12)
    # measured: per step at batch 10, the faster kernel per layer; 100 samples = 10 steps
    profile = synthetic_profile(info)
    tm = TimeModel.for_profile(profile, info, steps_per_round=5, batch_size=20)
    value = 4 / 1e6 + 4 / 4e6
    fc1 = min(4e-3, 1e-3 + 1e-6 * 1200)            # 2.2e-3: sparse (density 0.1 < break-even 0.25)
    fc2 = min(2e-3 + 1e-9 * 20000, 3e-3 + 1e-7 * 20000)   # dense
    compute = 10 * (5e-3 + fc1 + fc2 + 1e-4)
    hand = 0.5 + 0.02 + compute + (1200 + 20000 + 2000 + biases) * value
    assert tm.round_seconds(nnz) == pytest.approx(hand, rel=1e-12)
    assert profile.layers["fc1.weight"].break_even == pytest.approx(0.25)
    # the linear model: fc1 in its sparse regime, fc2 and fc3 dense (no sparse kernel wins)
    c0 = 0.5 + 0.02 + 10 * (5e-3 + 1e-3 + 2e-3 + 1e-4) + biases * value
    assert tm.c0 == pytest.approx(c0, rel=1e-12)
    assert tm.t == pytest.approx({"fc1.weight": 10 * 1e-6 + value, "fc2.weight": 10 * 1e-9 + value,
                                  "fc3.weight": value}, rel=1e-12)
    assert tm.linear_seconds(nnz) == pytest.approx(hand, rel=1e-12)
    # above fc1's break-even the dense kernel caps it, and the tangent says so
    dense_fc1 = {**nnz, "fc1.weight": 6000}
    assert tm.round_seconds(dense_fc1) == pytest.approx(hand + 10 * (4e-3 - fc1) + 4800 * value, rel=1e-12)
    c0_t, t_t = tm.linearize(dense_fc1)
    assert t_t["fc1.weight"] == pytest.approx(value) and c0_t + sum(t_t[n] * v for n, v in dense_fc1.items()) == \
        pytest.approx(tm.round_seconds(dense_fc1), rel=1e-12)
    assert tm.scaled(200).round_seconds(nnz) == pytest.approx(hand + compute, rel=1e-12)


def test_modelled_client_seconds_against_a_hand_computation():
    """sim_seconds of a client under a built-in (modelled) profile: 3 × forward FLOPs of its live
    weights for each sample processed at the profile's FLOP rate, plus its bytes over the links.

    mnistnet, forward FLOPs of one sample (2 × MACs) and the live weights of a mask:
      conv1 2·(10·24·24·1·25) =   288,000 for 250 weights; 100 live (0.4)    →   115,200
      conv2 2·(20·18·18·10·25) = 3,240,000 for 5,000;    2,500 live (0.5)    → 1,620,000
      fc1   2·5120·50 =            512,000 for 256,000; 25,600 live (0.1)    →    51,200
      fc2   2·50·10 =                1,000 for 500;        all live (1.0)    →     1,000
      dense 4,041,000; masked 1,787,400.
    137 samples: 3·137 = 411 passes. Upload 123,456 B, download 654,321 B.
      laptop: 20e9 FLOP/s, 20 Mbit/s = 2.5e6 B/s up, 100 Mbit/s = 12.5e6 B/s down:
        links 123,456/2.5e6 + 654,321/12.5e6 = 0.0493824 + 0.05234568 = 0.10172808
        dense 411·4,041,000/20e9 = 0.08304255 → 0.18477063; masked 411·1,787,400/20e9 = 0.03673107 → 0.13845915
      raspberry-pi-4: 1.5e9 FLOP/s, 10 Mbit/s = 1.25e6 B/s up, 50 Mbit/s = 6.25e6 B/s down:
        links 0.0987648 + 0.10469136 = 0.20345616
        dense 1.107234 → 1.31069016; masked 0.4897476 → 0.69320376
    """
    info = model_info("mnistnet", (1, 28, 28), 10)
    masked = {"conv1.weight": 0.4, "conv2.weight": 0.5, "fc1.weight": 0.1, "fc2.weight": 1.0}
    for name, dense, sparse in (("laptop", 0.18477063, 0.13845915), ("raspberry-pi-4", 1.31069016, 0.69320376)):
        timing = RunTiming(info, PROFILES[name])
        assert timing.client_seconds(3, 137, None, 123_456, 654_321) == pytest.approx(dense, rel=1e-12), name
        assert timing.client_seconds(3, 137, masked, 123_456, 654_321) == pytest.approx(sparse, rel=1e-12), name


def test_tier_profiles_follow_the_tiers_of_the_tiered_algorithms():
    from fedmpi.tiers import tier_of_clients

    info = model_info(*MLP, num_clients=12)
    cfg = load_config(None, ["tiers.mix=[1, 1, 2]", "device.tier_profiles=[raspberry-pi-4, phone-lte, laptop]",
                             "seed=3", "model=mlp"])
    timing = RunTiming.from_config(cfg, info)
    tiers = tier_of_clients(12, [1, 1, 2], 3)
    for c in range(12):
        assert timing.profile_of(c).name == ["raspberry-pi-4", "phone-lte", "laptop"][tiers[c]]
    assert timing.profile_of(None).name == "laptop"      # device.profile
    slow = [c for c in range(12) if tiers[c] == 0][0]
    fast = [c for c in range(12) if tiers[c] == 2][0]
    assert timing.client_seconds(slow, 100, None, 1000, 1000) > timing.client_seconds(fast, 100, None, 1000, 1000)


# ------------------------------------------------------------------------------ config and files
def test_measured_profile_loads_and_must_match_the_model(tmp_path):
    info = model_info(*MLP)
    path = write_profile(tmp_path / "mlp.yaml", synthetic_profile(info))
    cfg = load_config(None, [f"device.profile={path}", "model=mlp", "data.name=synthetic"])
    profile = load_profile(cfg["device"]["profile"])
    assert isinstance(profile, MeasuredProfile) and profile.layers["fc1.weight"].sparse.slope == 1e-6
    RunTiming.from_config(cfg, info)
    other = model_info("mlp", (60,), 3)
    with pytest.raises(ConfigError, match=str(path)):
        RunTiming.from_config(cfg, other)
    # auto kernels need a measured profile: here it is one
    assert load_config(None, [f"device.profile={path}", "device.sparse_kernels=auto"])
    policy = RunTiming.from_config(load_config(None, [f"device.kernel_profile={path}", "device.sparse_kernels=auto"]),
                                   info).kernel_policy()
    assert policy.mode == "auto" and policy.break_even["fc1.weight"] == pytest.approx(0.25)
    assert RunTiming.from_config(cfg, info).kernel_policy() is None          # off: dense kernels only


def _damaged(tmp_path) -> dict[str, Path]:
    info = model_info(*MLP)
    good = profile_document(synthetic_profile(info))
    cases = {"missing": tmp_path / "nowhere" / "p.yaml"}

    def case(name, doc=None, text=None):
        p = tmp_path / f"{name}.yaml"
        p.write_text(text if text is not None else yaml.safe_dump(doc))
        cases[name] = p

    case("not_yaml", text="format: [fedmpi\nlayers: {")
    case("not_mapping", text="- 1\n- 2\n")
    case("wrong_format", {**good, "format": "other/2"})
    case("no_layers", {**good, "layers": {}})
    bad_layer = json.loads(json.dumps(good))
    del bad_layer["layers"]["fc2.weight"]["dense"]
    case("layer_without_dense", bad_layer)
    negative = json.loads(json.dumps(good))
    negative["layers"]["fc1.weight"]["sparse"]["slope"] = -1.0
    case("negative_slope", negative)
    case("zero_bandwidth", {**good, "uplink_bytes_per_second": 0})
    beyond = json.loads(json.dumps(good))
    beyond["layers"]["fc1.weight"]["break_even"] = 1.5
    case("break_even_above_1", beyond)
    return cases


def test_bad_profile_files_are_config_errors_naming_the_file(tmp_path):
    for name, path in _damaged(tmp_path).items():
        for key, override in (("device.profile", f"device.profile={path}"),
                              ("device.tier_profiles[1]", f"device.tier_profiles=[laptop, {path}, laptop]"),
                              ("device.kernel_profile", f"device.kernel_profile={path}")):
            with pytest.raises(ConfigError) as err:
                load_config(None, [override])
            assert err.value.exit_code == 2 and str(path) in str(err.value) and key in str(err.value), (name, err.value)
    with pytest.raises(ConfigError, match="unknown profile 'rpi'"):
        load_config(None, ["device.profile=rpi"])
    with pytest.raises(ConfigError, match="device.sparse_kernels"):
        load_config(None, ["device.sparse_kernels=auto"])          # laptop is modelled
    with pytest.raises(ConfigError, match="device.kernel_profile"):
        load_config(None, ["device.kernel_profile=laptop"])
    with pytest.raises(ConfigError, match="one profile per tier"):
        load_config(None, ["device.tier_profiles=[laptop]"])
    assert DEFAULTS["device"]["sparse_kernels"] == "off"


def test_fedmpi_profile_writes_a_loadable_file(tmp_path):
    from fedmpi.cli import main

    out = tmp_path / "profiles" / "tiny.yaml"
    argv = ["profile", "--model", "mlp", "--data-shape", "60", "--classes", "10", "--batch-size", "4",
            "--densities", "0.2,1", "--repeats", "1", "--min-time", "0.0001", "--quiet", "--out", str(out)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    assert "fc1.weight" in stdout.getvalue()
    profile = load_profile(str(out))
    info = model_info(*MLP)
    assert profile.model == "mlp" and profile.batch_size == 4 and set(profile.layers) == set(info.maskable)
    assert all(layer.sparse is not None and 0 <= layer.break_even <= 1 for layer in profile.layers.values())
    assert profile.uplink_bytes_per_second == PROFILES["laptop"].uplink_bytes_per_second
    tm = TimeModel.for_profile(profile, info, steps_per_round=5, batch_size=4)
    assert tm.round_seconds() > 0 and all(t > 0 for t in tm.t.values())
    assert load_config(None, [f"device.profile={out}", "model=mlp"])["device"]["profile"] == str(out)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(argv) == 2                       # exists: needs --force
    assert "--force" in err.getvalue()


# ------------------------------------------------------------------------------ end to end
TINY = {"data": {"name": "synthetic", "partition": "natural"}, "model": "mlp",
        "clients": {"total": 8, "per_round": 4}, "rounds": 2, "local": {"epochs": 1, "batch_size": 16, "lr": 0.05},
        "algorithm": "fedavg", "eval": {"every": 1}}



@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """fedmpi run, in one interpreter: a measured profile, tier profiles, and bad profiles."""
    work = tmp_path_factory.mktemp("timing_runs")
    cfg = work / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    info = model_info(*MLP)
    good = write_profile(work / "mlp.yaml", synthetic_profile(info, str(work / "mlp.yaml")))
    other = model_info("femnist_cnn", (1, 28, 28), 10)
    foreign = profile_document(MeasuredProfile(
        "cnn", "", "femnist_cnn", (1, 28, 28), 10, 20, 0.0,
        {n: MeasuredLayer(other.shapes[n], LayerLine(1e-3, 0.0)) for n in other.maskable}, 1e6, 1e6))
    (work / "cnn.yaml").write_text(yaml.safe_dump(foreign))
    cases = {
        "measured": ["--set", f"device.profile={good}"],
        "tiers": ["--set", "device.tier_profiles=[raspberry-pi-4, phone-lte, laptop]"],   # tiers.mix [1, 1, 1]
        "laptop": [],
        "sparse_auto": ["--set", f"device.profile={good}", "--set", "device.sparse_kernels=auto"],
    }
    damaged = _damaged(work)
    for name in ("missing", "not_yaml", "layer_without_dense"):
        cases[f"bad_{name}"] = ["--set", f"device.profile={damaged[name]}"]
    cases["bad_model"] = ["--set", f"device.profile={work / 'cnn.yaml'}"]
    argvs = [["run", str(cfg), "--quiet", "--force", "--out", str(work / f"{name}.h5"), *extra]
             for name, extra in cases.items()]
    (work / "argv.json").write_text(json.dumps(argvs))
    (work / "batch.py").write_text(BATCH_SCRIPT)
    proc = subprocess.run([sys.executable, str(work / "batch.py"), str(work / "argv.json")], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return work, dict(zip(cases, results)), {"good": good, "cnn": work / "cnn.yaml", **damaged}


def _clients(path: Path) -> dict:
    with h5py.File(path, "r") as f:
        return {k: f["clients"][k][:] for k in f["clients"]}, {k: f["rounds"][k][:] for k in f["rounds"]}


@pytest.mark.slow
def test_sim_seconds_of_a_run_follow_its_measured_profile(e2e):
    work, results, _ = e2e
    assert results["measured"]["rc"] == 0, results["measured"]["stderr"]
    clients, rounds = _clients(work / "measured.h5")
    info = model_info(*MLP)
    profile = synthetic_profile(info)
    per_step = profile.other_seconds + sum(min(l.dense(l.numel), l.sparse(l.numel)) if l.sparse else l.dense(l.numel)
                                           for l in profile.layers.values())
    hand = (0.5 + 0.02 + clients["num_samples"] / profile.batch_size * per_step
            + clients["upload_bytes"] / 1e6 + clients["download_bytes"] / 4e6)
    np.testing.assert_allclose(clients["sim_seconds"], hand, rtol=1e-12)
    for r in np.unique(clients["round"]):
        assert rounds["sim_seconds"][r - 1] == clients["sim_seconds"][clients["round"] == r].max()
    # the same run under the laptop profile: every other metric bit for bit, sim_seconds not
    base, base_rounds = _clients(work / "laptop.h5")
    for key in ("train_loss", "upload_bytes", "download_bytes", "train_flops", "num_samples"):
        assert clients[key].tobytes() == base[key].tobytes(), key
    assert rounds["test_accuracy"].tobytes() == base_rounds["test_accuracy"].tobytes()
    flops_model = (base["train_flops"] / 20e9 + base["upload_bytes"] / (20 * MBIT)
                   + base["download_bytes"] / (100 * MBIT))
    np.testing.assert_allclose(base["sim_seconds"], flops_model, rtol=1e-9)


@pytest.mark.slow
def test_sim_seconds_per_tier_profile(e2e):
    from fedmpi.tiers import tier_of_clients

    work, results, _ = e2e
    assert results["tiers"]["rc"] == 0, results["tiers"]["stderr"]
    clients, _ = _clients(work / "tiers.h5")
    tiers = tier_of_clients(8, [1, 1, 1], 0)
    # per tier: FLOP/s, uplink and downlink bytes/s (10/50, 5/20, 20/100 Mbit/s)
    rates = [(1.5e9, 1.25e6, 6.25e6), (5e9, 0.625e6, 2.5e6), (20e9, 2.5e6, 12.5e6)]
    assert len({int(tiers[c]) for c in clients["client_id"]}) > 1   # the rows cover several tiers
    for c, flops, up, down, sim in zip(clients["client_id"], clients["train_flops"], clients["upload_bytes"],
                                       clients["download_bytes"], clients["sim_seconds"]):
        flop_rate, uplink, downlink = rates[tiers[c]]
        assert sim == pytest.approx(flops / flop_rate + up / uplink + down / downlink, rel=1e-9)


@pytest.mark.slow
def test_sparse_kernels_auto_runs_and_changes_no_metric_beyond_rounding(e2e):
    work, results, _ = e2e
    assert results["sparse_auto"]["rc"] == 0, results["sparse_auto"]["stderr"]
    a, ra = _clients(work / "sparse_auto.h5")
    b, rb = _clients(work / "measured.h5")
    assert a["sim_seconds"].tobytes() == b["sim_seconds"].tobytes()   # fedavg: no masks, nothing sparse
    assert ra["test_accuracy"].tobytes() == rb["test_accuracy"].tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "not_yaml", "layer_without_dense", "cnn"])
def test_bad_profile_file_exits_2_naming_it(e2e, case):
    work, results, paths = e2e
    res = results["bad_model" if case == "cnn" else f"bad_{case}"]
    assert res["rc"] == 2, res["stderr"]
    assert str(paths[case]) in res["stderr"] and "device.profile" in res["stderr"], res["stderr"]
    assert "Traceback" not in res["stderr"]
