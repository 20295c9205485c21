"""Model registry, variants, parameter counts, maskable names and analytic FLOP counts."""
import pytest
import torch
from torch import nn

from fedmpi.errors import ConfigError
from fedmpi.models import MODELS, build_model, count_parameters, maskable_parameter_names, variant_options
from fedmpi.models.multiexit import hidden_channels
from fedmpi.models.flops import layer_flops, scale_flops

torch.set_num_threads(1)

# (model name, input shape, classes) for each registered single-output model on a dataset it fits.
CASES = [
    ("mnistnet", (1, 28, 28), 10),
    ("cifar10net", (3, 32, 32), 10),
    ("femnist_cnn", (1, 28, 28), 62),
    ("vgg11", (3, 32, 32), 10),
    ("mlp", (60,), 10),
]
MULTI_EXIT = "multiexit_vgg"


def conv_macs(c_in, c_out, k, out_hw):
    """MACs of a k x k conv producing c_out x out_hw x out_hw: each output reads c_in*k*k weights."""
    return c_out * out_hw * out_hw * c_in * k * k


def test_registry_holds_the_promised_names():
    assert set(MODELS) >= {"mnistnet", "cifar10net", "femnist_cnn", "vgg11", "multiexit_vgg", "mlp"}
    builtin = {name for name in MODELS if MODELS.origin(name).source == "builtin"}   # plug-ins aside
    assert {name for name, _, _ in CASES} | {MULTI_EXIT, "multiexit_vgg_small", "multiexit_vgg_pooled",
                                               "multiexit_vgg_small_pooled"} == builtin
    assert variant_options(MULTI_EXIT) == variant_options("multiexit_vgg_small") == (
        "level", "width", "track_running_stats", "scaler", "exits")
    assert all(variant_options(name) == () for name, _, _ in CASES)


def test_feddst_parameter_counts_match_the_paper():
    assert count_parameters(build_model("mnistnet", (1, 28, 28), 10)) == 261_840
    assert count_parameters(build_model("cifar10net", (3, 32, 32), 10)) == 782_006


def test_femnist_cnn_parameter_count_matches_leaf():
    # LEAF CNN on FEMNIST (62 classes): PruneFL quotes ~6.6 M parameters.
    expected = (1 * 32 * 25 + 32) + (32 * 64 * 25 + 64) + (64 * 7 * 7 * 2048 + 2048) + (2048 * 62 + 62)
    assert expected == 6_603_710
    assert count_parameters(build_model("femnist_cnn", (1, 28, 28), 62)) == expected
    # Channel count is free: only conv1 grows.
    assert count_parameters(build_model("femnist_cnn", (3, 28, 28), 62)) == expected + 2 * 32 * 25
    # 10 classes (MNIST-like): the last layer shrinks by 52 rows.
    assert count_parameters(build_model("femnist_cnn", (1, 28, 28), 10)) == expected - 52 * 2049 == 6_497_162


def conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


def test_vgg11_parameter_count_matches_prunefl():
    convs = sum(conv_params(c_in, c_out, 3) for c_in, c_out in [
        (3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)])
    assert convs == 9_220_480
    classifier = (512 * 512 + 512) * 2 + 512 * 10 + 10  # 512 -> 512 -> 512 -> 10
    # PruneFL paper: 9.75 M parameters.
    assert count_parameters(build_model("vgg11", (3, 32, 32), 10)) == convs + classifier == 9_750_922
    # No batch-norm: the state_dict is exactly the parameters.
    model = build_model("vgg11", (3, 32, 32), 10)
    assert list(model.state_dict()) == [name for name, _ in model.named_parameters()]


def test_mlp_sizes_follow_the_input():
    model = build_model("mlp", (60,), 10)
    assert count_parameters(model) == (60 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10)
    image_mlp = build_model("mlp", (3, 32, 32), 100)
    assert image_mlp(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("name,shape,classes", CASES)
def test_outputs_are_logits_of_shape_batch_by_classes(name, shape, classes):
    torch.manual_seed(0)
    model = build_model(name, shape, classes)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, classes)
    # A softmax output would be non-negative with rows summing to 1.
    assert (out < 0).any()
    assert not torch.allclose(out.sum(dim=1), torch.ones(5), atol=1e-3)


# Maskable weights of each CASES model, read off fedmpi/models/nets.py, in state_dict order, and
# their element count by hand (out·in·k·k a conv, out·in a Linear):
MASKABLE_BY_HAND = {
    # 1·10·25 + 10·20·25 + 5120·50 + 50·10 = 250 + 5,000 + 256,000 + 500
    "mnistnet": (["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"], 261_750),
    # 3·6·25 + 6·16·25 + 6400·120 + 120·84 + 84·10 = 450 + 2,400 + 768,000 + 10,080 + 840
    "cifar10net": (["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"], 781_770),
    # 1·32·25 + 32·64·25 + 3136·2048 + 2048·62 = 800 + 51,200 + 6,422,528 + 126,976
    "femnist_cnn": (["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"], 6_601_504),
    # convs 9·(3·64 + 64·128 + 128·256 + 256·256 + 256·512 + 3·512·512) = 9,217,728;
    # FCs 512·512 + 512·512 + 512·10 = 529,408
    "vgg11": ([f"convs.{i}.weight" for i in range(8)] + ["fc1.weight", "fc2.weight", "fc3.weight"], 9_747_136),
    # 60·200 + 200·200 + 200·10 = 12,000 + 40,000 + 2,000
    "mlp": (["fc1.weight", "fc2.weight", "fc3.weight"], 54_000),
}


@pytest.mark.parametrize("name,shape,classes", CASES)
def test_maskable_names_are_exactly_the_conv_and_linear_weights(name, shape, classes):
    model = build_model(name, shape, classes)
    names, maskable_elements = MASKABLE_BY_HAND[name]
    assert maskable_parameter_names(model) == names
    state = model.state_dict()
    assert sum(state[n].numel() for n in names) == maskable_elements
    # everything else is a bias: one per maskable weight, as many elements as its output units
    assert sorted(k for k in state if k not in names) == sorted(n.replace(".weight", ".bias") for n in names)
    assert sum(state[n].shape[0] for n in names) + maskable_elements == count_parameters(model)


def test_maskable_names_of_feddst_models():
    assert maskable_parameter_names(build_model("cifar10net", (3, 32, 32), 10)) == [
        "conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    assert maskable_parameter_names(build_model("mnistnet", (1, 28, 28), 10)) == [
        "conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]


def test_maskable_names_skip_norm_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    assert maskable_parameter_names(model) == ["0.weight", "3.weight"]


def test_linear_forward_flops_by_hand():
    model = nn.Linear(784, 10)
    assert layer_flops(model, (784,)) == {"weight": 2 * 784 * 10}


def test_conv_forward_flops_by_hand():
    # 3 -> 8 channels, 3x3 kernel, stride 2, padding 1 on 16x16: output 8x8x8.
    model = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    assert layer_flops(model, (3, 16, 16)) == {"weight": 2 * conv_macs(3, 8, 3, 8)}
    grouped = nn.Conv2d(4, 8, 3, groups=2)  # each output reads 2 input channels; 14x14 out
    assert layer_flops(grouped, (4, 16, 16)) == {"weight": 2 * conv_macs(2, 8, 3, 14)}


def test_cifar10net_dense_flops_equal_the_hand_sum():
    model = build_model("cifar10net", (3, 32, 32), 10)
    by_hand = {
        "conv1.weight": conv_macs(3, 6, 5, 32 - 4),           # 352,800 MACs
        "conv2.weight": conv_macs(6, 16, 5, (32 - 4 - 2) - 4),  # after pool(3,s1): 26 -> 22
        "fc1.weight": 16 * 20 * 20 * 120,
        "fc2.weight": 120 * 84,
        "fc3.weight": 84 * 10,
    }
    assert by_hand["conv1.weight"] == 352_800
    assert layer_flops(model, (3, 32, 32)) == {k: 2 * v for k, v in by_hand.items()}
    dense = scale_flops(layer_flops(model, (3, 32, 32)))   # what a dense client's train_flops counts
    assert dense == 2 * sum(by_hand.values())
    assert 4.5e6 < dense < 4.7e6  # FedDST paper: ~4.6 MFLOPs dense


def test_mnistnet_dense_flops_equal_the_hand_sum():
    model = build_model("mnistnet", (1, 28, 28), 10)
    by_hand = conv_macs(1, 10, 5, 24) + conv_macs(10, 20, 5, 18) + 5120 * 50 + 50 * 10
    assert scale_flops(layer_flops(model, (1, 28, 28))) == 2 * by_hand


def test_density_scales_each_layer():
    # cifar10net's dense FLOPs per layer (test_cifar10net_dense_flops_equal_the_hand_sum):
    # conv1 705,600, conv2 2,323,200, fc1 1,536,000, fc2 20,160, fc3 1,680; 4,586,640 in all
    dense = layer_flops(build_model("cifar10net", (3, 32, 32), 10), (3, 32, 32))
    assert scale_flops(dense) == 4_586_640
    assert scale_flops(dense, {"fc1.weight": 0.5}) == 4_586_640 - 768_000
    # every layer at 0.2: 141,120 + 464,640 + 307,200 + 4,032 + 336
    uniform = {name: 0.2 for name in dense}
    assert scale_flops(dense, uniform) == 917_328
    # rounded to whole FLOPs: 16 FLOPs at density 1/3 are 5.33, counted 5
    assert scale_flops(layer_flops(nn.Linear(4, 2), (4,)), {"weight": 1 / 3}) == 5
    assert scale_flops(layer_flops(nn.Linear(784, 10), (784,)), {"weight": 0.5}) == 784 * 10


def test_bad_densities_are_rejected():
    dense = layer_flops(nn.Linear(4, 2), (4,))
    with pytest.raises(ValueError, match="bias"):
        scale_flops(dense, {"bias": 0.5})
    with pytest.raises(ValueError, match="weight"):
        scale_flops(dense, {"weight": 1.5})


def test_flop_probe_leaves_training_mode_and_batchnorm_stats_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layer_flops(model, (1, 6, 6))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[0]._forward_hooks and not model[3]._forward_hooks


@pytest.mark.parametrize("name,shape,needs", [
    ("mnistnet", (3, 32, 32), "1x28x28"),
    ("cifar10net", (1, 28, 28), "3x32x32"),
    ("femnist_cnn", (3, 32, 32), "Cx28x28"),
    ("femnist_cnn", (60,), "Cx28x28"),
    ("vgg11", (1, 28, 28), "Cx32x32"),
    ("multiexit_vgg", (1, 15, 28), "sides >= 16"),
    ("multiexit_vgg", (60,), "sides >= 16"),
    ("multiexit_vgg", (1, 3, 32, 32), "sides >= 16"),
])
def test_incompatible_input_shape_is_a_config_error(name, shape, needs):
    with pytest.raises(ConfigError) as err:
        build_model(name, shape, 10)
    assert err.value.key == "model"
    assert needs in err.value.problem
    assert "x".join(map(str, shape)) in err.value.problem
    assert err.value.exit_code == 2


def test_shape_error_names_the_datasets_and_models_that_fit():
    with pytest.raises(ConfigError) as err:
        build_model("mnistnet", (3, 32, 32), 10)
    assert "fashion_mnist" in err.value.problem  # dataset that mnistnet needs
    assert "cifar10net" in err.value.problem    # model that takes 3x32x32


def test_unknown_model_is_a_config_error_listing_choices():
    with pytest.raises(ConfigError) as err:
        build_model("resnet9000", (3, 32, 32), 10)
    assert err.value.key == "model"
    assert "resnet9000" in err.value.problem and "cifar10net" in err.value.problem


@pytest.mark.parametrize("shape", [(), (0, 28, 28), (1, -28, 28), (1, 28.5, 28), None, ("1", 28, 28)])
def test_malformed_input_shape_is_a_config_error(shape):
    with pytest.raises(ConfigError) as err:
        build_model("mlp", shape, 10)
    assert err.value.key == "model"


@pytest.mark.parametrize("classes", [0, -3, 2.5, True])
def test_bad_class_count_is_a_config_error(classes):
    with pytest.raises(ConfigError):
        build_model("mlp", (60,), classes)


def test_shape_given_as_list_or_torch_size_is_accepted():
    assert count_parameters(build_model("mnistnet", [1, 28, 28], 10)) == 261_840
    assert count_parameters(build_model("mnistnet", torch.Size([1, 28, 28]), 10)) == 261_840


# --- multiexit_vgg: depth (level) and width (HeteroFL) variants ---------------------------------

NARROW = (32, 64, 128, 256)  # channels of blocks 0..3 for 28x28 / 32x32 inputs
WIDE = (64, 128, 256, 512)   # for 96x96 images and long (151-sample) series


def multiexit_params(in_channels, channels, positions, classes, level, spatial_dims=2):
    """Blocks 0..level (two 3-wide convs + two BNs of 2 parameters per channel) + exits 1..level."""
    taps = 3 ** spatial_dims
    total, c_in = 0, in_channels
    for c in channels[:level + 1]:
        total += (c_in * c * taps + c) + (c * c * taps + c) + 2 * 2 * c
        c_in = c
    return total + sum(channels[b] * positions[b - 1] * classes + classes for b in range(1, level + 1))


@pytest.mark.parametrize("level,expected", [(1, 96_746), (2, 330_228), (3, 1_219_070)])
def test_multiexit_parameter_counts_by_hand(level, expected):
    # 28x28 -> 14 -> 7 -> 3 -> 1: exits read 64x7x7, 128x3x3, 256x1x1 features.
    assert multiexit_params(1, NARROW, (49, 9, 1), 10, level) == expected
    assert count_parameters(build_model(MULTI_EXIT, (1, 28, 28), 10, level=level)) == expected


@pytest.mark.parametrize("shape,channels,positions", [
    ((1, 28, 28), NARROW, (7 * 7, 3 * 3, 1)),
    ((3, 32, 32), NARROW, (8 * 8, 4 * 4, 2 * 2)),
    ((3, 96, 96), WIDE, (24 * 24, 12 * 12, 6 * 6)),
    ((3, 151), WIDE, (37, 18, 9)),  # time series: 151 -> 75 -> 37 -> 18 -> 9
])
def test_multiexit_returns_one_logits_per_exit_for_each_input_size(shape, channels, positions):
    torch.manual_seed(0)
    model = build_model(MULTI_EXIT, shape, 7)
    assert [head.linear.in_features for head in model.exits] == [c * n for c, n in zip(channels[1:], positions)]
    assert all(head.dropout.p == 0.5 for head in model.exits)
    assert count_parameters(model) == multiexit_params(shape[0], channels, positions, 7, 3, len(shape) - 1)
    outputs = model(torch.randn(2, *shape))
    assert isinstance(outputs, list) and [o.shape for o in outputs] == [(2, 7)] * 3


@pytest.mark.parametrize("level", [1, 2, 3])
def test_level_variant_returns_a_list_of_level_logits(level):
    model = build_model(MULTI_EXIT, (1, 28, 28), 10, level=level)
    outputs = model(torch.randn(3, 1, 28, 28))
    assert isinstance(outputs, list) and [o.shape for o in outputs] == [(3, 10)] * level


def test_level_variant_holds_the_first_blocks_and_exits_under_the_full_models_names():
    full = build_model(MULTI_EXIT, (1, 28, 28), 10).state_dict()
    assert {"blocks.0.conv1.weight", "blocks.1.bn2.running_mean", "exits.0.linear.weight",
            "exits.2.linear.bias"} <= set(full)
    for level in (1, 2):
        part = build_model(MULTI_EXIT, (1, 28, 28), 10, level=level).state_dict()
        held = tuple(f"blocks.{b}." for b in range(level + 1)) + tuple(f"exits.{e}." for e in range(level))
        assert list(part) == [name for name in full if name.startswith(held)]
        assert all(part[name].shape == full[name].shape for name in part)


def expected_width_shapes(full_shapes, width, in_channels, channels, positions):
    """Full shapes with every hidden channel dimension cut to hidden_channels(C, width)."""
    kept = [hidden_channels(c, width) for c in channels]
    shapes = {}
    for name, shape in full_shapes.items():
        group, index, layer, _ = name.split(".")
        i = int(index)
        if name.endswith("num_batches_tracked"):
            shapes[name] = shape
        elif group == "exits":  # (classes, channels x positions) / (classes,)
            shapes[name] = (shape[0], kept[i + 1] * positions[i])[:len(shape)]
        elif layer.startswith("bn") or name.endswith("bias"):
            shapes[name] = (kept[i],)
        else:
            c_in = kept[i] if layer == "conv2" else (kept[i - 1] if i else in_channels)
            shapes[name] = (kept[i], c_in, *shape[2:])
    return shapes


@pytest.mark.parametrize("width", [0.5, 0.3, 0.0625])
def test_width_variant_tensors_are_the_leading_blocks_of_the_full_ones(width):
    full = build_model(MULTI_EXIT, (1, 28, 28), 10).state_dict()
    narrow = build_model(MULTI_EXIT, (1, 28, 28), 10, width=width).state_dict()
    assert list(narrow) == list(full)
    shapes = expected_width_shapes({k: tuple(v.shape) for k, v in full.items()}, width, 1, NARROW, (49, 9, 1))
    assert {k: tuple(v.shape) for k, v in narrow.items()} == shapes
    if width == 0.5:
        assert shapes["blocks.0.conv1.weight"] == (16, 1, 3, 3)
        assert shapes["blocks.1.conv1.weight"] == (32, 16, 3, 3)
        assert shapes["exits.0.linear.weight"] == (10, 32 * 49)
    # Depth and width combine: a level-1 half-width model is the same cut of the level-1 model.
    both = build_model(MULTI_EXIT, (1, 28, 28), 10, level=1, width=width).state_dict()
    assert {k: tuple(v.shape) for k, v in both.items()} == {k: shapes[k] for k in both}


@pytest.mark.parametrize("shape,width", [((1, 28, 28), 0.5), ((3, 32, 32), 0.3), ((3, 151), 0.5)])
def test_width_variant_is_the_full_model_with_the_other_channels_switched_off(shape, width):
    """Loading the leading blocks of the full tensors gives the function of the full model whose
    channels beyond the kept ones output 0 (their BN scale and shift set to 0)."""
    torch.manual_seed(1)
    full = build_model(MULTI_EXIT, shape, 10)
    narrow = build_model(MULTI_EXIT, shape, 10, width=width)
    with torch.no_grad():
        for name, module in full.named_modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.normal_()
                module.bias.normal_()
                kept = narrow.get_submodule(name).num_features
                module.weight[kept:] = 0
                module.bias[kept:] = 0
    full_state = full.state_dict()
    narrow.load_state_dict({
        name: full_state[name][tuple(slice(0, n) for n in tensor.shape)]
        for name, tensor in narrow.state_dict().items()
    })
    full.eval()
    narrow.eval()
    x = torch.randn(4, *shape)
    for wide_logits, narrow_logits in zip(full(x), narrow(x), strict=True):
        torch.testing.assert_close(narrow_logits, wide_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("channels,width,kept", [
    (32, 1.0, 32), (32, 0.5, 16), (32, 0.3, 10), (10, 0.7, 7), (64, 0.0625, 4), (3, 1e-12, 1)])
def test_hidden_channels_is_the_ceiling_of_width_times_channels(channels, width, kept):
    assert hidden_channels(channels, width) == kept


def test_multiexit_maskable_names_are_the_conv_and_linear_weights():
    names = maskable_parameter_names(build_model(MULTI_EXIT, (1, 28, 28), 10, level=1))
    assert names == ["blocks.0.conv1.weight", "blocks.0.conv2.weight", "blocks.1.conv1.weight",
                     "blocks.1.conv2.weight", "exits.0.linear.weight"]
    series = maskable_parameter_names(build_model(MULTI_EXIT, (3, 151), 10, level=1))
    assert series == names


@pytest.mark.parametrize("variant,mentions", [
    ({"level": 0}, "level"), ({"level": 4}, "level"), ({"level": 2.0}, "level"), ({"level": True}, "level"),
    ({"width": 0}, "width"), ({"width": 1.5}, "width"), ({"width": -0.5}, "width"),
    ({"width": "0.5"}, "width"), ({"width": True}, "width"), ({"width": float("nan")}, "width"),
    ({"depth": 2}, "depth"),
])
def test_bad_multiexit_variant_is_a_config_error(variant, mentions):
    with pytest.raises(ConfigError) as err:
        build_model(MULTI_EXIT, (1, 28, 28), 10, **variant)
    assert err.value.key == "model"
    assert mentions in err.value.problem


@pytest.mark.parametrize("name,shape,_", CASES)
def test_models_without_variants_reject_any_variant_option(name, shape, _):
    with pytest.raises(ConfigError) as err:
        build_model(name, shape, 10, level=1)
    assert err.value.key == "model"
    assert "no variant options" in err.value.problem and "level" in err.value.problem


def test_multiexit_flops_count_every_exit_and_follow_the_variant():
    by_hand = {
        "blocks.0.conv1.weight": conv_macs(1, 32, 3, 28), "blocks.0.conv2.weight": conv_macs(32, 32, 3, 28),
        "blocks.1.conv1.weight": conv_macs(32, 64, 3, 14), "blocks.1.conv2.weight": conv_macs(64, 64, 3, 14),
        "blocks.2.conv1.weight": conv_macs(64, 128, 3, 7), "blocks.2.conv2.weight": conv_macs(128, 128, 3, 7),
        "blocks.3.conv1.weight": conv_macs(128, 256, 3, 3), "blocks.3.conv2.weight": conv_macs(256, 256, 3, 3),
        "exits.0.linear.weight": 64 * 49 * 10, "exits.1.linear.weight": 128 * 9 * 10,
        "exits.2.linear.weight": 256 * 10,
    }
    full = layer_flops(build_model(MULTI_EXIT, (1, 28, 28), 10), (1, 28, 28))
    assert full == {k: 2 * v for k, v in by_hand.items()}
    level2 = layer_flops(build_model(MULTI_EXIT, (1, 28, 28), 10, level=2), (1, 28, 28))
    assert level2 == {k: v for k, v in full.items() if not k.startswith(("blocks.3.", "exits.2."))}
    half = layer_flops(build_model(MULTI_EXIT, (1, 28, 28), 10, width=0.5), (1, 28, 28))
    assert half["blocks.0.conv1.weight"] == 2 * conv_macs(1, 16, 3, 28)
    assert half["blocks.1.conv2.weight"] == 2 * conv_macs(32, 32, 3, 14)
    assert half["exits.0.linear.weight"] == 2 * 32 * 49 * 10


def test_conv1d_forward_flops_by_hand():
    # 3 -> 8 channels, kernel 5, padding 2 on 20 samples: output 8 x 20, each reads 3 x 5 weights.
    assert layer_flops(nn.Conv1d(3, 8, 5, padding=2), (3, 20)) == {"weight": 2 * 8 * 20 * 3 * 5}


def test_vgg11_dense_flops_equal_the_hand_sum():
    convs = [(3, 64, 32), (64, 128, 16), (128, 256, 8), (256, 256, 8),
             (256, 512, 4), (512, 512, 4), (512, 512, 2), (512, 512, 2)]
    by_hand = {f"convs.{i}.weight": conv_macs(c_in, c_out, 3, hw) for i, (c_in, c_out, hw) in enumerate(convs)}
    by_hand |= {"fc1.weight": 512 * 512, "fc2.weight": 512 * 512, "fc3.weight": 512 * 10}
    assert layer_flops(build_model("vgg11", (3, 32, 32), 10), (3, 32, 32)) == {k: 2 * v for k, v in by_hand.items()}

