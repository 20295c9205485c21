"""Network modules of the suite. Every model returns logits (no softmax): the loss applies it.

Layers that sparse methods mask (convolutions / Linear) are named submodules, so their weights have
stable state_dict names (``conv1.weight``, ``fc1.weight``, ...). Parameter-free operations
(ReLU, max-pool, flatten) are functional calls and add nothing to the state_dict.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

# torch's CPU max-pool kernel is slow for these networks' shapes (MNISTNet's 3x3 stride-1 pools: about
# 20 ns per output). With grad mode off (evaluation) the maximum is taken over shifted slices, one
# row of the window and then one column at a time: 4-8x faster for evaluation batches
# (bench/pooling.py) and the same values (a maximum is exact). Where a gradient is needed, torch's kernel runs on a
# channels-last copy from 8 channels on: 2-6x faster (slower for 3 channels), with the same values
# and the same argmax, so the same gradients, ties included (tests/test_pooling.py).
CHANNELS_LAST_POOL_FROM = 8


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _sliding_max(x: torch.Tensor, kernel: int, stride: int, dim: int) -> torch.Tensor:
    outputs = (x.shape[dim] - kernel) // stride + 1
    span = stride * (outputs - 1) + 1
    result = x.narrow(dim, 0, span)[(slice(None),) * (dim % x.dim()) + (slice(None, None, stride),)]
    result = result.clone() if kernel == 1 else result
    for offset in range(1, kernel):
        shifted = x.narrow(dim, offset, span)[(slice(None),) * (dim % x.dim()) + (slice(None, None, stride),)]
        result = torch.maximum(result, shifted)
    return result


def max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """``F.max_pool2d`` (no dilation, no ceil mode) with a contiguous result, by the faster path
    above."""
    if x.dim() != 4 or x.device.type != "cpu":
        return F.max_pool2d(x, kernel_size, stride, padding)
    kernel = _pair(kernel_size)
    steps = kernel if stride is None or stride == [] else _pair(stride)
    # grad mode, not requires_grad, decides: torch.func's transforms (grouped training) track
    # gradients of tensors that do not say so
    if not torch.is_grad_enabled() and _pair(padding) == (0, 0):
        return _sliding_max(_sliding_max(x, kernel[1], steps[1], -1), kernel[0], steps[0], -2).contiguous()
    if x.shape[1] >= CHANNELS_LAST_POOL_FROM:
        try:
            x = x.contiguous(memory_format=torch.channels_last)
        except RuntimeError:    # inside vmap (local.client_batch's grouped training) layouts are not queried
            return F.max_pool2d(x, kernel_size, stride, padding)
        return F.max_pool2d(x, kernel_size, stride, padding).contiguous()
    return F.max_pool2d(x, kernel_size, stride, padding)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` through ``max_pool2d`` (plain options only: no dilation, ceil mode or
    indices)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dilation not in (1, (1, 1)) or self.ceil_mode or self.return_indices:
            return super().forward(x)
        return max_pool2d(x, self.kernel_size, self.stride, self.padding)


class MNISTNet(nn.Module):
    """FedDST's MNIST CNN for 1x28x28 inputs; 261,840 parameters with 10 classes.

    conv(1->10,5) -> maxpool(3,s1) -> relu -> conv(10->20,5) -> maxpool(3,s1) -> relu
    -> FC 5120->50 -> relu -> FC 50->classes.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 5)   # 28 -> 24, pool(3,s1) -> 22
        self.conv2 = nn.Conv2d(10, 20, 5)  # 22 -> 18, pool(3,s1) -> 16
        self.fc1 = nn.Linear(20 * 16 * 16, 50)
        self.fc2 = nn.Linear(50, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(max_pool2d(self.conv1(x), 3, stride=1))
        x = F.relu(max_pool2d(self.conv2(x), 3, stride=1))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class CIFAR10Net(nn.Module):
    """FedDST's CIFAR-10 CNN for 3x32x32 inputs; 782,006 parameters with 10 classes.

    conv(3->6,5) -> maxpool(3,s1) -> relu -> conv(6->16,5) -> maxpool(3,s1) -> relu
    -> FC 6400->120 -> relu -> FC 120->84 -> relu -> FC 84->classes.
    Pool-then-relu follows the public FedDST code (bibikar/feddst, models.py); relu and
    max-pool commute, so the order does not change the function.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)   # 32 -> 28, pool(3,s1) -> 26
        self.conv2 = nn.Conv2d(6, 16, 5)  # 26 -> 22, pool(3,s1) -> 20
        self.fc1 = nn.Linear(16 * 20 * 20, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(max_pool2d(self.conv1(x), 3, stride=1))
        x = F.relu(max_pool2d(self.conv2(x), 3, stride=1))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class FEMNISTCNN(nn.Module):
    """LEAF's FEMNIST CNN for Cx28x28 inputs: 6,603,710 parameters with 1 channel and 62 classes
    (PruneFL's 6.6 M), 6,497,162 with 10 classes.

    conv(C->32,5,pad 2) -> relu -> maxpool 2 -> conv(32->64,5,pad 2) -> relu -> maxpool 2
    -> FC 3136->2048 -> relu -> FC 2048->classes.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, padding=2)  # 28 -> 28, pool 2 -> 14
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)           # 14 -> 14, pool 2 -> 7
        self.fc1 = nn.Linear(64 * 7 * 7, 2048)
        self.fc2 = nn.Linear(2048, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = max_pool2d(F.relu(self.conv1(x)), 2)
        x = max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class VGG11(nn.Module):
    """PruneFL's VGG-11 for Cx32x32 inputs, without batch-norm (jiangyuang/PruneFL, bases/nn/models/vgg.py).

    8 convs (3x3, pad 1, each then relu) of 64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M
    (M = maxpool 2, so 32x32 -> 1x1) -> FC 512->512 -> relu -> FC 512->512 -> relu -> FC 512->classes,
    no dropout. 9,750,922 parameters with 3 channels and 10 classes (convs 9,220,480, classifier
    530,442): the PruneFL paper's 9.75 M. (A single 512->classes head would give 9,225,610.)
    """

    STAGES = ((64,), (128,), (256, 256), (512, 512), (512, 512))  # each stage ends in maxpool 2

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        convs = []
        for stage in self.STAGES:
            for out_channels in stage:
                convs.append(nn.Conv2d(in_channels, out_channels, 3, padding=1))
                in_channels = out_channels
        self.convs = nn.ModuleList(convs)
        self.fc1 = nn.Linear(512, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc3 = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs = iter(self.convs)
        for stage in self.STAGES:
            for _ in stage:
                x = F.relu(next(convs)(x))
            x = max_pool2d(x, 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class MLP(nn.Module):
    """Two hidden layers of 200 units on the flattened input; any input shape."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 200):
        super().__init__()
        self.fc1 = nn.Linear(math.prod(input_shape), hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
