"""PreActResNet-18, the default architecture of BackdoorBench (``models/preact_resnet.py``).

Why this exact shape: BackdoorBench's leaderboards and its released poisoned checkpoints use
Kuang Liu's CIFAR PreActResNet-18 (a 3x3 stride-1 stem, no stem max-pool, pre-activation basic
blocks [2, 2, 2, 2] at 64/128/256/512 channels, 1x1 projection shortcuts without BatchNorm,
no BatchNorm/ReLU after the last block, a global average pool and ``linear = Linear(512, C)``).
Matching it layer for layer keeps our results comparable with theirs: 11,171,146 parameters for
3 channels and 10 classes, and the same state_dict keys under ``conv1``/``layer*``/``linear``
(ours add the ``normalize.*`` buffers). Their newer version pools with
``AdaptiveAvgPool2d((1, 1))`` instead of ``AvgPool2d(4)``, so any input size works (16 px
digits, 32 px CIFAR, 64 px Tiny-ImageNet); so does ours. Initialisation is PyTorch's default,
as in BackdoorBench. The head is the module named ``linear`` (what D3 selects).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from d3tune.models import ModelSpec, Normalize, register


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut.

    The shortcut is the identity, or a bias-free 1x1 conv applied to the pre-activated input
    when the stride or the width changes (as in the original and in BackdoorBench).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes * self.expansion:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes * self.expansion, 1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """CIFAR-style pre-activation ResNet (BackdoorBench's ``PreActResNet``)."""

    def __init__(self, spec: ModelSpec, num_blocks: tuple[int, ...] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.in_planes = 64
        self.conv1 = nn.Conv2d(spec.in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * PreActBlock.expansion, spec.num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


@register("preactresnet18", head="linear")
def build(spec: ModelSpec) -> nn.Module:
    return PreActResNet(spec, (2, 2, 2, 2))
