"""A small CNN for CPU defaults: trains on the digits in seconds and still has a BatchNorm'd
feature extractor and a separate linear head named ``linear`` like PreActResNet-18's."""
from __future__ import annotations

from torch import nn

from d3tune.models import ModelSpec, Normalize, register


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    def __init__(self, spec: ModelSpec, width: int = 32) -> None:
        super().__init__()
        self.normalize = Normalize(spec.mean, spec.std)
        self.features = nn.Sequential(
            _block(spec.in_channels, width), _block(width, width), nn.MaxPool2d(2),
            _block(width, 2 * width), _block(2 * width, 2 * width), nn.MaxPool2d(2),
            _block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.linear = nn.Linear(4 * width, spec.num_classes)

    def forward(self, x):
        return self.linear(self.features(self.normalize(x)))


@register("cnn", head="linear")
def build(spec: ModelSpec) -> nn.Module:
    return SmallCNN(spec)
