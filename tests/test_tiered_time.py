"""Heterogeneous time: a tiered client reports, for every maskable layer of the full model, the
share of that layer's weights its submodel holds (0 for layers it lacks), so ``train_flops`` and
``sim_seconds`` are its submodel's, not the full model's; under ``device.tier_profiles`` each tier
runs on its own device and the round's ``sim_seconds`` is the straggler's."""
from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from fedmpi.algorithms import ClientTask, ModelInfo
from fedmpi.algorithms.depthfl import DepthFL
from fedmpi.algorithms.heterofl import HeteroFL
from fedmpi.algorithms.heterogeneous import DepthwiseAveraging, FedAvgS
from fedmpi.algorithms.hypemefed import HypeMeFed
from fedmpi.algorithms.scalefl import ScaleFL
from fedmpi.config import load_config
from fedmpi.models import build_model, maskable_parameter_names
from fedmpi.models.flops import layer_flops, scale_flops
from fedmpi.timing import nnz_of_densities
from helpers import fedmpi, read_results, write_idx

ALGORITHMS = {"depthfl": DepthFL, "depthwise_avg": DepthwiseAveraging, "fedavg_s": FedAvgS, "heterofl": HeteroFL,
              "scalefl": ScaleFL, "hypemefed": HypeMeFed}
SHAPES = [("multiexit_vgg_small", (1, 28, 28)), ("multiexit_vgg", (3, 32, 32)), ("multiexit_vgg", (3, 151))]


def model_info(model: str, input_shape: tuple, num_clients: int = 9) -> ModelInfo:
    full = build_model(model, input_shape, 10)
    shapes = {n: tuple(t.shape) for n, t in full.state_dict().items() if t.is_floating_point()}
    return ModelInfo(shapes, maskable_parameter_names(full), layer_flops(full, input_shape),
                     num_clients=num_clients, model=model, input_shape=input_shape, num_classes=10)


class EchoTrainer:
    """Returns what it was sent: local_update's bookkeeping without training."""

    def train(self, values, x, y, **_):
        return dict(values), 0.5, 2 * len(y)


@pytest.mark.parametrize("model,input_shape", SHAPES)
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_reported_densities_give_the_submodels_flops(algorithm, model, input_shape):
    info = model_info(model, input_shape)
    cfg = load_config(None, [f"algorithm={algorithm}", f"model={model}", "clients.total=9", "clients.per_round=6"])
    alg = ALGORITHMS[algorithm](cfg, info)
    alg.weights = {n: np.zeros(s, np.float32) for n, s in info.shapes.items()}   # no hypernetworks needed
    numel = {n: math.prod(info.shapes[n]) for n in info.maskable}
    for tier in range(3):
        client = int(np.flatnonzero(alg.tier == tier)[0])
        task = ClientTask(1, client, alg.download(1, client), {}, None, np.zeros(7), seed=0)
        result = alg.local_update(task, EchoTrainer())
        variant = build_model(model, input_shape, 10, **alg.variants[tier])
        own = {n: t.numel() for n, t in variant.state_dict().items() if n in numel}
        expected_flops = sum(layer_flops(variant, input_shape).values())
        if own == numel:      # the full model: dense, as before
            assert result.densities is None
            assert scale_flops(info.layer_flops) == expected_flops
            continue
        assert set(result.densities) == set(info.maskable)
        assert nnz_of_densities(numel, result.densities) == {n: own.get(n, 0) for n in numel}
        # Σ_l flops_full[l]·density[l] is the variant's own count, exactly
        assert scale_flops(info.layer_flops, result.densities) == expected_flops, (algorithm, tier)
        assert expected_flops < scale_flops(info.layer_flops)
        assert result.metrics["tier"] == tier + 1 and result.samples_processed == 14


# ------------------------------------------------------------------------------ end to end
TIER_PROFILES = ["raspberry-pi-4", "jetson-nano", "laptop"]


@pytest.fixture(scope="module")
def timed_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiered_time")
    cfg = {
        "seed": 1, "rounds": 1, "model": "multiexit_vgg_small",
        "data": {"name": "mnist", "root": str(write_idx(work / "mnist", n_train=120, n_test=30)),
                 "partition": "iid"},
        "clients": {"total": 6, "per_round": 6},
        "local": {"epochs": 2, "batch_size": 20, "lr": 0.001, "optimizer": "adam"},
        "eval": {"every": 1, "batch_size": 30},
        "device": {"tier_profiles": TIER_PROFILES},
    }
    path = work / "tiered.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cache = {}

    def get(algorithm: str):
        if algorithm not in cache:
            out = work / f"{algorithm}.h5"
            proc, _ = fedmpi(["run", str(path), "--out", str(out), "--quiet", "--set", f"algorithm={algorithm}"],
                             timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            cache[algorithm] = read_results(out)
        return cache[algorithm]

    return get


# Forward FLOPs of one sample (2 × MACs of the convs and exit linears) of each tier's submodel of
# multiexit_vgg_small on 1x28x28 (channels 8/16/32/64; 3x3 convs keep the side, pools halve it:
# 28, 14, 7, 3; a conv's MACs = c_out·c_in·9·side², an exit's = c·side²·10), worked out by hand:
#   block 0 (1→8, 28²):   8·1·9·784 + 8·8·9·784    =  56,448 + 451,584
#   block 1 (8→16, 14²):  16·8·9·196 + 16·16·9·196 = 225,792 + 451,584;  exit 1: 16·49·10 = 7,840
#   block 2 (16→32, 7²):  32·16·9·49 + 32·32·9·49  = 225,792 + 451,584;  exit 2: 32·9·10  = 2,880
#   block 3 (32→64, 3²):  64·32·9·9 + 64·64·9·9    = 165,888 + 331,776;  exit 3: 64·10    =   640
#   level 1: 1,193,248 MACs; level 2: + 680,256 = 1,873,504; level 3: + 498,304 = 2,371,808
# width p keeps ceil(p·c) channels: 0.25 → 2/4/8/16, 0.5 → 4/8/16/32 (every conv term is p² as
# large, except block 0's conv1 and the exit, p), and HeteroFL's client holds exit 3 only:
#   0.25: 14,112 + 28,224 + 14,112 + 28,224 + 14,112 + 28,224 + 10,368 + 20,736 + 160 = 158,272
#   0.5:  28,224 + 112,896 + 56,448 + 112,896 + 56,448 + 112,896 + 41,472 + 82,944 + 320 = 604,544
#   1.0:  2,371,808 − 7,840 − 2,880 = 2,361,088
FORWARD_FLOPS = {("level", 1): 2 * 1_193_248, ("level", 2): 2 * 1_873_504, ("level", 3): 2 * 2_371_808,
                 ("width", 0.25): 2 * 158_272, ("width", 0.5): 2 * 604_544, ("width", 1.0): 2 * 2_361_088}
# tier t's device (TIER_PROFILES): FLOP/s, uplink and downlink bytes/s (Mbit/s × 1e6 / 8)
DEVICES = {1: (1.5e9, 1.25e6, 6.25e6),        # raspberry-pi-4: 10 / 50 Mbit/s
           2: (10e9, 1.25e6, 6.25e6),         # jetson-nano: 10 / 50 Mbit/s
           3: (20e9, 2.5e6, 12.5e6)}          # laptop: 20 / 100 Mbit/s


# Slowest tier first. Per client (20 samples, 2 epochs: 3 × 40 = 120 forward-pass equivalents),
# compute + communication in seconds:
#   depthfl  level 1 on the Pi 120·2,386,496/1.5e9 = 0.191 + 0.047, level 2 on the Nano 0.045 + 0.112,
#            level 3 on the laptop 0.029 + 0.165: the Pi is the straggler, then the laptop (its bigger
#            upload), then the Nano;
#   heterofl width 0.25 on the Pi 0.025 + 0.019, 0.5 on the Nano 0.015 + 0.073, 1.0 on the laptop
#            0.028 + 0.143: the laptop is the straggler. Charged the full model's FLOPs
#            (120·4,743,616/1.5e9 = 0.379), the Pi's client would take 0.40 s and be the straggler.
@pytest.mark.slow
@pytest.mark.parametrize("algorithm,variant,values,slowest_first", [
    ("depthfl", "level", [1, 2, 3], [1, 3, 2]),
    ("heterofl", "width", [0.25, 0.5, 1.0], [3, 2, 1]),
])
def test_each_tier_is_timed_on_its_device_with_its_submodel(timed_runs, algorithm, variant, values, slowest_first):
    res = timed_runs(algorithm)
    clients, rounds = res["clients"], res["rounds"]
    assert sorted(clients["tier"].tolist()) == [1, 1, 2, 2, 3, 3]
    assert set(clients["num_samples"].tolist()) == {20}             # iid: 120 samples / 6 clients
    for row in range(len(clients["client_id"])):
        tier = int(clients["tier"][row])
        forward = FORWARD_FLOPS[variant, values[tier - 1]]
        assert clients["train_flops"][row] == 3 * 40 * forward, (tier, row)
        flops_per_second, uplink, downlink = DEVICES[tier]
        communication = clients["upload_bytes"][row] / uplink + clients["download_bytes"][row] / downlink
        hand = 3 * 40 * forward / flops_per_second + communication
        assert clients["sim_seconds"][row] == pytest.approx(hand, rel=1e-9), (tier, row)
    by_tier = {t: clients["sim_seconds"][clients["tier"] == t] for t in (1, 2, 3)}
    for slower, faster in zip(slowest_first, slowest_first[1:]):
        assert by_tier[slower].min() > by_tier[faster].max(), (slower, faster, by_tier)
    # the round waits for its straggler
    assert rounds["sim_seconds"][0] == clients["sim_seconds"].max() == by_tier[slowest_first[0]].max()
    assert rounds["train_flops"][0] == clients["train_flops"].sum()
