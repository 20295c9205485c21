"""Model registry: ``build_model(name, input_shape, num_classes, **variant)`` and helpers for sparse methods.

A builder is ``builder(input_shape: tuple[int, ...], num_classes: int, *, option=default, ...)
-> nn.Module``; its keyword-only parameters are the variant options it takes (``level``, ``width``
of ``multiexit_vgg``). It is called with an already-normalised shape and known option names, and
raises ``ConfigError("model", ...)`` when the model cannot take that shape or an option value.
To add a model, write a builder and put it in ``MODELS``.
"""
import inspect
import numbers
from collections.abc import Callable

from torch import nn

from fedmpi.errors import ConfigError
from fedmpi.models.multiexit import MIN_SIDE, NUM_EXITS, MultiExitVGG, default_channels
from fedmpi.models.nets import CIFAR10Net, FEMNISTCNN, MLP, VGG11, MNISTNet

# Layer types whose ``weight`` sparse methods (FedDST, PruneFL, LotteryFL) mask and whose
# FLOPs flops.py counts; biases and norm parameters stay dense.
MASKABLE_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)

# Input shape of each dataset named in docs/interface.md, only to tell the user which dataset a
# model needs; the data package is the authority on shapes.
_DATASET_SHAPES = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar100": (3, 32, 32),
    "svhn": (3, 32, 32),
    "synthetic": (60,),
}


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _datasets_with(accepts: Callable[[tuple[int, ...]], bool]) -> str:
    names = [name for name, shape in _DATASET_SHAPES.items() if accepts(shape)]
    return ", ".join(names) if names else "none of the built-in datasets"


def _shape_error(model: str, needs: str, accepts, got: tuple[int, ...]) -> ConfigError:
    fitting = [name for name, fits in _ACCEPTS.items() if fits(got)]
    return ConfigError(
        "model",
        f"{model} needs {needs} inputs (data.name: {_datasets_with(accepts)}), "
        f"data.name gives {_fmt(got)}; models that take {_fmt(got)}: "
        f"{', '.join(fitting) if fitting else 'none'}",
    )


def _exact(shape: tuple[int, ...]) -> Callable[[tuple[int, ...]], bool]:
    return lambda got: got == shape


def _any_channels(side: int) -> Callable[[tuple[int, ...]], bool]:
    return lambda got: len(got) == 3 and got[1:] == (side, side)


def _image_or_series_for_multiexit(got: tuple[int, ...]) -> bool:
    return len(got) in (2, 3) and min(got[1:]) >= MIN_SIDE


# Which input shapes each model accepts (used for validation and for the hint in errors).
_ACCEPTS: dict[str, Callable[[tuple[int, ...]], bool]] = {
    "mnistnet": _exact((1, 28, 28)),
    "cifar10net": _exact((3, 32, 32)),
    "femnist_cnn": _any_channels(28),
    "vgg11": _any_channels(32),
    "multiexit_vgg": _image_or_series_for_multiexit,
    "multiexit_vgg_small": _image_or_series_for_multiexit,
    "mlp": lambda got: True,
}


def _build_mnistnet(input_shape, num_classes):
    if not _ACCEPTS["mnistnet"](input_shape):
        raise _shape_error("mnistnet", "1x28x28", _ACCEPTS["mnistnet"], input_shape)
    return MNISTNet(num_classes)


def _build_cifar10net(input_shape, num_classes):
    if not _ACCEPTS["cifar10net"](input_shape):
        raise _shape_error("cifar10net", "3x32x32", _ACCEPTS["cifar10net"], input_shape)
    return CIFAR10Net(num_classes)


def _build_femnist_cnn(input_shape, num_classes):
    if not _ACCEPTS["femnist_cnn"](input_shape):
        raise _shape_error("femnist_cnn", "Cx28x28", _ACCEPTS["femnist_cnn"], input_shape)
    return FEMNISTCNN(input_shape[0], num_classes)


def _build_vgg11(input_shape, num_classes):
    if not _ACCEPTS["vgg11"](input_shape):
        raise _shape_error("vgg11", "Cx32x32", _ACCEPTS["vgg11"], input_shape)
    return VGG11(input_shape[0], num_classes)


def _multiexit(name, channel_divisor, input_shape, num_classes, level, width):
    if not _ACCEPTS[name](input_shape):
        raise _shape_error(name, f"CxHxW or CxL (sides >= {MIN_SIDE})", _ACCEPTS[name], input_shape)
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 1 <= level <= NUM_EXITS:
        raise ConfigError("model", f"multiexit_vgg level (exits held) must be an integer in "
                                   f"1..{NUM_EXITS}, got {level!r}")
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0 < width <= 1:
        raise ConfigError("model", f"multiexit_vgg width (HeteroFL rate) must be a number in (0, 1], "
                                   f"got {width!r}")
    channels = tuple(c // channel_divisor for c in default_channels(input_shape))
    return MultiExitVGG(input_shape, num_classes, level=int(level), width=float(width), channels=channels)


def _build_multiexit_vgg(input_shape, num_classes, *, level=NUM_EXITS, width=1.0):
    return _multiexit("multiexit_vgg", 1, input_shape, num_classes, level, width)


def _build_multiexit_vgg_small(input_shape, num_classes, *, level=NUM_EXITS, width=1.0):
    """multiexit_vgg with a quarter of the spec's channels (8/16/32/64 on 28x28 and 32x32): the same
    family, light enough for CPU campaigns; variants (level, width) work as for multiexit_vgg."""
    return _multiexit("multiexit_vgg_small", 4, input_shape, num_classes, level, width)


def _build_mlp(input_shape, num_classes):
    return MLP(input_shape, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mnistnet": _build_mnistnet,
    "cifar10net": _build_cifar10net,
    "femnist_cnn": _build_femnist_cnn,
    "vgg11": _build_vgg11,
    "multiexit_vgg": _build_multiexit_vgg,
    "multiexit_vgg_small": _build_multiexit_vgg_small,
    "mlp": _build_mlp,
}


def _normalise_shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in input_shape)
        valid = len(shape) > 0 and all(d > 0 and d == orig for d, orig in zip(shape, input_shape))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ConfigError("model", f"input shape must be a non-empty tuple of positive integers, "
                                   f"got {input_shape!r}")
    return shape


def variant_options(name: str) -> tuple[str, ...]:
    """The variant options model ``name`` takes: its builder's keyword-only parameters."""
    parameters = inspect.signature(MODELS[name]).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_model(name: str, input_shape: tuple, num_classes: int, **variant) -> nn.Module:
    """Build model ``name`` for samples of ``input_shape`` (no batch dim) and ``num_classes``.

    ``variant``: options of models that have variants (``multiexit_vgg``: ``level``, ``width``);
    any option a model does not take is a ConfigError.
    """
    if name not in MODELS:
        raise ConfigError("model", f"unknown model {name!r}; choose one of {', '.join(sorted(MODELS))}")
    shape = _normalise_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("model", f"number of classes must be a positive integer, got {num_classes!r}")
    options = variant_options(name)
    unknown = [key for key in variant if key not in options]
    if unknown:
        takes = f"takes variant options {', '.join(options)}" if options else "takes no variant options"
        raise ConfigError("model", f"{name} {takes}; got {', '.join(unknown)}")
    return MODELS[name](shape, num_classes, **variant)


def maskable_weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """state_dict name of each maskable weight -> the convolution/Linear module that owns it."""
    return {
        (f"{prefix}.weight" if prefix else "weight"): module
        for prefix, module in model.named_modules()
        if isinstance(module, MASKABLE_LAYER_TYPES)
    }


def maskable_parameter_names(model: nn.Module) -> list[str]:
    """The ``weight`` of every convolution and Linear, in state_dict order (what sparse methods mask)."""
    maskable = maskable_weight_modules(model)
    return [key for key in model.state_dict() if key in maskable]


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (shared parameters counted once); buffers excluded."""
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MASKABLE_LAYER_TYPES",
    "MODELS",
    "build_model",
    "count_parameters",
    "maskable_parameter_names",
    "maskable_weight_modules",
    "variant_options",
]
