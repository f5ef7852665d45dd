"""Image students that expose their penultimate features: ``forward(x) -> (logits, features)``.

- :class:`CifarResNet`: He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016),
  section 4.2: 3 stages of ``n`` basic blocks (depth ``6n + 2``: ResNet-32 is n = 5) with 16, 32, 64
  channels and parameter-free shortcuts (option A: subsample and zero-pad channels). ``width``
  scales the channel counts (16 is the paper's); tests use tiny widths.
- :class:`WideResNet`: Zagoruyko and Komodakis, "Wide Residual Networks" (BMVC 2016): pre-activation
  blocks, depth ``6n + 4`` (WRN-28-10: n = 4, widen factor 10), optional dropout between convs.

The features are the globally average-pooled output of the last stage (the input of the linear
classifier): the paper's internal state I0.
"""
from typing import Tuple

import torch.nn.functional as F
from torch import Tensor, nn


def _init_weights(model: nn.Module):
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus an option-A shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
        if self.extra_channels:
            half = self.extra_channels // 2
            shortcut = F.pad(shortcut, (0, 0, 0, 0, half, self.extra_channels - half))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth ``6n + 2`` (ResNet-32 by default)."""

    def __init__(self, num_classes: int, depth: int = 32, width: int = 16, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (8, 20, 32, 56, 110), got {depth}")
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        blocks = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        layers, channels = [], width
        for stage, out_channels in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(channels, out_channels, stride))
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out = self.layers(F.relu(self.bn(self.conv(x))))
        features = out.mean(dim=(2, 3))  # N x feature_dim
        return self.fc(features), features


class WideBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-(dropout)-BN-ReLU-conv, plus a 1x1-conv shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(nn.Module):
    """WRN-depth-widen (WRN-28-10 by default)."""

    def __init__(self, num_classes: int, depth: int = 28, widen: int = 10, dropout: float = 0.0,
                 in_channels: int = 3, width: int = 16):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 with n >= 1 (10, 16, 28, 40), got {depth}")
        blocks = (depth - 4) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        layers, channels = [], width
        for stage in range(3):
            out_channels = width * widen * 2**stage
            for i in range(blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(WideBlock(channels, out_channels, stride, dropout))
                channels = out_channels
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(channels)
        self.feature_dim = channels
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out = F.relu(self.bn(self.layers(self.conv(x))))
        features = out.mean(dim=(2, 3))  # N x feature_dim
        return self.fc(features), features


def build_student(arch: str, num_classes: int, in_channels: int, depth: int = 0, width: int = 16,
                  widen: int = 10, dropout: float = 0.0) -> nn.Module:
    """``arch`` "resnet" (default depth 32) or "wrn" (default 28); depth 0 picks the default."""
    if arch == "resnet":
        return CifarResNet(num_classes, depth or 32, width, in_channels)
    if arch == "wrn":
        return WideResNet(num_classes, depth or 28, widen, dropout, in_channels, width)
    raise ValueError(f"unknown arch {arch!r}: choose resnet or wrn")
