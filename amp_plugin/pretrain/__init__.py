"""Label-free pre-training of the demo teacher (SimCLR on the digits images)."""

from .simclr import train_simclr

__all__ = ["train_simclr"]
