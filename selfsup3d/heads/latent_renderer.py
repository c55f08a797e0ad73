"""The scene reconstructor and renderer of masked-view prediction (RayZer / LVSM), and the context blend.

* :class:`SceneReconstructor`: the context views' encoder tokens fused with their Plücker ray tokens, run
  through a transformer with learnable scene tokens: the scene representation.
* :class:`Renderer`: an LVSM-style decoder: each target's ray tokens attend jointly with the scene tokens and
  become pixels.
* :class:`ContextBlend` (with :func:`camera_proximity`): an image-based-rendering prior for small, short
  runs: a base image per target blended from the context views by predicted-camera distance.
"""

from __future__ import annotations

import math

import torch
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from selfsup3d.geometry.rays import patchify, unpatchify
from selfsup3d.layers.transformer import Transformer, init_linear


class SceneReconstructor(nn.Module):
    """Scene tokens from set A: encoder tokens fused with Plücker ray tokens (an MLP on their concatenation),
    run through a transformer together with learnable scene tokens.

    Args:
        in_dim: encoder width.
        ray_dim: Plücker features per patch (``6 p²``).
        dim: transformer width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width ratio.
        num_scene_tokens: learnable scene tokens (the scene representation).
    """

    def __init__(
        self, in_dim: int, ray_dim: int, dim: int, depth: int, num_heads: int, mlp_ratio: float, num_scene_tokens: int
    ) -> None:
        super().__init__()
        self.image_proj = nn.Linear(in_dim, dim)
        self.ray_embed = nn.Linear(ray_dim, dim)
        self.fuse = Mlp(2 * dim, dim, dim)
        self.scene_tokens = nn.Parameter(torch.zeros(num_scene_tokens, dim))
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio)
        trunc_normal_(self.scene_tokens, std=0.02)
        for m in (self.image_proj, self.ray_embed, self.fuse):
            m.apply(init_linear)

    def no_weight_decay(self) -> set[str]:
        return {"scene_tokens"}

    def forward(
        self, feats: Tensor, rays: Tensor, positions: Tensor | None = None, keep_context: bool = False
    ) -> Tensor:
        """``[B, Va, N, in_dim]`` tokens and ``[B, Va, N, ray_dim]`` ray patches -> ``[B, S, dim]`` scene tokens
        (``[B, S + Va N, dim]`` with the context tokens' outputs after them when ``keep_context``);
        ``positions`` (``[N, dim]``) are added to the fused tokens."""
        b = feats.shape[0]
        x = self.fuse(torch.cat([self.image_proj(feats), self.ray_embed(rays.to(feats.dtype))], dim=-1))
        if positions is not None:
            x = x + positions.to(x.dtype)
        x = torch.cat([self.scene_tokens.expand(b, -1, -1).to(x.dtype), x.flatten(1, 2)], dim=1)
        x = self.transformer(x)
        return x if keep_context else x[:, : self.scene_tokens.shape[0]]


class Renderer(nn.Module):
    """LVSM-style decoder: each target's Plücker ray tokens attend jointly with the scene tokens; the target
    tokens become ``p² · 3`` pixel values through a linear layer and a sigmoid.

    With ``refine_base`` the renderer refines a base image per target (see :class:`ContextBlend`): the base's
    patches are embedded into the target tokens, and the pixel layer predicts a correction of the base's
    logits instead of the pixels outright.

    Args:
        ray_dim: Plücker features per patch (``6 p²``).
        dim: transformer width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width ratio.
        patch_size: pixels per patch side.
        refine_base: take a base image per target (``base`` in :meth:`forward`).
    """

    def __init__(
        self,
        ray_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        patch_size: int,
        refine_base: bool = False,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.ray_embed = nn.Linear(ray_dim, dim)
        self.base_embed = nn.Linear(3 * patch_size * patch_size, dim) if refine_base else None
        self.input_norm = nn.LayerNorm(dim)
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio)
        self.to_pixels = nn.Linear(dim, 3 * patch_size * patch_size)
        for m in (self.ray_embed, self.base_embed, self.to_pixels):
            if m is not None:
                init_linear(m)

    def forward(
        self,
        rays: Tensor,
        scene: Tensor,
        height: int,
        width: int,
        positions: Tensor | None = None,
        base: Tensor | None = None,
    ) -> Tensor:
        """Render the targets.

        Args:
            rays: ``[B, Vb, N, ray_dim]`` target ray patches.
            scene: ``[B, S, dim]`` scene tokens.
            height: image height.
            width: image width.
            positions: ``[N, dim]`` added to the ray tokens.
            base: ``[B, Vb, 3, H, W]`` base images in ``[0, 1]`` (needs ``refine_base``).

        Returns:
            ``[B, Vb, 3, H, W]`` in ``[0, 1]``.
        """
        if (base is None) != (self.base_embed is None):
            raise ValueError("a base image goes with refine_base=True, and only then")
        b, vb, n, _ = rays.shape
        x = self.ray_embed(rays.to(scene.dtype))
        if positions is not None:
            x = x + positions.to(x.dtype)
        base_patches = None
        if base is not None and self.base_embed is not None:
            base_patches = patchify(base, self.patch_size)  # [B, Vb, N, 3 p²]
            x = x + self.base_embed(base_patches.to(x.dtype))
        x = x.flatten(0, 1)  # [B * Vb, N, D]
        s = scene.repeat_interleave(vb, dim=0)  # [B * Vb, S, D]
        x = self.transformer(self.input_norm(torch.cat([x, s], dim=1)))[:, :n]
        logits = self.to_pixels(x).float()  # [B * Vb, N, 3 p²]
        if base_patches is not None:
            logits = logits + torch.logit(base_patches.flatten(0, 1).float().clamp(1e-3, 1 - 1e-3))
        return unpatchify(torch.sigmoid(logits), self.patch_size, height, width).unflatten(0, (b, vb))


def camera_proximity(c2w_a: Tensor, c2w_b: Tensor, eps: float = 1e-4) -> Tensor:
    """A smooth distance between every camera of ``c2w_a [B, Na, 4, 4]`` and every one of ``c2w_b [B, Nb, 4, 4]``:
    ``sqrt(1 - cos θ + ‖c_a - c_b‖² + ε²)`` with ``θ`` the angle of the relative rotation and ``c`` the
    centres; ``[B, Na, Nb]``. Unlike a squared distance its gradient does not vanish where cameras coincide
    (as all do at the start of training), so it can pull cameras apart or together from the first step."""
    rot_a, rot_b = c2w_a[..., :3, :3], c2w_b[..., :3, :3]
    trace = (rot_a[:, :, None] * rot_b[:, None]).sum((-1, -2))  # tr(Ra^T Rb) = 1 + 2 cos θ
    sq = (3.0 - trace) / 2.0 + (c2w_a[:, :, None, :3, 3] - c2w_b[:, None, :, :3, 3]).square().sum(-1)
    return (sq.clamp(min=0.0) + eps * eps).sqrt()


class ContextBlend(nn.Module):
    """A base image for each target: the context views averaged with weights ``softmax(-s · d)`` over the
    distance ``d`` (:func:`camera_proximity`) between the target's and each context view's *predicted*
    cameras, ``s`` learnable. While the predicted cameras still coincide this is the per-pixel mean of the
    context views; as they spread, nearby context views weigh more (image-based rendering).

    Args:
        init_sharpness: initial ``s``.
    """

    def __init__(self, init_sharpness: float = 4.0) -> None:
        super().__init__()
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(init_sharpness)))

    def no_weight_decay(self) -> set[str]:
        return {"log_sharpness"}

    def forward(self, context: Tensor, context_c2w: Tensor, target_c2w: Tensor) -> Tensor:
        """``[B, Va, 3, H, W]`` context views, ``[B, Va, 4, 4]`` and ``[B, Vb, 4, 4]`` predicted cameras ->
        ``[B, Vb, 3, H, W]`` base images."""
        with torch.autocast(device_type=context.device.type, enabled=False):  # pixels stay float32
            dist = camera_proximity(target_c2w.float(), context_c2w.float())  # [B, Vb, Va]
            weights = torch.softmax(-self.log_sharpness.exp() * dist, dim=-1)
            return torch.einsum("btc,bcxyz->btxyz", weights, context.float())
