"""Pooled exit heads (``multiexit_vgg_pooled``, ``multiexit_vgg_small_pooled``): each exit averages
its input over the positions before the linear layer; the default models stay as they were."""
import numpy as np
import pytest
import torch

from helpers import fedmpi, read_results

from fedmpi.models import build_model, count_parameters
from fedmpi.models.flops import layer_flops
from fedmpi.models.multiexit import ExitHead

torch.set_num_threads(1)

SMALL = (8, 16, 32, 64)        # multiexit_vgg_small on 28x28: the spec's 32/64/128/256 / 4
SPEC = (32, 64, 128, 256)


def block_parameters(c_in: int, c_out: int, kernel: int = 9) -> int:
    """Two convs (weights and biases) and two batch norms (weight and bias)."""
    return (c_in * c_out * kernel + c_out) + 2 * c_out + (c_out * c_out * kernel + c_out) + 2 * c_out


def expected_parameters(channels, level, *, in_channels=1, classes=10, positions=(49, 9, 1), kernel=9,
                        pooled=True) -> int:
    """Blocks 0..level and exits 1..level; a pooled exit reads one value per channel."""
    blocks = sum(block_parameters(c_in, c_out, kernel)
                 for c_in, c_out in zip((in_channels, *channels), channels[:level + 1]))
    heads = sum(channels[b] * (1 if pooled else positions[b - 1]) * classes + classes for b in range(1, level + 1))
    return blocks + heads


def test_pooled_head_is_the_mean_over_positions_then_linear():
    head = ExitHead(2, 3, pool=True).eval()
    with torch.no_grad():
        head.linear.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
        head.linear.bias.copy_(torch.tensor([0.0, 1.0, 2.0]))
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[10.0, 20.0], [30.0, 40.0]]]])   # channel means 2.5, 25
    assert head(x).tolist() == [[2.5, 26.0, -20.5]]
    # 1-D (time series): the mean over the samples
    assert head(torch.tensor([[[1.0, 3.0], [10.0, 30.0]]])).tolist() == [[2.0, 21.0, -16.0]]


def test_every_exit_of_the_pooled_model_reads_its_blocks_channel_means():
    torch.manual_seed(0)
    model = build_model("multiexit_vgg_small_pooled", (1, 28, 28), 10).eval()
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        logits = model(x)
        features = model.blocks[0](x)
        for b in range(1, 4):
            features = model.blocks[b](features)
            assert features.shape[1:] == (SMALL[b], *(2 * (28 // 2 ** (b + 1),)))
            means = features.double().sum(dim=(2, 3)) / (features.shape[2] * features.shape[3])
            head = model.exits[b - 1].linear
            by_hand = means @ head.weight.double().T + head.bias.double()
            assert torch.allclose(logits[b - 1].double(), by_hand, atol=1e-5), b


@pytest.mark.parametrize("name, channels, counts", [
    ("multiexit_vgg_small_pooled", SMALL, (4_418, 18_764, 75_094)),
    ("multiexit_vgg_pooled", SPEC, (66_026, 289_268, 1_178_110)),
])
def test_pooled_parameter_counts_at_each_level_by_hand(name, channels, counts):
    for level, count in enumerate(counts, start=1):
        assert expected_parameters(channels, level) == count
        assert count_parameters(build_model(name, (1, 28, 28), 10, level=level)) == count
    # width 0.5: every hidden layer and the pooled heads' inputs halve
    half = tuple(c // 2 for c in channels)
    assert count_parameters(build_model(name, (1, 28, 28), 10, width=0.5)) == expected_parameters(half, 3)
    # time series (3 x 151, 1-D convs of 3 taps; a side of 64 or more doubles the channels): a pooled
    # head reads the channels whatever the length
    series = count_parameters(build_model(name, (3, 151), 6, level=2))
    wide = tuple(2 * c for c in channels)
    assert series == expected_parameters(wide, 2, in_channels=3, classes=6, kernel=3)


@pytest.mark.parametrize("default, pooled, channels", [
    ("multiexit_vgg", "multiexit_vgg_pooled", SPEC),
    ("multiexit_vgg_small", "multiexit_vgg_small_pooled", SMALL),
])
def test_default_models_unchanged_and_pooling_changes_only_the_heads_inputs(default, pooled, channels):
    for level in (1, 2, 3):
        for variant in ({}, {"width": 0.5, "track_running_stats": False, "scaler": True}, {"exits": "last"}):
            torch.manual_seed(level)
            plain = build_model(default, (1, 28, 28), 10, level=level, **variant).state_dict()
            torch.manual_seed(level)
            averaged = build_model(pooled, (1, 28, 28), 10, level=level, **variant).state_dict()
            assert list(plain) == list(averaged)   # same names, same order: checkpoints and slices line up
            for name, tensor in plain.items():
                if name.startswith("exits.") and name.endswith("linear.weight"):
                    b = int(name.split(".")[1]) + 1
                    width_channels = averaged[name].shape[1]
                    assert tensor.shape[1] == width_channels * (49, 9, 1)[b - 1], name
                elif not name.startswith("exits."):
                    assert torch.equal(tensor, averaged[name]), name   # blocks drawn first, identically
                else:
                    assert tensor.shape == averaged[name].shape, name
        # the default network's parameter count (multiexit.py's docstring for the spec's channels)
        assert count_parameters(build_model(default, (1, 28, 28), 10, level=level)) == \
            expected_parameters(channels, level, pooled=False)
    assert [count_parameters(build_model("multiexit_vgg", (1, 28, 28), 10, level=lv)) for lv in (1, 2, 3)] == \
        [96_746, 330_228, 1_219_070]


def test_pooled_heads_flops_are_channels_times_classes():
    plain = layer_flops(build_model("multiexit_vgg_small", (1, 28, 28), 10), (1, 28, 28))
    pooled = layer_flops(build_model("multiexit_vgg_small_pooled", (1, 28, 28), 10), (1, 28, 28))
    assert list(plain) == list(pooled)
    for name in plain:
        if name.startswith("exits."):
            b = int(name.split(".")[1]) + 1
            assert pooled[name] == 2 * SMALL[b] * 10
            assert plain[name] == 2 * SMALL[b] * (49, 9, 1)[b - 1] * 10
        else:
            assert pooled[name] == plain[name], name


def pooled_sizes(**variant) -> int:
    """Values of every floating-point tensor of the pooled small model's ``variant``."""
    model = build_model("multiexit_vgg_small_pooled", (1, 28, 28), 10, **variant)
    return sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())


# level of a tier-t client's download under each depth method (None: its tier's level)
DEPTH_LEVELS = {"hypemefed": None, "depthwise_avg": None, "depthfl": None, "fedavg_s": 1,
                "fedavg_capable": 3, "fedavg": 3}


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", [*DEPTH_LEVELS, "heterofl", "scalefl"])
def test_every_tiered_method_runs_on_the_pooled_model(algorithm, tiered_cfg, tmp_path):
    out = tmp_path / f"{algorithm}.h5"
    proc, _ = fedmpi(["run", str(tiered_cfg), "--out", str(out), "--quiet", "--set", f"algorithm={algorithm}",
                      "--set", "model=multiexit_vgg_small_pooled", "--set", "rounds=1"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(out)
    rounds, clients = res["rounds"], res["clients"]
    assert np.all(np.isfinite(rounds["client_accuracy"])) and np.all(np.isfinite(rounds["test_accuracy"]))
    assert len(clients["client_id"]) > 0
    tiers = clients["tier"] if "tier" in clients else np.full(len(clients["client_id"]), 3)   # fedavg: untiered
    for tier, download in zip(tiers, clients["download_bytes"]):
        # every download is the pooled submodel the client trains, exactly (4 bytes a value)
        if algorithm in DEPTH_LEVELS:
            expected = pooled_sizes(level=DEPTH_LEVELS[algorithm] or int(tier))
        elif algorithm == "heterofl":   # full depth, tiers.widths, one classifier, no BN statistics
            expected = pooled_sizes(width=(0.25, 0.5, 1.0)[tier - 1], exits="last", track_running_stats=False)
        else:                           # scalefl: width and depth together, at most the full model
            assert download <= 4 * pooled_sizes()
            continue
        assert download == 4 * expected, (algorithm, tier)
