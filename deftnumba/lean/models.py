"""LeanResNet blocks and networks, and the blocks they are compared with, in plain torch.

* ``LeanBasicBlock``: ``lean -> BN -> ReLU -> lean -> BN -> + x -> ReLU`` (a ResNet basic
  block with both dense 3x3 convolutions replaced by lean operators).
* ``BasicBlock``: the ResNet basic block (two dense 3x3 convolutions).
* ``InvertedResidual``: MobileNetV2's block at stride 1 (1x1 expand by ``expansion``,
  depthwise 3x3, 1x1 project; residual).
* ``ShuffleUnit``: ShuffleNetV2's basic unit at stride 1 (split the channels in half; one
  half through 1x1 -> depthwise 3x3 -> 1x1; concatenate; shuffle).
* ``lean_resnet(depths, widths, num_classes)`` and ``resnet(...)``: a stem (dense 3x3),
  stages of blocks, and between stages a *transition*: a strided 1x1 convolution that
  changes the width (width changes are not lean operators). Both networks use the same
  stem, transitions and head, so they differ only in their blocks.

Counters: ``count_parameters(module)`` and ``count_flops(module, input_shape)`` (2 FLOPs per
multiply-add of every convolution, lean operator and linear layer; batch norm, activations
and additions are not counted). ``block_comparison(width, size)`` tabulates the blocks at
one width. All of this is written here from the papers' descriptions, not downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from .torch import LeanConv2d


class LeanBasicBlock(nn.Module):
    """Two lean operators with batch norm and a residual connection (width kept)."""

    def __init__(self, channels: int, pattern="star5", impl: str = "torch"):
        super().__init__()
        self.conv1 = LeanConv2d(channels, pattern, bias=False, impl=impl)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = LeanConv2d(channels, pattern, bias=False, impl=impl)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class BasicBlock(nn.Module):
    """The ResNet basic block at stride 1: two dense 3x3 convolutions."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class InvertedResidual(nn.Module):
    """MobileNetV2's inverted residual at stride 1, ``channels -> channels``."""

    def __init__(self, channels: int, expansion: int = 6):
        super().__init__()
        hidden = channels * expansion
        self.body = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.body(x)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's basic unit at stride 1 (``channels`` even)."""

    def __init__(self, channels: int):
        super().__init__()
        if channels % 2:
            raise ValueError(f"a ShuffleNetV2 unit needs an even width, got {channels}")
        half = channels // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        keep, work = x.chunk(2, dim=1)
        y = torch.cat((keep, self.branch(work)), dim=1)
        n, c, h, w = y.shape
        return y.reshape(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)  # channel shuffle


def _network(block, depths, widths, num_classes: int, in_channels: int) -> nn.Sequential:
    if len(depths) != len(widths) or not depths:
        raise ValueError(f"depths and widths must be non-empty and of one length, got {depths} and {widths}")
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                               nn.BatchNorm2d(widths[0]), nn.ReLU()]
    for stage, (depth, width) in enumerate(zip(depths, widths)):
        if stage > 0:  # the transition: a strided 1x1 changes the width and halves the size
            layers += [nn.Conv2d(widths[stage - 1], width, 1, stride=2, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        layers += [block(width) for _ in range(depth)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)


def lean_resnet(depths, widths, num_classes: int, in_channels: int = 3, pattern="star5",
                impl: str = "torch") -> nn.Sequential:
    """A LeanResNet: stages of ``LeanBasicBlock`` (``depths[i]`` blocks of width ``widths[i]``)."""
    return _network(lambda c: LeanBasicBlock(c, pattern, impl), depths, widths, num_classes, in_channels)


def resnet(depths, widths, num_classes: int, in_channels: int = 3) -> nn.Sequential:
    """The ResNet with the same skeleton and ``BasicBlock``s: the dense baseline."""
    return _network(BasicBlock, depths, widths, num_classes, in_channels)


# --------------------------------------------------------------------------- counters
def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (batch-norm affine parameters included)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def count_flops(module: nn.Module, input_shape) -> int:
    """FLOPs of one forward pass on an input of ``input_shape`` (batch included): 2 per
    multiply-add of every ``Conv2d``, ``LeanConv2d`` and ``Linear``."""
    total = 0

    def conv(m, inputs, output):
        nonlocal total
        kh, kw = m.kernel_size
        total += 2 * output.numel() * (m.in_channels // m.groups) * kh * kw

    def lean(m, inputs, output):
        nonlocal total
        total += 2 * output.numel() * (m.channels + len(m.taps))

    def linear(m, inputs, output):
        nonlocal total
        total += 2 * output.numel() * m.in_features

    handles = []
    for m in module.modules():
        hook = conv if isinstance(m, nn.Conv2d) else lean if isinstance(m, LeanConv2d) else (
            linear if isinstance(m, nn.Linear) else None)
        if hook is not None:
            handles.append(m.register_forward_hook(hook))
    try:
        was_training = module.training
        module.eval()
        with torch.no_grad():
            module(torch.zeros(input_shape))
        module.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return total


def block_comparison(width: int = 64, size: int = 56, pattern="star5") -> list[dict]:
    """Parameters and FLOPs per image of one block of each family at ``width`` channels on a
    ``size x size`` map: ResNet basic, LeanResNet (``pattern``), MobileNetV2 (expansion 6)
    and ShuffleNetV2. Also the dense 3x3 and the lean operator alone."""
    blocks = {
        "ResNet basic block": BasicBlock(width),
        f"LeanResNet block ({pattern})": LeanBasicBlock(width, pattern),
        "MobileNetV2 inverted residual (t=6)": InvertedResidual(width),
        "ShuffleNetV2 unit": ShuffleUnit(width),
        "dense 3x3 conv": nn.Conv2d(width, width, 3, padding=1, bias=False),
        f"lean operator ({pattern})": LeanConv2d(width, pattern, bias=False, impl="torch"),
    }
    shape = (1, width, size, size)
    return [{"block": name, "width": width, "size": size, "params": count_parameters(m),
             "flops": count_flops(m, shape)} for name, m in blocks.items()]
