"""Model registry, parameter counts, maskable names and analytic FLOP counts."""
import pytest
import torch
from torch import nn

from fedmpi.errors import ConfigError
from fedmpi.models import MODELS, build_model, count_parameters, maskable_parameter_names
from fedmpi.models.flops import (
    forward_flops_per_sample,
    layer_flops,
    scale_flops,
    training_flops_per_sample,
)

torch.set_num_threads(1)

# (model name, input shape, classes) for each registered model on a dataset it fits.
CASES = [
    ("mnistnet", (1, 28, 28), 10),
    ("cifar10net", (3, 32, 32), 10),
    ("femnist_cnn", (1, 28, 28), 62),
    ("mlp", (60,), 10),
]


def conv_macs(c_in, c_out, k, out_hw):
    """MACs of a k x k conv producing c_out x out_hw x out_hw: each output reads c_in*k*k weights."""
    return c_out * out_hw * out_hw * c_in * k * k


def test_registry_holds_the_promised_names():
    assert set(MODELS) >= {"mnistnet", "cifar10net", "femnist_cnn", "mlp"}
    assert {name for name, _, _ in CASES} == set(MODELS)


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


@pytest.mark.parametrize("name,shape,classes", CASES)
def test_maskable_names_are_exactly_the_conv_and_linear_weights(name, shape, classes):
    model = build_model(name, shape, classes)
    names = maskable_parameter_names(model)
    expected = [f"{prefix}.weight" for prefix, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == expected
    state_keys = list(model.state_dict())
    assert names == [k for k in state_keys if k in names]  # state_dict order
    assert all(k.endswith(".bias") for k in state_keys if k not in names)


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
    assert forward_flops_per_sample(model, (784,)) == 2 * 784 * 10
    assert layer_flops(model, (784,)) == {"weight": 2 * 784 * 10}


def test_conv_forward_flops_by_hand():
    # 3 -> 8 channels, 3x3 kernel, stride 2, padding 1 on 16x16: output 8x8x8.
    model = nn.Conv2d(3, 8, 3, stride=2, padding=1)
    assert forward_flops_per_sample(model, (3, 16, 16)) == 2 * conv_macs(3, 8, 3, 8)
    grouped = nn.Conv2d(4, 8, 3, groups=2)  # each output reads 2 input channels; 14x14 out
    assert forward_flops_per_sample(grouped, (4, 16, 16)) == 2 * conv_macs(2, 8, 3, 14)


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
    dense = forward_flops_per_sample(model, (3, 32, 32))
    assert dense == 2 * sum(by_hand.values())
    assert 4.5e6 < dense < 4.7e6  # FedDST paper: ~4.6 MFLOPs dense
    assert training_flops_per_sample(model, (3, 32, 32)) == 3 * dense


def test_mnistnet_dense_flops_equal_the_hand_sum():
    model = build_model("mnistnet", (1, 28, 28), 10)
    by_hand = conv_macs(1, 10, 5, 24) + conv_macs(10, 20, 5, 18) + 5120 * 50 + 50 * 10
    assert forward_flops_per_sample(model, (1, 28, 28)) == 2 * by_hand


def test_density_scales_each_layer():
    model = build_model("cifar10net", (3, 32, 32), 10)
    dense = layer_flops(model, (3, 32, 32))
    halved = forward_flops_per_sample(model, (3, 32, 32), {"fc1.weight": 0.5})
    assert sum(dense.values()) - halved == dense["fc1.weight"] // 2
    uniform = {name: 0.2 for name in maskable_parameter_names(model)}
    assert forward_flops_per_sample(model, (3, 32, 32), uniform) == round(0.2 * sum(dense.values()))
    assert scale_flops(dense, uniform) == forward_flops_per_sample(model, (3, 32, 32), uniform)
    single = nn.Linear(784, 10)
    assert forward_flops_per_sample(single, (784,), {"weight": 0.5}) == 784 * 10


def test_bad_densities_are_rejected():
    model = nn.Linear(4, 2)
    with pytest.raises(ValueError, match="bias"):
        forward_flops_per_sample(model, (4,), {"bias": 0.5})
    with pytest.raises(ValueError, match="weight"):
        forward_flops_per_sample(model, (4,), {"weight": 1.5})


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
