"""Two GroupNorm architectures of differentially private training, with synthetic data.

- :class:`WideResNet`: WRN-16-4 with GroupNorm, the CIFAR-10 DP-SGD model of De et al.
  2022, "Unlocking High-Accuracy Differentially Private Image Classification through
  Scale" (arXiv:2204.13650), as defined in their code (google-deepmind/jax_privacy,
  ``experiments/image_classification/models/cifar.py``).
- :class:`DiffusionUNet`: a small noise-prediction U-Net of the kind DP diffusion models
  train (DPDM: Dockhorn et al. 2022, "Differentially Private Diffusion Models",
  arXiv:2210.09929, whose network is the NCSN++ U-Net of Song et al. 2021 at a small
  size), with :func:`noisy_batch` and :func:`noise_prediction_loss` for a DDPM training
  step (Ho et al. 2020).

Both hold stock ``nn.GroupNorm`` layers, so that ``persample.convert_group_norm``
converts them, and take width and depth knobs so that tests can build small versions.
No layer keeps buffers or mixes examples (no BatchNorm), as DP-SGD requires.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "WSConv2d", "WideResNet", "DiffusionUNet", "timestep_embedding", "noisy_batch",
    "noise_prediction_loss", "synthetic_images", "synthetic_labels",
]


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


def _groups(channels):
    # NCSN++'s rule (DPDM's network): groups of at least 4 channels, at most 32 groups.
    return min(channels // 4, 32)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of diffusion times (DDPM's, of ``1000 * t``).

    Args:
        t (Tensor[N]): times in [0, 1].
        dim (int): even embedding width.

    Returns:
        Tensor[N, dim]
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / half))
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(t.dtype)


class _ResBlock(nn.Module):
    """GroupNorm, SiLU, conv; plus the projected time embedding; GroupNorm, SiLU, conv;
    a 1x1 conv on the skip path where the width changes; sum scaled by 1/sqrt(2)."""

    def __init__(self, cin, cout, temb_dim):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (h + self.skip(x)) * (1 / math.sqrt(2))


class _Attention(nn.Module):
    """Single-head self-attention over the H*W positions, GroupNorm first, residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).chunk(3, dim=1)  # [N, C, HW] each
        weights = torch.softmax(q.transpose(1, 2) @ k * (c ** -0.5), dim=-1)  # [N, HW, HW]
        out = (v @ weights.transpose(1, 2)).view(n, c, h, w)
        return (x + self.proj(out)) * (1 / math.sqrt(2))


class DiffusionUNet(nn.Module):
    """A small noise-prediction U-Net as DP diffusion models train it (DPDM).

    Followed, from DPDM's NCSN++ (``model/ncsnpp.py`` of nv-tlabs/DPDM): residual
    blocks of GroupNorm (``min(C / 4, 32)`` groups, eps 1e-6) and SiLU with the time
    embedding added between the two convs; a sinusoidal time embedding through a
    two-layer MLP of width ``4 * base``; channel multipliers (1, 2, 2), i.e. three
    resolutions (32, 16, 8 for 32x32 images); skip sums scaled by 1/sqrt(2); a final
    GroupNorm, SiLU and conv. Simplified: one self-attention block, in the middle at
    the lowest resolution (NCSN++ also has them at 16x16 in both paths); one skip
    connection per resolution instead of one per block; strided-conv downsampling and
    nearest-neighbour upsampling instead of BigGAN-style resampling blocks; no class
    conditioning; DDPM's noise-prediction loss (:func:`noise_prediction_loss`) instead
    of DPDM's EDM loss, and one noise draw per example instead of DPDM's noise
    multiplicity (which averages several inside each example's loss).

    Args:
        in_channels (int): image channels (3).
        base (int): width of the first resolution (32 in DPDM); must be a multiple of 4.
        mult (tuple[int]): width multiplier per resolution; ``len(mult)`` resolutions.
        num_res_blocks (int): residual blocks per resolution and path.

    Shape:
        - Input: ``x`` ``(N, in_channels, H, W)`` (H and W divisible by
          ``2 ** (len(mult) - 1)``), ``t`` ``(N,)`` times in [0, 1].
        - Output: ``(N, in_channels, H, W)``, the predicted noise.
    """

    def __init__(self, in_channels=3, base=32, mult=(1, 2, 2), num_res_blocks=1):
        super().__init__()
        if base % 4 or base < 8 or not mult or num_res_blocks < 1:
            raise ValueError(f"DiffusionUNet: need base a multiple of 4 (>= 8), mult non-empty and "
                             f"num_res_blocks >= 1, got base={base}, mult={mult}, "
                             f"num_res_blocks={num_res_blocks}")
        self.base, temb_dim = base, 4 * base
        self.temb = nn.Sequential(nn.Linear(base, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.stem = nn.Conv2d(in_channels, base, 3, padding=1)
        widths = [base * m for m in mult]
        self.down, self.downsample, cin = nn.ModuleList(), nn.ModuleList(), base
        for i, ch in enumerate(widths):
            self.down.append(nn.ModuleList(_ResBlock(cin if j == 0 else ch, ch, temb_dim)
                                           for j in range(num_res_blocks)))
            cin = ch
            if i < len(widths) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid = nn.ModuleList([_ResBlock(cin, cin, temb_dim), _Attention(cin),
                                  _ResBlock(cin, cin, temb_dim)])
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, ch in reversed(list(enumerate(widths))):
            self.up.append(nn.ModuleList(_ResBlock(cin + ch if j == 0 else ch, ch, temb_dim)
                                         for j in range(num_res_blocks)))
            cin = ch
            if i > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))
        self.out_norm = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.out = nn.Conv2d(cin, in_channels, 3, padding=1)

    def forward(self, x, t):
        temb = self.temb(timestep_embedding(t, self.base))
        h, skips = self.stem(x), []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, temb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, temb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, size=(2 * h.shape[2], 2 * h.shape[3]), mode="nearest"))
        return self.out(F.silu(self.out_norm(h)))


def noisy_batch(x0, generator=None):
    """One DDPM training draw per example, on a cosine schedule (Nichol & Dhariwal 2021).

    Args:
        x0 (Tensor[N, C, H, W]): clean images, roughly in [-1, 1].
        generator (torch.Generator, optional): on ``x0``'s device.

    Returns:
        tuple: ``x_t`` (Tensor[N, C, H, W]) the noised images, ``t`` (Tensor[N]) their
        times in [0, 1), and ``noise`` (Tensor[N, C, H, W]), the regression target.
    """
    t = torch.rand(x0.shape[0], generator=generator, device=x0.device, dtype=x0.dtype)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    alpha_bar = torch.cos(t * (math.pi / 2)).square().clamp(min=1e-4).view(-1, 1, 1, 1)
    return alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise, t, noise


def noise_prediction_loss(predicted, noise, reduction="mean"):
    """DDPM's loss: each example's mean squared error of the predicted noise.

    Args:
        predicted (Tensor[N, *]), noise (Tensor[N, *]): prediction and target.
        reduction (str): ``"none"`` (Tensor[N], one loss per example), ``"mean"`` or
            ``"sum"`` over the examples.
    """
    per_example = (predicted - noise).square().flatten(1).mean(1)
    if reduction == "none":
        return per_example
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "none", "mean" or "sum", got {reduction!r}')
    return per_example.mean() if reduction == "mean" else per_example.sum()


def synthetic_images(n, size=32, channels=3, *, generator=None, device=None):
    """Tensor[n, channels, size, size]: standard-normal stand-ins for standardised CIFAR-10
    images (no download here). The timings do not depend on the pixel values."""
    return torch.randn(n, channels, size, size, generator=generator, device=device)


def synthetic_labels(n, num_classes=10, *, generator=None, device=None):
    """Tensor[n] of class indices."""
    return torch.randint(0, num_classes, (n,), generator=generator, device=device)
