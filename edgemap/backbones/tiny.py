"""A tiny randomly initialised CNN: fast tests of every stage at 32 px."""

from __future__ import annotations

import torch
from torch import nn

from edgemap.backbones.registry import BackboneSpec, register_backbone


class TinyNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        chans = [3, width, width * 2, width * 4]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = chans[-1]
        self._fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self.forward_features(x))


@register_backbone(
    BackboneSpec(
        name="tiny",
        input_size=32,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=(127.0, 127.0, 127.0),
        std=(128.0, 128.0, 128.0),
        num_features=64,
        size_multiple=1,
        weights="random init (for tests)",
        description="3-conv CNN, random init: exercises every stage in seconds",
    )
)
def _tiny() -> nn.Module:
    return TinyNet()
