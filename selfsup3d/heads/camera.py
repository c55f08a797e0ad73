"""The camera estimator of masked-view prediction (RayZer): poses relative to a canonical view and one shared
focal length, predicted from the encoder tokens of all views, with no camera labels; and a depth head on its
patch tokens for the reprojection loss (:mod:`selfsup3d.losses.reprojection`).

:meth:`CameraEstimator.predict` is the one seam from encoder tokens to cameras a renderer or a 3D branch uses
(:class:`PredictedCameras`: poses, pixel intrinsics ``K`` from the predicted focal length, the camera tokens): the
masked-view objective renders with them, the feature-consensus objective builds its scene from them
(``cameras: predicted``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from selfsup3d.geometry.cameras import intrinsics_from_focal, make_se3, rotation_6d_to_matrix
from selfsup3d.geometry.rays import unpatchify
from selfsup3d.layers.positions import sincos_positions
from selfsup3d.layers.transformer import Transformer, init_linear

IDENTITY_6D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass
class PredictedCameras:
    """The cameras of ``V`` views of ``B`` scenes, as :meth:`CameraEstimator.predict` gives them.

    Attributes:
        c2w: ``[B, V, 4, 4]`` float32 poses relative to view 0 (the identity), in the model's own scale.
        K: ``[B, V, 3, 3]`` float32 pixel intrinsics: the shared focal length, the principal point at the centre.
        focal: ``[B]`` the normalised focal length (focal in pixels over the image width).
        tokens: ``[B, V, dim]`` the camera tokens the pose and focal heads read (RayZer's pose probe reads them).
        patches: ``[B, V, N, dim]`` the estimator's patch tokens (a depth head reads them).
    """

    c2w: Tensor
    K: Tensor
    focal: Tensor
    tokens: Tensor
    patches: Tensor


def focal_intrinsics(focal: Tensor, height: int, width: int, views: int) -> Tensor:
    """``[B, V, 3, 3]`` pixel intrinsics of ``views`` views of ``height x width`` sharing the normalised focal
    length ``focal [B]`` (focal over width), computed in float32 outside autocast."""
    with torch.autocast(device_type=focal.device.type, enabled=False):
        f = focal.float() * width
        return intrinsics_from_focal(f, f, height, width)[:, None].expand(focal.shape[0], views, 3, 3)


class DepthHead(nn.Module):
    """Per-pixel z-depth of every view from the camera estimator's patch tokens: a linear layer to ``p²`` values
    per patch, ``depth = d0 · exp(r · tanh(x))``; the layer starts near zero, so every view starts as a plane at
    ``d0`` in front of its camera (the model's unit of length, as the canonical camera sits at the origin).

    Args:
        dim: token width.
        patch_size: pixels per patch side.
        init_depth: ``d0``.
        log_range: ``r``: depth stays within ``exp(±r)`` of ``d0``.
    """

    def __init__(self, dim: int, patch_size: int, init_depth: float = 1.0, log_range: float = 2.0) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.init_depth, self.log_range = init_depth, log_range
        self.proj = nn.Linear(dim, patch_size * patch_size)
        nn.init.normal_(self.proj.weight, std=1e-3)
        nn.init.zeros_(self.proj.bias)

    def forward(self, patches: Tensor, height: int, width: int) -> Tensor:
        """``[B, V, N, dim]`` patch tokens -> ``[B, V, 1, H, W]`` depth (float32)."""
        x = self.log_range * torch.tanh(self.proj(patches).float())  # [B, V, N, p²]
        return unpatchify(self.init_depth * torch.exp(x), self.patch_size, height, width)


class CameraEstimator(nn.Module):
    """Poses relative to view 0 and one shared focal length, from all views' tokens.

    Each view's patch tokens (projected to ``dim``) get 2D sin-cos positions and a role embedding (canonical
    view or other); one camera token per view is prepended; a transformer alternates attention within each
    view (so a camera token gathers its own view) and across all views (so it relates views to each other).
    The pose of view ``v`` comes from an MLP on ``[camera token of view 0 ‖ camera token of v]`` as a 6D
    rotation and a translation added to the identity; the focal length from the canonical camera token as
    ``f0 · r^tanh(x)`` with ``f0`` the focal of ``init_fov_deg`` and ``r`` = ``focal_range``. Both output
    layers start near zero. ``register_tokens`` learnable tokens per view (E-RayZer: 4) sit beside the camera
    token as scratch space for attention (Darcet et al. 2024); nothing reads them.

    Args:
        in_dim: encoder width.
        dim: transformer width.
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP width ratio.
        init_fov_deg: horizontal field of view the focal head starts at.
        focal_range: the focal length stays within this factor of the initial one.
        register_tokens: learnable register tokens per view.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        init_fov_deg: float,
        focal_range: float = 2.0,
        register_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.proj = nn.Linear(in_dim, dim)
        self.camera_token = nn.Parameter(torch.zeros(1, dim))
        self.registers = nn.Parameter(torch.zeros(register_tokens, dim)) if register_tokens else None
        self.role_embed = nn.Parameter(torch.zeros(2, dim))  # 0: canonical view, 1: any other view
        self.transformer = Transformer(dim, depth, num_heads, mlp_ratio)
        self.pose_head = Mlp(2 * dim, dim, 9)
        self.focal_head = nn.Linear(dim, 1)
        # normalised focal (focal in pixels over the image width) of the initial field of view
        self.log_focal0 = math.log(0.5 / math.tan(math.radians(init_fov_deg) / 2.0))
        self.log_focal_range = math.log(focal_range)
        trunc_normal_(self.camera_token, std=0.02)
        if self.registers is not None:
            trunc_normal_(self.registers, std=0.02)
        trunc_normal_(self.role_embed, std=0.02)
        init_linear(self.proj)
        self.pose_head.apply(init_linear)
        for out_layer in (self.pose_head.fc2, self.focal_head):
            nn.init.normal_(out_layer.weight, std=1e-3)
            nn.init.zeros_(out_layer.bias)
        self.register_buffer("identity_6d", torch.tensor(IDENTITY_6D), persistent=False)

    def no_weight_decay(self) -> set[str]:
        return {"camera_token", "registers", "role_embed"}

    def forward(self, feats: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Cameras of ``[B, V, N, in_dim]`` encoder tokens on a ``grid`` patch grid.

        Returns:
            ``c2w [B, V, 4, 4]`` (float32; view 0 is the identity) and the normalised focal ``[B]``
            (focal in pixels divided by the image width).
        """
        return self.cameras(self.tokens(feats, grid))

    def tokens(self, feats: Tensor, grid: tuple[int, int]) -> Tensor:
        """The camera tokens ``[B, V, dim]`` (after the transformer) of ``[B, V, N, in_dim]`` encoder tokens: what
        the pose and focal heads read, and what RayZer's pose probe reads
        (:mod:`selfsup3d.eval.camera_token_probe`)."""
        return self.encode(feats, grid)[0]

    def encode(self, feats: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The transformer's outputs: camera tokens ``[B, V, dim]`` and patch tokens ``[B, V, N, dim]`` (which
        have attended across views; a depth head can read them)."""
        b, v, n, _ = feats.shape
        x = self.proj(feats) + sincos_positions(grid, self.dim, feats.device, feats.dtype)
        roles = torch.ones(v, dtype=torch.long, device=feats.device)
        roles[0] = 0
        role = self.role_embed[roles]  # [V, D]
        extra = self.camera_token if self.registers is None else torch.cat([self.camera_token, self.registers])
        cam = (extra[None] + role[:, None]).to(x.dtype)[None].expand(b, -1, -1, -1)  # [B, V, 1 + R, D]
        x = torch.cat([cam, x + role[None, :, None, :]], dim=2)
        k = extra.shape[0]
        x = self.transformer(x.reshape(b, v * (n + k), self.dim), frames=v).reshape(b, v, n + k, self.dim)
        return x[:, :, 0], x[:, :, k:]

    def predict(self, feats: Tensor, grid: tuple[int, int], image_hw: tuple[int, int]) -> PredictedCameras:
        """The cameras of ``[B, V, N, in_dim]`` encoder tokens on a ``grid`` patch grid of ``image_hw`` images."""
        tokens, patches = self.encode(feats, grid)
        c2w, focal = self.cameras(tokens)
        return PredictedCameras(c2w, focal_intrinsics(focal, *image_hw, feats.shape[1]), focal, tokens, patches)

    def cameras(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """``c2w [B, V, 4, 4]`` and the normalised focal ``[B]`` from the camera tokens ``[B, V, dim]``."""
        b, v, _ = tokens.shape
        canonical = tokens[:, :1].expand(-1, v, -1)
        raw = self.pose_head(torch.cat([canonical, tokens], dim=-1)).float()  # [B, V, 9]
        # bounded: a collapsing or exploding field of view is a free latent the renderer exploits early on
        log_focal = self.log_focal_range * torch.tanh(self.focal_head(tokens[:, 0]).float().squeeze(-1))  # [B]
        rot = rotation_6d_to_matrix(self.identity_6d + raw[..., :6])
        c2w = make_se3(rot, raw[..., 6:])
        eye = torch.eye(4, dtype=c2w.dtype, device=c2w.device)
        c2w = torch.cat([eye.expand(b, 1, 4, 4), c2w[:, 1:]], dim=1)  # the canonical view is the reference
        return c2w, torch.exp(self.log_focal0 + log_focal)
