"""A small Vision Transformer trained from scratch, the transformer counterpart of the CNNs.

Why not BackdoorBench's: their ``vit_b_16`` is torchvision's ImageNet-pretrained ViT-B/16
(86 M parameters) behind a resize to 224 px, which needs downloaded weights and a GPU. This one
is a ViT-Tiny-width model (dim 192, 3 heads) with CIFAR-sized patches, so it trains from scratch
at the data's own resolution: a conv patch embedding, a class token, learned positional
embeddings, pre-norm ``nn.TransformerEncoder`` blocks (GELU MLP), a final LayerNorm and
``head = Linear(dim, C)`` on the class token (what D3 selects). Patch size 4, or 2 for images of
16 px or less, so 16, 32 and 64 px inputs give 64, 64 and 256 tokens. Dropout is 0. The
positional embeddings are sized for ``ModelSpec.image_size``, so inputs must have that size.
Initialisation follows timm's ViT: truncated-normal (std 0.02) tokens, positions and linears,
zero biases, unit LayerNorms.
"""
from __future__ import annotations

import torch
from torch import nn

from d3tune.models import ModelSpec, Normalize, register


class VisionTransformer(nn.Module):
    def __init__(self, spec: ModelSpec, patch_size: int | None = None, dim: int = 192,
                 depth: int = 6, heads: int = 3, mlp_ratio: float = 2.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if patch_size is None:
            patch_size = 2 if spec.image_size <= 16 else 4
        if spec.image_size % patch_size:
            raise ValueError(f"image size {spec.image_size} is not a multiple of the patch "
                             f"size {patch_size}")
        num_patches = (spec.image_size // patch_size) ** 2
        self.normalize = Normalize(spec.mean, spec.std)
        self.patch_embed = nn.Conv2d(spec.in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=int(dim * mlp_ratio), dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True)
        # enable_nested_tensor only helps padded sequences and warns with norm_first
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, spec.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():  # the fused q/k/v projection is a bare Parameter, not a Linear
            if isinstance(m, nn.MultiheadAttention):
                nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(self.normalize(x)).flatten(2).transpose(1, 2)  # N, L, dim
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        out = self.norm(self.encoder(tokens))
        return self.head(out[:, 0])


@register("vit_small", head="head")
def build(spec: ModelSpec) -> nn.Module:
    return VisionTransformer(spec)
