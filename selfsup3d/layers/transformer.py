"""Transformer stacks for the heads: pre-LN timm blocks with QK normalisation, SDPA attention, optional
gradient checkpointing, and alternating frame-wise / global attention for sets of views (VGGT-style)."""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Transformer(nn.Module):
    """Pre-LN timm :class:`~timm.models.vision_transformer.Block` s with QK normalisation (attention through
    ``F.scaled_dot_product_attention``), a final LayerNorm and optional gradient checkpointing.

    With ``frames``, the sequence is that many equal-length frames (views) and attention alternates, as in
    VGGT: even blocks attend within each frame, odd blocks across all frames. That tells a view's tokens
    apart from the other views' without any view-index embedding, so any number of views works.

    Args:
        dim: token width.
        depth: number of blocks (at least 1).
        num_heads: attention heads (``dim`` must be divisible by it).
        mlp_ratio: MLP hidden width over ``dim``.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=False, qk_norm=True) for _ in range(depth)
        )
        for block in self.blocks:
            block.attn.fused_attn = True
        self.norm = nn.LayerNorm(dim)
        self.grad_checkpointing = False
        self.apply(init_linear)
        # depth-scaled init of the residual projections (GPT-2 / RayZer)
        for i, block in enumerate(self.blocks):
            for proj in (block.attn.proj, block.mlp.fc2):
                proj.weight.data.div_(math.sqrt(2.0 * (i + 1)))

    def forward(self, x: Tensor, frames: int | None = None) -> Tensor:
        """``[B, L, D] -> [B, L, D]``; ``frames`` splits ``L`` into that many frames (alternating attention)."""
        b, length, d = x.shape
        for i, block in enumerate(self.blocks):
            within = frames is not None and i % 2 == 0
            if within:
                x = x.reshape(b * frames, length // frames, d)
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if within:
                x = x.reshape(b, length, d)
        return self.norm(x)


def init_linear(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) weights and zero biases for linear layers (ViT / RayZer init)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
