"""smolcluster: train and serve PyTorch models across a cluster of unlike machines over ZeroMQ."""

__version__ = "0.1.0"
