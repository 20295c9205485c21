"""HypeMeFed's multi-exit VGG (Shin et al., SenSys 2024) with depth and width variants.

Structure (as in eis-lab/HypeMeFed, models/{svhn,stl10}/vgg.py): four blocks of
[conv3x3(pad 1)-BN-ReLU-conv3x3(pad 1)-BN-ReLU-maxpool 2]. Block 0 is shared; blocks 1, 2, 3
each end in an exit head, flatten -> dropout 0.5 -> linear to the classes. By default the head does
not pool, so its input is the block's channels x its output positions (28x28 inputs: 28->14->7->3->1).

Variants (built as separate models whose state_dicts line up with the full one):
- ``level`` e in 1..3: holds blocks 0..e and exits 1..e; forward returns ``[exit1, ..., exit_e]``.
  Its state_dict names are the full model's first blocks and exits, in the full model's order.
- ``width`` p in (0, 1] (HeteroFL's rate): every hidden layer keeps its first ``hidden_channels(C, p)``
  channels; input channels and class outputs stay full. Every tensor is the leading block of the
  full one (``full[:c_out, :c_in, ...]``): the heads flatten channel-major, so a head's first
  c x positions input features are exactly the first c channels.

The same network runs on time series (input C x L) with 1-D convolutions, norms and pools.
HypeMeFed's own UniMiB-SHAR model instead reshapes the 3x151 signal into an 18x25 image.

HeteroFL's options (Diao et al., ICLR 2021; off by default, and then the network is exactly the one
above):
- ``track_running_stats`` False: static batch norm, every BN normalises with the current batch's
  statistics and holds no running statistics (no ``running_mean``/``running_var`` in the state).
- ``scaler`` True: a ``Scaler`` after every convolution, before its BN, divides by the width rate
  in training and passes through at evaluation (the authors' ``modules.Scaler``).
- ``exits`` "last": only the deepest exit head is built (under its full-model name, ``exits.{level-1}``)
  and forward returns ``[its logits]``: HeteroFL's model has one classifier.

``exit_pool`` "average" (models ``multiexit_vgg_pooled``, ``multiexit_vgg_small_pooled``): every exit
head averages its input over the positions first, mean -> dropout 0.5 -> linear, so a head's input
is the block's channels alone, as DepthFL's ResNet exits end in global average pooling (adap/flower,
baselines/depthfl/depthfl/resnet.py, ``nn.AdaptiveAvgPool2d(1)`` before each ``middle_fc``). A shallow
exit then loses the spatial layout and depth matters; without it, exit 1 on 28x28 inputs reads
channels x 7x7 positions, nearly as strong a classifier as the full model on Fashion-MNIST. Only the
heads' linear inputs change (names and every other tensor stay); width slicing keeps the first c
inputs, the first c channels. Default "none": the network above, unchanged.
"""
import math

import torch
from torch import nn

from fedmpi.models.nets import MaxPool2d

NUM_EXITS = 3
# Channels of blocks 0..3: HypeMeFed's SVHN (32x32) model, and its STL-10 (96x96) and UniMiB-SHAR
# (151 samples) models, which take inputs whose every spatial side is at least WIDE_FROM.
NARROW_CHANNELS = (32, 64, 128, 256)
WIDE_CHANNELS = (64, 128, 256, 512)
WIDE_FROM = 64
# Four 2x max-pools leave at least one position only on sides of 16 or more.
MIN_SIDE = 2 ** (NUM_EXITS + 1)
EXIT_POOLS = ("none", "average")

_LAYERS = {
    1: (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d),
    2: (nn.Conv2d, nn.BatchNorm2d, MaxPool2d),
}


def hidden_channels(channels: int, width: float) -> int:
    """ceil(width x channels), at least 1, as HeteroFL sizes a sub-model's layers.

    The product is rounded to 9 decimals first, so binary floating point cannot push an exact
    product to the next integer (0.7 x 10 evaluates to 7.000000000000001; this gives 7).
    """
    return max(1, math.ceil(round(width * channels, 9)))


def default_channels(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The spec's channels of blocks 0..3 for this input shape."""
    return WIDE_CHANNELS if min(input_shape[1:]) >= WIDE_FROM else NARROW_CHANNELS


class Scaler(nn.Module):
    """HeteroFL's scaler: divides by the width rate in training, the identity at evaluation."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.rate if self.training else x


class ConvBlock(nn.Module):
    """[conv3x3-(scaler)-BN-ReLU-conv3x3-(scaler)-BN-ReLU-maxpool 2], 1-D or 2-D."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *,
                 track_running_stats: bool = True, scale: float | None = None):
        super().__init__()
        conv, norm, pool = _LAYERS[spatial_dims]
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.bn1 = norm(out_channels, track_running_stats=track_running_stats)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1)
        self.bn2 = norm(out_channels, track_running_stats=track_running_stats)
        self.pool = pool(2)
        # no parameters or buffers: the state_dict is the same with or without it
        self.scaler = nn.Identity() if scale is None else Scaler(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.scaler(self.conv1(x))))
        x = torch.relu(self.bn2(self.scaler(self.conv2(x))))
        return self.pool(x)


class ExitHead(nn.Module):
    """flatten -> dropout 0.5 -> linear to the classes; with ``pool``, the mean over the positions
    in place of the flatten (no parameters: the state_dict names are the same)."""

    def __init__(self, in_features: int, num_classes: int, pool: bool = False):
        super().__init__()
        self.pool = pool
        self.dropout = nn.Dropout(0.5)
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = x.mean(dim=tuple(range(2, x.dim()))) if self.pool else torch.flatten(x, 1)
        return self.linear(self.dropout(features))


class MultiExitVGG(nn.Module):
    """Multi-exit VGG for C x H x W or C x L inputs; forward returns a list of ``level`` logits.

    Parameters with 1x28x28 inputs and 10 classes (channels 32/64/128/256; exit inputs
    64x7x7, 128x3x3, 256x1x1): 96,746 at level 1, 330,228 at level 2, 1,219,070 at level 3.
    With ``exit_pool="average"`` the exit inputs are 64, 128, 256 (the 256x1x1 exit is unchanged):
    66,026 at level 1, 289,268 at level 2, 1,178,110 at level 3. The quarter-channel network
    (8/16/32/64): 4,418 / 18,764 / 75,094 pooled against 12,098 / 29,004 / 85,334 without.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, level: int = NUM_EXITS,
                 width: float = 1.0, channels: tuple[int, ...] | None = None, *,
                 track_running_stats: bool = True, scaler: bool = False, exits: str = "all",
                 exit_pool: str = "none"):
        super().__init__()
        if exit_pool not in EXIT_POOLS:
            raise ValueError(f"exit_pool must be one of {EXIT_POOLS}, got {exit_pool!r}")
        in_channels, *spatial = input_shape
        full = channels or default_channels(input_shape)
        channels = [hidden_channels(c, width) for c in full[:level + 1]]
        self.blocks = nn.ModuleList()
        for out_channels in channels:
            self.blocks.append(ConvBlock(len(spatial), in_channels, out_channels,
                                         track_running_stats=track_running_stats, scale=width if scaler else None))
            in_channels = out_channels
        # exits "last": the shallower heads are parameter-free placeholders, so the deepest head
        # keeps the full model's name (exits.{level-1}) and nothing else is in the state
        self.held = [exits == "all" or b == level for b in range(1, level + 1)]
        # Block b's output keeps floor(side / 2^(b+1)) positions per side (pools floor); a pooled
        # head reads one value per channel.
        pool = exit_pool == "average"
        self.exits = nn.ModuleList(
            ExitHead(channels[b] * (1 if pool else math.prod(side // 2 ** (b + 1) for side in spatial)),
                     num_classes, pool=pool)
            if self.held[b - 1] else nn.Identity()
            for b in range(1, level + 1)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.blocks[0](x)
        logits = []
        for block, head, held in zip(self.blocks[1:], self.exits, self.held):
            x = block(x)
            if held:
                logits.append(head(x))
        return logits
