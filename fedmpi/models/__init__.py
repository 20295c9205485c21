"""Models: ``MODELS`` maps each ``model:`` name to its ``ModelSpec`` (builder, the input shapes it
accepts, its FLOP count), and helpers for sparse methods.

A builder is ``build(input_shape: tuple[int, ...], num_classes: int, *, option=default, ...)
-> nn.Module``; its keyword-only parameters are the variant options it takes (``level``, ``width``
of ``multiexit_vgg``). It is called with an already-normalised shape that ``accepts`` took and known
option names, and raises ``ConfigError("model", ...)`` for an option value it cannot take. Plug-in
packages add models through the entry-point group ``fedmpi.models`` or an import path in the config
(``model: my_package.my_module:MY_MODEL``), each a ``ModelSpec``.
"""
import inspect
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fedmpi.errors import ConfigError, require
from fedmpi.models.multiexit import MIN_SIDE, NUM_EXITS, MultiExitVGG, default_channels
from fedmpi.models.nets import CIFAR10Net, FEMNISTCNN, MLP, VGG11, MNISTNet
from fedmpi.plugins import Registry

# Layer types whose ``weight`` sparse methods (FedDST, PruneFL, LotteryFL) mask and whose
# FLOPs flops.py counts; biases and norm parameters stay dense.
MASKABLE_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)


@dataclass(frozen=True)
class ModelSpec:
    """A model as fedmpi knows it. ``accepts(shape)``: whether it takes samples of that shape (no
    batch dimension); ``needs``: those shapes in words, for errors. ``layer_flops(model,
    input_shape)``: dense forward FLOPs per sample of each maskable weight; None counts every
    Conv1d/Conv2d/Linear call by forward hooks (``flops.layer_flops``), right for any model built
    from those layers."""

    name: str
    build: Callable[..., nn.Module]
    accepts: Callable[[tuple], bool]
    needs: str
    layer_flops: Callable | None = None


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape)


def _shape_error(spec: ModelSpec, got: tuple[int, ...]) -> ConfigError:
    from fedmpi.data import DATASETS   # the data sets' shapes, for the hint only

    takes = [name for name, s in DATASETS.items() if spec.accepts(s.input_shape)]
    fitting = [name for name, other in MODELS.items() if other.accepts(got)]
    return ConfigError(
        "model",
        f"{spec.name} needs {spec.needs} inputs (data.name: {', '.join(takes) or 'none of the built-in datasets'}), "
        f"data.name gives {_fmt(got)}; models that take {_fmt(got)}: {', '.join(fitting) if fitting else 'none'}",
    )


def _exact(shape: tuple[int, ...]) -> Callable[[tuple[int, ...]], bool]:
    return lambda got: got == shape


def _any_channels(side: int) -> Callable[[tuple[int, ...]], bool]:
    return lambda got: len(got) == 3 and got[1:] == (side, side)


def _image_or_series_for_multiexit(got: tuple[int, ...]) -> bool:
    return len(got) in (2, 3) and min(got[1:]) >= MIN_SIDE


def _multiexit(name, channel_divisor, exit_pool, input_shape, num_classes, level, width, **heterofl):
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or not 1 <= level <= NUM_EXITS:
        raise ConfigError("model", f"{name} level (exits held) must be an integer in "
                                   f"1..{NUM_EXITS}, got {level!r}")
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0 < width <= 1:
        raise ConfigError("model", f"{name} width (HeteroFL rate) must be a number in (0, 1], "
                                   f"got {width!r}")
    for key in ("track_running_stats", "scaler"):
        if not isinstance(heterofl[key], bool):
            raise ConfigError("model", f"{name} {key} must be true or false, got {heterofl[key]!r}")
    if heterofl["exits"] not in ("all", "last"):
        raise ConfigError("model", f"{name} exits must be 'all' or 'last', got {heterofl['exits']!r}")
    channels = tuple(c // channel_divisor for c in default_channels(input_shape))
    return MultiExitVGG(input_shape, num_classes, level=int(level), width=float(width), channels=channels,
                        exit_pool=exit_pool, **heterofl)


def _multiexit_builder(name: str, channel_divisor: int, exit_pool: str):
    """The builder of one multi-exit model: its variants are the depth ``level``, the width rate and
    HeteroFL's options (multiexit.py: static batch norm, the scaler, only the deepest exit)."""
    def build(input_shape, num_classes, *, level=NUM_EXITS, width=1.0, track_running_stats=True,
              scaler=False, exits="all"):
        return _multiexit(name, channel_divisor, exit_pool, input_shape, num_classes, level, width,
                          track_running_stats=track_running_stats, scaler=scaler, exits=exits)
    return build


# multiexit_vgg_small: a quarter of the spec's channels (8/16/32/64 on 28x28 and 32x32), the same
# family, light enough for CPU campaigns. The *_pooled models average each exit head's input over
# the positions (exit_pool "average", multiexit.py), so that a shallow exit cannot read the layout.
_MULTIEXIT_MODELS = {
    "multiexit_vgg": (1, "none"),
    "multiexit_vgg_small": (4, "none"),
    "multiexit_vgg_pooled": (1, "average"),
    "multiexit_vgg_small_pooled": (4, "average"),
}


_MULTIEXIT_NEEDS = f"CxHxW or CxL (sides >= {MIN_SIDE})"


def _builtin_models() -> dict[str, ModelSpec]:
    specs = (
        ModelSpec("mnistnet", lambda shape, classes: MNISTNet(classes), _exact((1, 28, 28)), "1x28x28"),
        ModelSpec("cifar10net", lambda shape, classes: CIFAR10Net(classes), _exact((3, 32, 32)), "3x32x32"),
        ModelSpec("femnist_cnn", lambda shape, classes: FEMNISTCNN(shape[0], classes), _any_channels(28), "Cx28x28"),
        ModelSpec("vgg11", lambda shape, classes: VGG11(shape[0], classes), _any_channels(32), "Cx32x32"),
        *(ModelSpec(name, _multiexit_builder(name, divisor, pool), _image_or_series_for_multiexit, _MULTIEXIT_NEEDS)
          for name, (divisor, pool) in _MULTIEXIT_MODELS.items()),
        ModelSpec("mlp", lambda shape, classes: MLP(shape, classes), lambda got: True, "any"),
    )
    return {spec.name: spec for spec in specs}


def check_model_spec(name: str, spec) -> None:
    """Everything fedmpi reads from a model's spec is there and well formed (ConfigError if not)."""
    def need(condition: bool, problem: str) -> None:
        require(condition, "model", problem)

    need(isinstance(spec, ModelSpec), f"{spec!r} is not a fedmpi.models.ModelSpec")
    need(spec.name == name, f"the spec declares name {spec.name!r}, registered as {name!r}")
    need(callable(spec.build) and callable(spec.accepts), "build and accepts must be callable")
    need(isinstance(spec.needs, str) and spec.needs, "needs must say which input shapes it takes")
    need(spec.layer_flops is None or callable(spec.layer_flops), "layer_flops must be None or callable")


MODELS = Registry("fedmpi.models", "model", "model", _builtin_models, check_model_spec)


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
    parameters = inspect.signature(MODELS[MODELS.resolve(name)].build).parameters.values()
    return tuple(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_model(name: str, input_shape: tuple, num_classes: int, **variant) -> nn.Module:
    """Build model ``name`` for samples of ``input_shape`` (no batch dim) and ``num_classes``.

    ``variant``: options of models that have variants (``multiexit_vgg`` and its kin: ``level``,
    ``width`` and HeteroFL's ``track_running_stats``, ``scaler``, ``exits``);
    any option a model does not take is a ConfigError.
    """
    spec = MODELS[MODELS.resolve(name)]
    shape = _normalise_shape(input_shape)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError("model", f"number of classes must be a positive integer, got {num_classes!r}")
    options = variant_options(name)
    unknown = [key for key in variant if key not in options]
    if unknown:
        takes = f"takes variant options {', '.join(options)}" if options else "takes no variant options"
        raise ConfigError("model", f"{name} {takes}; got {', '.join(unknown)}")
    if not spec.accepts(shape):
        raise _shape_error(spec, shape)
    return spec.build(shape, num_classes, **variant)


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
    "ModelSpec",
    "check_model_spec",
    "build_model",
    "count_parameters",
    "maskable_parameter_names",
    "maskable_weight_modules",
    "variant_options",
]
