"""ResNet-18/34/50/101/152 (He et al. 2015), with torchvision's module names.

The state_dict of every model here has the same keys and shapes as
``torchvision.models.resnetN``, so weights move freely between the two.
Two variants are offered: ``v1.5`` (default; the bottleneck's stride sits on the
3x3 conv, as in torchvision and the tutorial) and ``v1`` (stride on the first 1x1
conv, as in the original paper).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from rsscene.models.conv import Conv2d

VARIANTS = ("v1.5", "v1")


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with an identity (or projection) shortcut; used by ResNet-18/34."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        variant: str = "v1.5",
    ) -> None:
        super().__init__()
        # The variant only moves the stride inside a bottleneck; a basic block is the same in both.
        del variant
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4); used by ResNet-50/101/152."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        variant: str = "v1.5",
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if variant == "v1" else (1, stride)
        self.conv1 = conv1x1(inplanes, planes, stride_1x1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = type[BasicBlock] | type[Bottleneck]


class ResNet(nn.Module):
    """A stem, four stages of residual blocks, global average pooling and a linear classifier."""

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        in_channels: int = 3,
        zero_init_residual: bool = False,
        variant: str = "v1.5",
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown ResNet variant {variant!r}; choose one of {VARIANTS}")
        self.variant = variant
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        # Adaptive pooling lets any input of 32 px or more reach the classifier.
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.reset_parameters(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.variant)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, variant=self.variant) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def reset_parameters(self, zero_init_residual: bool = False) -> None:
        """Kaiming-normal convs, unit BatchNorm, PyTorch's default Linear.

        With ``zero_init_residual`` the last BN of each block starts at zero, so every
        residual branch starts as the identity (Goyal et al. 2017).
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))


# The paper's Table 1: blocks per stage (conv2_x .. conv5_x).
ARCHS: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def _builder(arch: str) -> Callable[..., ResNet]:
    block, layers = ARCHS[arch]

    def build(**kwargs) -> ResNet:
        return ResNet(block, layers, **kwargs)

    build.__name__ = arch
    build.__doc__ = f"{arch.replace('resnet', 'ResNet-')}: {block.__name__} x {layers}."
    return build


resnet18 = _builder("resnet18")
resnet34 = _builder("resnet34")
resnet50 = _builder("resnet50")
resnet101 = _builder("resnet101")
resnet152 = _builder("resnet152")

MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
}


def create_model(arch: str, **kwargs) -> ResNet:
    """Build a model by name (``resnet18`` ... ``resnet152``)."""
    try:
        return MODELS[arch](**kwargs)
    except KeyError:
        raise ValueError(
            f"unknown architecture {arch!r}; choose one of {', '.join(MODELS)}"
        ) from None
