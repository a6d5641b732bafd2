"""A small Vision Transformer (ViT: Dosovitskiy et al. 2021, "An Image is Worth 16x16
Words", arXiv:2010.11929) with pre-norm blocks and ``nn.LayerNorm``, the norm of the
transformers that DP fine-tuning trains."""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["VisionTransformer"]


class _Tokens(nn.Module):
    """Prepends the class token and adds the learned position embedding.

    Its two parameters are its own (no submodule), so that Opacus, which has no sampler
    for them, computes their per-sample gradients with its torch.func fallback, one
    module at a time."""

    def __init__(self, dim, num_patches):
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.normal_(self.cls, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, patches):
        cls = self.cls.expand(patches.shape[0], -1, -1)
        return torch.cat([cls, patches], dim=1) + self.pos


class _SelfAttention(nn.Module):
    """Multi-head self-attention: one qkv projection, scaled dot-product attention
    (``F.scaled_dot_product_attention``), an output projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, T, d / heads]
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``,
    the MLP ``Linear, GELU, Linear``."""

    def __init__(self, dim, heads, mlp_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """A small ViT for 32x32 images.

    Followed, from the ViT paper: a patch embedding (a conv whose kernel and stride are
    the patch size), a class token and a learned position embedding, ``depth``
    pre-norm transformer blocks (LayerNorm, multi-head self-attention, residual;
    LayerNorm, GELU MLP, residual), a final LayerNorm and a linear head on the class
    token. Small: the defaults (patches of 4x4 pixels, so 64 patches and 65 tokens,
    width 192, 3 heads, MLP width 768, 4 blocks; 1.8M parameters) are ViT-Tiny's width
    at a third of its depth, on CIFAR-sized images. No dropout, and no layer keeps
    buffers or mixes examples, as DP-SGD requires.

    Args:
        image_size (int): H = W of the input; a multiple of ``patch_size``.
        patch_size (int): side of a square patch.
        dim (int): token width; a multiple of ``heads``.
        depth (int): transformer blocks.
        heads (int): attention heads.
        mlp_dim (int): hidden width of each block's MLP.
        num_classes (int): 10 for CIFAR-10.
        in_channels (int): 3 for RGB.

    Shape:
        - Input: ``(N, in_channels, image_size, image_size)``.
        - Output: ``(N, num_classes)`` logits.
    """

    def __init__(self, image_size=32, patch_size=4, dim=192, depth=4, heads=3, mlp_dim=768,
                 num_classes=10, in_channels=3):
        super().__init__()
        if image_size % patch_size or dim % heads or depth < 1:
            raise ValueError(f"VisionTransformer: need image_size a multiple of patch_size, dim a "
                             f"multiple of heads and depth >= 1, got image_size={image_size}, "
                             f"patch_size={patch_size}, dim={dim}, heads={heads}, depth={depth}")
        self.patch_embedding = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.tokens = _Tokens(dim, (image_size // patch_size) ** 2)
        self.blocks = nn.Sequential(*(_Block(dim, heads, mlp_dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        patches = self.patch_embedding(x).flatten(2).transpose(1, 2)  # [N, T, dim]
        h = self.norm(self.blocks(self.tokens(patches)))
        return self.head(h[:, 0])
