"""A small noise-prediction U-Net of the kind DP diffusion models train (DPDM: Dockhorn
et al. 2022, "Differentially Private Diffusion Models", arXiv:2210.09929, whose network
is the NCSN++ U-Net of Song et al. 2021 at a small size), with :func:`noisy_batch` and
:func:`noise_prediction_loss` for a DDPM training step (Ho et al. 2020)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DiffusionUNet", "timestep_embedding", "noisy_batch", "noise_prediction_loss"]


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
