"""Tiny builds of real architectures from model libraries that DP users train or
fine-tune with GroupNorm, for tests/test_model_zoo.py and
torch_compile_tests/test_model_zoo_compiled.py. Every model is built from the library's
own code and a small config: no weights are downloaded.

- timm's ResNetV2 (BiT, Big Transfer, the backbone of DP transfer learning): its norms
  are ``GroupNormAct``, an ``nn.GroupNorm`` subclass whose own forward calls
  ``F.group_norm`` and then the activation (routed, not replaced), after weight-
  standardised convolutions (``StdConv2d``);
- torchvision's ResNet with ``norm_layer=nn.GroupNorm(32, c)``, the usual DP swap of
  BatchNorm (Opacus's tutorials): stock modules at torchvision's full widths;
- diffusers' ``UNet2DModel`` with attention blocks (DP diffusion models): stock
  ``nn.GroupNorm`` in the ResNet blocks and in ``Attention.group_norm``, which an
  attention processor calls, not the block's own forward;
- diffusers' ``ResnetBlockCondNorm2D`` with ``time_embedding_norm="ada_group"`` (the
  k-diffusion U-Net blocks): ``AdaGroupNorm`` calls ``F.group_norm`` without affine
  parameters, then scales and shifts by a projected embedding (routed, not replaced);
- MONAI's ``SegResNet`` with ``norm="group"`` (DP medical segmentation, federated
  learning): stock ``nn.GroupNorm`` on 3-D volumes.

Each :class:`Zoo` entry gives a model whose output fits ``F.cross_entropy`` with its
labels (class logits, or per-pixel/voxel logits with label maps), so the per-example
references of tests/convert_models.py apply unchanged.
"""

import dataclasses
import importlib.util
from functools import partial
from typing import Callable

import torch
import torch.nn as nn

TIMESTEP = 10  # the diffusion step the U-Net is run at: any fixed step serves


@dataclasses.dataclass(frozen=True)
class Zoo:
    """One architecture: ``build()`` returns ``(model, inputs, labels)``."""

    library: str  # the import name whose absence skips the tests
    build: Callable


def skip_reason(library):
    """Why a library's tests are skipped, or None when it is installed."""
    if importlib.util.find_spec(library) is not None:
        return None
    return f"{library} is not installed (the 'zoo' extra: pip install -e '.[zoo]'; scripts/test.sh installs it on torch 2.14.1)"


def load_case(cls):
    """Sets ``cls.stock, cls.x, cls.y`` (the architecture named by ``cls.zoo``, built
    tiny), ``cls.norm_params`` and, once per model, the references restricted to them:
    ``cls.stock_grads`` (stock's own vmap(grad) in float32, the error scale) and
    ``cls.ref_grads`` (the float64 truth). Skips, with the reason, where the library is
    missing."""
    import unittest

    from tests.convert_models import float64_per_example_grads, func_per_example_grads

    reason = skip_reason(ZOO[cls.zoo].library)
    if reason:
        raise unittest.SkipTest(reason)
    cls.stock, cls.x, cls.y = ZOO[cls.zoo].build()
    cls.norm_params = group_norm_params(cls.stock)
    stock = func_per_example_grads(cls.stock, cls.x, cls.y)
    ref = float64_per_example_grads(cls.stock, cls.x, cls.y)
    cls.stock_grads = {k: stock[k] for k in cls.norm_params}
    cls.ref_grads = {k: ref[k] for k in cls.norm_params}


def group_norm_params(model):
    """The names of the affine parameters of ``model``'s ``nn.GroupNorm`` modules
    (subclasses included): those that per-sample GroupNorm gradients cover."""
    return [f"{path}.{p}" for path, m in model.named_modules()
            if isinstance(m, nn.GroupNorm) and m.affine for p in ("weight", "bias")]


def _finish(model, x, y):
    """Non-trivial norm parameters (a fresh norm's ones and zeros would hide a swapped
    weight and bias or a missed affine), then the model in training mode."""
    norms = set(group_norm_params(model))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in norms:
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p))
    return model.train(), x, y


def _classes(n, shape=(), classes=3):
    return torch.randint(0, classes, (n, *shape))


def timm_resnetv2():
    """BiT's pre-activation ResNetV2, two bottleneck stages at 1/64 of its widths."""
    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    # Bottlenecks of 8 and 16 channels: 4 groups (BiT's 32 need 32 channels at least).
    model = ResNetV2(layers=[1, 1], channels=(32, 64), stem_chs=16, num_classes=3,
                     norm_layer=partial(GroupNormAct, num_groups=4))
    return _finish(model, torch.randn(4, 3, 32, 32), _classes(4))


def torchvision_resnet():
    """ResNet with one BasicBlock per stage (torchvision's widths, 64 to 512 channels),
    every BatchNorm replaced by GroupNorm(32, c)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3, norm_layer=lambda c: nn.GroupNorm(32, c))
    return _finish(model, torch.randn(4, 3, 32, 32), _classes(4))


class Denoiser(nn.Module):
    """A diffusers ``UNet2DModel`` at a fixed timestep, returning the prediction tensor
    (not its output dataclass), scored as per-pixel 3-class logits."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x):
        return self.unet(x, TIMESTEP).sample


def diffusers_unet():
    """Two resolutions, the lower one with self-attention, down and up."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=4, attention_head_dim=8,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    return _finish(Denoiser(unet), torch.randn(4, 3, 8, 8), _classes(4, (8, 8)))


class Conditioned(nn.Module):
    """A diffusers ``ResnetBlockCondNorm2D`` whose embedding is projected from the
    input's channel means, so that the model takes one input, as the references need."""

    def __init__(self, block, channels, temb_channels):
        super().__init__()
        self.embed = nn.Linear(channels, temb_channels)
        self.block = block

    def forward(self, x):
        return self.block(x, self.embed(x.mean((2, 3))))


def diffusers_ada_group_block():
    """One conditional ResNet block of 8 channels, 4 groups: two AdaGroupNorms."""
    from diffusers.models.resnet import ResnetBlockCondNorm2D

    torch.manual_seed(0)
    block = ResnetBlockCondNorm2D(in_channels=8, out_channels=8, temb_channels=16, groups=4, groups_out=4,
                                  time_embedding_norm="ada_group")
    return Conditioned(block, 8, 16).train(), torch.randn(4, 8, 6, 6), _classes(4, (6, 6), classes=8)


def monai_segresnet():
    """A 3-D SegResNet, two levels of 8 and 16 channels, two-class voxel labels."""
    from monai.networks.nets import SegResNet

    torch.manual_seed(0)
    model = SegResNet(spatial_dims=3, init_filters=8, in_channels=1, out_channels=2,
                      blocks_down=(1, 1), blocks_up=(1,), norm=("GROUP", {"num_groups": 4}))
    return _finish(model, torch.randn(3, 1, 8, 8, 8), _classes(3, (8, 8, 8), classes=2))


ZOO = {
    "timm_resnetv2": Zoo("timm", timm_resnetv2),
    "torchvision_resnet": Zoo("torchvision", torchvision_resnet),
    "diffusers_unet": Zoo("diffusers", diffusers_unet),
    "monai_segresnet": Zoo("monai", monai_segresnet),
}
