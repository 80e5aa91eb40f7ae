"""VGG-19 with BatchNorm, as BackdoorBench builds its ``vgg19_bn`` for every data set.

Why this exact shape: BackdoorBench's ``generate_cls_model("vgg19_bn", num_classes)`` is plain
``torchvision.models.vgg19_bn(num_classes=...)``, used unchanged at 32 and 64 px: the 16 conv
layers of configuration "E" (3x3 conv with bias, BatchNorm, ReLU; five 2x2 max-pools), then
``AdaptiveAvgPool2d((7, 7))`` (at 32 px the 1x1 feature map is just replicated 7x7 times), then
``classifier = Sequential(Linear(25088, 4096), ReLU, Dropout(0.5), Linear(4096, 4096), ReLU,
Dropout(0.5), Linear(4096, C))``. We rebuild that here (no torchvision import) with the same
module indices, so state_dict keys equal torchvision's (plus our ``normalize.*`` buffers), and
the same initialisation (Kaiming-normal fan-out convs, unit/zero BatchNorm, N(0, 0.01) linears).
That is about 139.6 M parameters, 119.6 M of them in the head: D3 selects every Linear inside
``classifier``, exactly the head BackdoorBench's checkpoints carry.

One adaptation, for inputs smaller than 32 px (the 16 px digits): a max-pool is kept only while
the feature map is at least 2 px, so five pools at 32 px and above (as torchvision), four at
16 px; a skipped pool is an ``nn.Identity`` so later indices do not shift. The spatial size is
taken from ``ModelSpec.image_size``.
"""
from __future__ import annotations

import torch
from torch import nn

from d3tune.models import ModelSpec, Normalize, register

# torchvision's configuration "E" (VGG-19): channel counts, "M" = 2x2 max-pool.
CFG_E: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def make_features(cfg: tuple[int | str, ...], in_channels: int,
                  image_size: int) -> nn.Sequential:
    """Conv-BN-ReLU stacks and max-pools; a pool that would shrink the map below 1 px is skipped."""
    layers: list[nn.Module] = []
    size = image_size
    for v in cfg:
        if v == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            else:
                layers.append(nn.Identity())
        else:
            layers += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1),
                       nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            in_channels = int(v)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """torchvision-layout VGG: ``features`` -> ``avgpool`` (7x7) -> ``classifier`` (3 Linears)."""

    def __init__(self, spec: ModelSpec, cfg: tuple[int | str, ...] = CFG_E,
                 dropout: float = 0.5) -> None:
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.features = make_features(cfg, spec.in_channels, spec.image_size)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(p=dropout),
            nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(p=dropout),
            nn.Linear(4096, spec.num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.avgpool(self.features(self.normalize(x)))
        return self.classifier(torch.flatten(out, 1))


@register("vgg19_bn", head="classifier")
def build(spec: ModelSpec) -> nn.Module:
    return VGG(spec, CFG_E)
