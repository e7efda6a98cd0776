"""A user's own nn.Module, named in config by _target_ (see docs/configuration.md)."""

from torch import nn


class TinyNet(nn.Module):
    """Takes only what it needs: in_features and num_classes come from the data."""

    def __init__(self, in_features: int, num_classes: int, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.body(x)
