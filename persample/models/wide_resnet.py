"""WRN-16-4 with GroupNorm, the CIFAR-10 DP-SGD model of De et al. 2022, "Unlocking
High-Accuracy Differentially Private Image Classification through Scale"
(arXiv:2204.13650), as defined in their code (google-deepmind/jax_privacy,
``experiments/image_classification/models/cifar.py``)."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WSConv2d", "WideResNet"]


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with scaled weight standardization and a learnable gain.

    The convolution uses ``gain * (w - mean(w)) / sqrt(max(fan_in * var(w), eps))``,
    the statistics taken per output channel, as jax_privacy's ``WSConv2D`` (from NFNets,
    Brock et al. 2021) does; De et al. 2022 found it helps DP-SGD. It is a function of
    the parameters alone, so per-sample gradients flow through it unchanged.

    Args:
        in_channels (int), out_channels (int), kernel_size (int), stride (int),
        padding (int): as for ``nn.Conv2d`` (always with a bias).
        eps (float): floor of ``fan_in * var(w)``. Default: 1e-4, jax_privacy's.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, eps=1e-4):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding)
        self.gain = nn.Parameter(torch.ones(out_channels))
        self.eps = eps
        nn.init.kaiming_normal_(self.weight, nonlinearity="linear")  # variance scaling 1.0, fan in
        nn.init.zeros_(self.bias)

    def standardized_weight(self):
        """Tensor[C_out, C_in, k, k]: the weight that the convolution uses."""
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * w[0].numel(), min=self.eps)) * self.gain.view(-1, 1, 1, 1)
        return w * scale - mean * scale

    def forward(self, input):
        return F.conv2d(input, self.standardized_weight(), self.bias, self.stride, self.padding)


class _WideBlock(nn.Module):
    """Pre-activation residual block in jax_privacy's order: ReLU, GroupNorm, conv, twice.
    The first block of a stage projects the skip path (ReLU, GroupNorm, 1x1 conv)."""

    def __init__(self, cin, cout, stride, groups, conv):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = conv(cin, cout, 3, stride, 1)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = conv(cout, cout, 3, 1, 1)
        self.project = cin != cout or stride != 1
        if self.project:
            self.skip_norm = nn.GroupNorm(groups, cin)
            self.skip_conv = conv(cin, cout, 1, stride, 0)

    def forward(self, x):
        out = self.conv1(self.norm1(F.relu(x)))
        out = self.conv2(self.norm2(F.relu(out)))
        skip = self.skip_conv(self.skip_norm(F.relu(x))) if self.project else x
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-width with GroupNorm: the CIFAR-10 model of De et al. 2022 (WRN-16-4).

    Followed, from jax_privacy's ``WideResNet`` and the WRN-16-4 CIFAR-10 config:
    a 3x3 stem conv of 16 channels; three stages of ``(depth - 4) / 6`` residual
    blocks with ``16 * width``, ``32 * width``, ``64 * width`` channels, strides 1, 2, 2;
    each block applies ReLU, then GroupNorm (16 groups, no BatchNorm anywhere), then a
    weight-standardized conv (:class:`WSConv2d`), twice; the first block of each stage
    projects its skip path with ReLU, GroupNorm and a 1x1 conv; a final ReLU and
    GroupNorm, global average pooling and a linear classifier. Simplified: PyTorch's
    symmetric padding instead of TensorFlow's ``SAME`` (which pads stride-2 convs on one
    side only); no dropout (0 in their config); their augmentation multiplicity (16
    augmented copies of each example, whose gradients are averaged before clipping) is
    a data pipeline matter, left out.

    Args:
        depth (int): 16 for WRN-16-4; ``depth - 4`` must be a multiple of 6.
        width (int): channel multiplier, 4 for WRN-16-4.
        num_classes (int): 10 for CIFAR-10.
        groups (int): GroupNorm groups; must divide 16 and every stage's width.
        in_channels (int): 3 for RGB.
        weight_standardization (bool): :class:`WSConv2d` (True, as the paper) or
            ``nn.Conv2d``.

    Shape:
        - Input: ``(N, in_channels, H, W)``, e.g. ``(N, 3, 32, 32)`` for CIFAR-10
          (any H, W >= 4 works: the pooling is global).
        - Output: ``(N, num_classes)`` logits.
    """

    def __init__(self, depth=16, width=4, num_classes=10, groups=16, in_channels=3,
                 weight_standardization=True):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth - 4 must be a positive multiple of 6, got depth={depth}")
        if width < 1 or 16 % groups:
            raise ValueError(f"WideResNet: need width >= 1 and groups dividing 16, "
                             f"got width={width}, groups={groups}")
        conv = WSConv2d if weight_standardization else nn.Conv2d
        self.stem = conv(in_channels, 16, 3, 1, 1)
        blocks, cin = [], 16
        for cout, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for i in range((depth - 4) // 6):
                blocks.append(_WideBlock(cin, cout, stride if i == 0 else 1, groups, conv))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.final_norm = nn.GroupNorm(groups, cin)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        h = self.final_norm(F.relu(self.blocks(self.stem(x))))
        return self.head(h.mean(dim=(2, 3)))
