"""Architectures of differentially private training, with synthetic data, one module
per architecture:

- :class:`WideResNet` (:mod:`.wide_resnet`): WRN-16-4 with GroupNorm, the CIFAR-10
  DP-SGD model of De et al. 2022.
- :class:`DiffusionUNet` (:mod:`.unet`): a small noise-prediction U-Net with GroupNorm
  of the kind DP diffusion models train (DPDM), with :func:`noisy_batch` and
  :func:`noise_prediction_loss` for a DDPM training step.
- :class:`VisionTransformer` (:mod:`.vit`): a small ViT with pre-norm blocks and
  LayerNorm.
- :func:`synthetic_images`, :func:`synthetic_labels` (:mod:`.data`): batches of the
  right shapes.

They hold stock norm layers (``nn.GroupNorm``, ``nn.LayerNorm``), so that
``persample.convert_norms`` converts them, and take width and depth knobs so that tests
can build small versions. No layer keeps buffers or mixes examples (no BatchNorm), as
DP-SGD requires.
"""

from .data import synthetic_images, synthetic_labels
from .unet import DiffusionUNet, noise_prediction_loss, noisy_batch, timestep_embedding
from .vit import VisionTransformer
from .wide_resnet import WideResNet, WSConv2d

__all__ = [
    "WSConv2d", "WideResNet", "DiffusionUNet", "VisionTransformer", "timestep_embedding",
    "noisy_batch", "noise_prediction_loss", "synthetic_images", "synthetic_labels",
]
