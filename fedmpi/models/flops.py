"""Analytic FLOP counts per sample, dense or under per-layer weight densities.

Counting convention (the one of the FedDST / RigL papers):
- Only convolutions (1-D, 2-D) and Linear layers are counted, as 2 FLOPs per multiply-accumulate
  (MAC). A layer's MACs per sample are (output elements per sample) x (weights that feed one output
  element): ``in_channels/groups * kernel positions`` for a conv, ``in_features`` for a linear.
  Output sizes are measured, by forward hooks on one dummy input, so padding/stride/dilation and
  repeated calls of a layer are handled without re-deriving shapes.
- Every layer the forward pass calls counts: a multi-exit model (forward returns one logits per
  exit) is counted through all the exits it holds, which is what training it on all exits costs.
- A sparse layer does only the MACs of its live weights: its MACs are scaled by its weight
  density (fraction of nonzero weights), as if every weight were used equally often.
- Bias additions are ignored (one add per output element, under 1 % of any layer here), and
  so are ReLU, pooling, batch-norm, softmax and the loss: they are O(activations), not
  O(weights x activations), and do not change with sparsity.
- Training = forward + backward ~= 3 x forward: the backward pass computes the gradient with
  respect to the layer input and with respect to the weights, each costing about one forward.
  (The first layer needs no input gradient; the convention keeps the factor 3 anyway.)
"""
import math

import torch
from torch import nn

from fedmpi.models import MODELS, maskable_weight_modules


def _dense_macs_per_sample(model: nn.Module, input_shape) -> dict[str, int]:
    """MACs of one sample's dense forward, per maskable weight name (state_dict order)."""
    modules = maskable_weight_modules(model)
    macs = {name: 0 for name in modules}
    hooks = []

    def count(name):
        def hook(module, inputs, output):
            if isinstance(module, nn.Linear):
                per_output = module.in_features
            else:
                per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
            # Batch size is 1, so output.numel() is the output elements of one sample.
            macs[name] += output.numel() * per_output
        return hook

    for name, module in modules.items():
        hooks.append(module.register_forward_hook(count(name)))
    try:
        reference = next(model.parameters(), None)
        dummy = torch.zeros(
            (1, *input_shape),
            dtype=reference.dtype if reference is not None else torch.float32,
            device=reference.device if reference is not None else "cpu",
        )
        was_training = model.training
        # eval: keeps BN running stats and dropout untouched by the probe.
        model.eval()
        try:
            with torch.no_grad():
                model(dummy)
        finally:
            model.train(was_training)
    finally:
        for handle in hooks:
            handle.remove()
    return macs


def layer_flops(model: nn.Module, input_shape) -> dict[str, int]:
    """Dense forward FLOPs (2 x MACs) of one sample, per maskable weight name, in state_dict order.

    Weights whose layer the forward pass does not call get 0. Multiply by a layer's density to
    get its sparse cost without re-running the hooks (see ``scale_flops``).
    """
    macs = _dense_macs_per_sample(model, input_shape)
    ordered = [key for key in model.state_dict() if key in macs]
    return {key: 2 * macs[key] for key in ordered}


def model_layer_flops(name: str, model: nn.Module, input_shape) -> dict[str, int]:
    """``layer_flops`` as model ``name`` declares it: its ``ModelSpec.layer_flops`` where it counts
    its own, else the hook count above."""
    spec = MODELS[MODELS.resolve(name)]
    return (spec.layer_flops or layer_flops)(model, input_shape)


def scale_flops(dense_layer_flops: dict[str, int], densities: dict[str, float] | None = None) -> int:
    """Sum of ``dense_layer_flops`` with each layer scaled by its density (missing = 1.0)."""
    densities = densities or {}
    unknown = sorted(set(densities) - set(dense_layer_flops))
    if unknown:
        raise ValueError(f"densities given for non-maskable or unknown weights: {unknown}")
    total = 0.0
    for name, flops in dense_layer_flops.items():
        density = float(densities.get(name, 1.0))
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density of {name} must be in [0, 1], got {density}")
        total += flops * density
    return int(round(total))
