"""A small CNN digit classifier; also the worked example of a custom model (_target_)."""

from __future__ import annotations

import math

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks and a linear head; images arrive flat (N, side*side) and are reshaped."""

    def __init__(self, in_features: int = 784, num_classes: int = 10, channels: list[int] = (16, 32)):
        super().__init__()
        self.side = math.isqrt(in_features)
        if self.side * self.side != in_features:
            raise ValueError(f"SmallCNN needs square images; got {in_features} features")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(c2 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 1, self.side, self.side)
        return self.head(self.features(x).flatten(1))
