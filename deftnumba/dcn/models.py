"""ResNet-50 in plain torch, with every 3x3 conv of stages 2-4 optionally deformable (DCNv2).

The training benchmark needs one model on every machine, and ``torchvision.models``
is not installed everywhere, so the network is written here: the standard
ResNet-50 (bottleneck blocks ``(3, 4, 6, 3)``, stride on the 3x3 conv as in
"ResNet v1.5", BN after every conv, torchvision's init and parameter names).

``variant`` picks the 3x3 conv of ``layer2``, ``layer3`` and ``layer4`` (the
stages DCN papers convert; ``layer1`` and the stem stay dense):

* ``"conv"``: a plain ``nn.Conv2d`` (the baseline of the normalised training time);
* ``"torchvision"``: ``torchvision.ops.DeformConv2d`` (GPU machines with torchvision);
* ``"deftnumba"``: ``deftnumba.torch.DeformConv2d``.

A deformable 3x3 is ``ModulatedDeformConv3x3``: a 3x3 ``nn.Conv2d`` predicts
``2*9`` offsets and ``9`` mask logits (mask through a sigmoid), then the
deformable conv samples there. The predictor starts at zero, as is customary, so
at initialisation the offsets are zero and the mask is 0.5 everywhere: the
network starts as a (half-scaled) dense ResNet and learns to deform. This is the
fully-DCN-enabled ResNet of the DefT paper's training-time experiment.
"""

from __future__ import annotations

import torch
from torch import nn

VARIANTS = ("conv", "torchvision", "deftnumba")


def deform_conv_class(variant: str):
    """The ``DeformConv2d`` class for a DCN variant."""
    if variant == "torchvision":
        try:
            from torchvision.ops import DeformConv2d
        except ImportError as err:
            raise ImportError("variant 'torchvision' needs torchvision (pip install torchvision)") from err
        return DeformConv2d
    if variant == "deftnumba":
        from .torch import DeformConv2d

        return DeformConv2d
    raise ValueError(f"no deformable conv for variant {variant!r}; expected one of {VARIANTS[1:]}")


class ModulatedDeformConv3x3(nn.Module):
    """DCNv2: offsets and mask predicted from the input by a zero-initialised conv."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, deform_cls):
        super().__init__()
        self.taps = 9
        self.offset_mask = nn.Conv2d(in_channels, 3 * self.taps, 3, stride=stride, padding=1)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)
        self.conv = deform_cls(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)

    def forward(self, x):
        predicted = self.offset_mask(x)
        offset = predicted[:, :2 * self.taps]
        mask = torch.sigmoid(predicted[:, 2 * self.taps:])
        return self.conv(x, offset, mask)


def conv3x3(in_channels: int, out_channels: int, stride: int, variant: str, deformable: bool) -> nn.Module:
    if not deformable or variant == "conv":
        return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
    return ModulatedDeformConv3x3(in_channels, out_channels, stride, deform_conv_class(variant))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (maybe deformable, carries the stride) -> 1x1 expand, plus the shortcut."""

    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int, variant: str, deformable: bool):
        super().__init__()
        out_channels = width * self.expansion
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, variant, deformable)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_channels))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Bottleneck ResNet. ``width`` is the stem width (64 for ResNet-50); stages use 1, 2, 4, 8 x width."""

    def __init__(self, layers=(3, 4, 6, 3), variant: str = "conv", width: int = 64, num_classes: int = 1000,
                 deformable_stages=(2, 3, 4)):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        # torchvision's attribute names, so the conv variant's state_dict is torchvision's resnet50's.
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = width
        for stage, blocks in enumerate(layers, start=1):
            stage_width = width * 2 ** (stage - 1)
            stride = 1 if stage == 1 else 2
            stage_blocks = []
            for b in range(blocks):
                stage_blocks.append(Bottleneck(in_channels, stage_width, stride if b == 0 else 1, variant,
                                               stage in deformable_stages))
                in_channels = stage_width * Bottleneck.expansion
            setattr(self, f"layer{stage}", nn.Sequential(*stage_blocks))
        self.num_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        self._init_weights()

    def _init_weights(self):
        """He-normal (fan_out) convs and BN (1, 0), as torchvision's ResNet; offset predictors stay zero."""
        predictors = {id(m.offset_mask) for m in self.modules() if isinstance(m, ModulatedDeformConv3x3)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m) not in predictors:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, ModulatedDeformConv3x3):
                nn.init.kaiming_normal_(m.conv.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(variant: str = "conv", num_classes: int = 1000, width: int = 64, layers=(3, 4, 6, 3)) -> ResNet:
    """ResNet-50; with ``variant`` ``"torchvision"`` or ``"deftnumba"``, DCNv2 in every 3x3 of layer2-4.

    ``width`` and ``layers`` shrink it for simulator smoke runs (the default is the real network).
    """
    return ResNet(layers=layers, variant=variant, width=width, num_classes=num_classes)


def deformable_layers(model: nn.Module) -> list[nn.Module]:
    """The model's ``ModulatedDeformConv3x3`` blocks (13 in a DCN ResNet-50)."""
    return [m for m in model.modules() if isinstance(m, ModulatedDeformConv3x3)]
