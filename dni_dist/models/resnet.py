"""The CIFAR ResNet of He et al. (2016, section 4.2), as an ``nn.Sequential`` of blocks.

Depth 6n + 2: a 3x3 stem convolution, then 3 stages of n basic residual blocks (two 3x3
convolutions with batch norm each) at widths c, 2c and 4c (c = ``model.channels``; 16 is the
paper's network), the first block of stages 2 and 3 halving the resolution, then global
average pooling and a linear classifier. ResNet-20 is n = 3, ResNet-56 n = 9.

Blocks (the units a cut respects): the stem, each residual block, the head. A cut never
splits a residual block, so a skip connection never crosses a cut, and every cut carries a
feature map (C, H, W), where the conv SG applies. Downsampling shortcuts are 1x1
convolutions with batch norm (the paper's option B), so every weight is a Conv2d or Linear
that method=fa can swap.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dni_dist.errors import ConfigError


class BasicBlock(nn.Module):
    """relu(BN(conv(relu(BN(conv(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(x))


def build_resnet(depth: int, channels: int, input_shape: tuple[int, ...], n_outputs: int) -> nn.Sequential:
    """ResNet-``depth`` for images of shape (C, H, W)."""
    if depth < 8 or (depth - 2) % 6:
        raise ConfigError(f"model.depth={depth}: model.kind='resnet' needs depth 6n+2 (8, 14, 20, 32, 44, 56, ...)")
    if len(input_shape) != 3:
        raise ConfigError(
            f"model.kind='resnet' needs image inputs (C, H, W), got input shape {tuple(input_shape)}; "
            "use an image set such as data.name=digits16"
        )
    n = (depth - 2) // 6
    stem = nn.Sequential(nn.Conv2d(input_shape[0], channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels))
    stem.append(nn.ReLU())
    blocks: list[nn.Module] = [stem]
    c_in = channels
    for stage, c_out in enumerate((channels, 2 * channels, 4 * channels)):
        for i in range(n):
            blocks.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
            c_in = c_out
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_outputs)))
    return nn.Sequential(*blocks)
