"""Attention of a set of queries to context tokens: cross-attention with optional positional codes on queries
and keys, and the query block (cross-attention, optional self-attention, MLP) of query-based decoders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import Tensor, nn

from selfsup3d.errors import ConfigError


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``[B, Q, dim]`` to context tokens ``[B, T, context_dim]`` through
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where available).

    Optional positional codes ``[Q, head_dim]`` and ``[T, head_dim]`` are added to every head's queries and
    keys after the projections, times a learnable per-head scale: attention then prefers matching
    positions from the first step instead of having to discover them.

    Args:
        dim: query width (and output width).
        context_dim: width of the context tokens.
        num_heads: attention heads; ``dim`` must be divisible by it.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"decoder width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.pos_scale = nn.Parameter(torch.ones(num_heads, 1, 1))

    def forward(self, x: Tensor, context: Tensor, q_pos: Tensor | None = None, k_pos: Tensor | None = None) -> Tensor:
        b, q_len, d = x.shape
        h = self.num_heads
        q = self.q(x).view(b, q_len, h, d // h).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        if q_pos is not None and k_pos is not None:
            q = q + self.pos_scale.to(q.dtype) * q_pos.to(q.dtype)
            k = k + self.pos_scale.to(k.dtype) * k_pos.to(k.dtype)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, q_len, d))


class QueryBlock(nn.Module):
    """Pre-norm block of the triplane queries: cross-attention to the representation, optional
    self-attention among the queries (timm's ``Attention``, SDPA), MLP.

    Args:
        dim: query width.
        context_dim: width of the representation tokens (after the input projection: ``dim``).
        num_heads: attention heads.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        self_attention: add self-attention among the queries.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, mlp_ratio: float, self_attention: bool) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_ctx = nn.LayerNorm(context_dim)
        self.cross = CrossAttention(dim, context_dim, num_heads)
        self.norm_self = nn.LayerNorm(dim) if self_attention else None
        self.self_attn = Attention(dim, num_heads=num_heads, qkv_bias=True) if self_attention else None
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor, q_pos: Tensor | None = None, k_pos: Tensor | None = None) -> Tensor:
        x = x + self.cross(self.norm_q(x), self.norm_ctx(context), q_pos, k_pos)
        if self.self_attn is not None and self.norm_self is not None:
            x = x + self.self_attn(self.norm_self(x))
        return x + self.mlp(self.norm_mlp(x))
