"""Synthetic stand-ins for CIFAR-10 batches (no download here)."""

import torch

__all__ = ["synthetic_images", "synthetic_labels"]


def synthetic_images(n, size=32, channels=3, *, generator=None, device=None):
    """Tensor[n, channels, size, size]: standard-normal stand-ins for standardised CIFAR-10
    images (no download here). The timings do not depend on the pixel values."""
    return torch.randn(n, channels, size, size, generator=generator, device=device)


def synthetic_labels(n, num_classes=10, *, generator=None, device=None):
    """Tensor[n] of class indices."""
    return torch.randint(0, num_classes, (n,), generator=generator, device=device)
