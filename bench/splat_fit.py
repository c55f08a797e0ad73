"""Free-variable fits through the explicit renderer: which part of masked-view prediction is identifiable.

The masked-view objective with ``renderer: gaussians`` learns cameras only if the photometric loss of the
splatted context views has its minimum at the true cameras and depth. These fits take the network out and
optimise free variables of held-out scenes with Adam on the same loss (MSE of the targets rendered from the
context views' pixel-aligned Gaussians), starting from where the network starts:

* ``depth``: the true cameras, free per-pixel depth (or a coarse ``--grid`` of it) from a constant; prints the
  render's PSNR beside the render with the true depth, and the depth's AbsRel (median-scaled) beside a constant.
* ``pose``: the true context cameras and depth, free target poses from the canonical pose; prints the targets'
  median rotation error beside cameras that never turn, and the PSNR beside the true poses' render.
* ``pose --checkpoint CKPT``: the same through the Gaussians a trained model predicts with the data's cameras
  (an oracle run, ``cameras: data``): is the true pose the optimum for the depth a network learns?

    python bench/splat_fit.py depth --data data/room48 --size 16
    python bench/splat_fit.py pose --data data/room48 --size 32
    python bench/splat_fit.py pose --checkpoint runs/oracle/lightning_logs/version_0/checkpoints/last.ckpt

``data/room48``: ``selfsup3d data render --out data/room48 --views 48 --size 32 --trajectory orbit --arc 180
--room-probability 1`` (objects in a textured room: every pixel has a depth).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from selfsup3d.datamodules import MultiViewShards
from selfsup3d.geometry.cameras import relative_to_first, rotation_angle
from selfsup3d.geometry.splat import project, rasterize
from selfsup3d.heads.gaussians import per_target, pixel_aligned, render_gaussians
from selfsup3d.metrics.depth import scaled_depth_errors
from selfsup3d.metrics.nvs import psnr
from selfsup3d.objectives.base import load_objective
from selfsup3d.objectives.masked_view import MaskedViewPrediction


def held_out_batch(data: str, size: int, views: int, context: int, window: int, scenes: int) -> dict:
    """One batch of held-out scenes, views from a centred window, the middle context view first."""
    dm = MultiViewShards(
        train_urls=f"{data}/train-*.tar", val_urls=f"{data}/val-*.tar", image_size=size, num_views=views,
        num_context_views=context, batch_size=scenes, num_workers=0, view_window=[window, window],
        canonical_view="middle", with_depth=True,
    )  # fmt: skip
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    images = batch["images"]
    batch["images"] = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    return batch


def relative_cameras(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The data's cameras as the model sees them (relative to the canonical view 0, the farthest camera at
    distance 1: :func:`relative_to_first`), and the context views' true depth in those units."""
    c2w, scale = relative_to_first(batch["c2w"].float())
    nc = int(batch["num_context"])
    return batch["K"].float(), c2w, batch["depth"][:, :nc, 0].float() / scale[:, None, None, None]


def fit(params: Sequence[torch.Tensor], loss_fn: Callable[[], torch.Tensor], steps: int, lr: float) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()


def surfel_covariances(means: torch.Tensor, pixel: torch.Tensor, size_px: float, stretch: float = 3.0) -> torch.Tensor:
    """``[B, V, H, W, 3, 3]`` covariances of pixel-aligned Gaussians flattened onto the surface the depth map
    describes: ``size_px² (∂P/∂u ∂P/∂uᵀ + ∂P/∂v ∂P/∂vᵀ)`` plus a thin normal part, from the world points
    ``means [B, V, H, W, 3]`` (finite differences), so each covers its pixel's footprint on a slanted surface;
    a step no longer than ``stretch`` times the fronto-parallel footprint ``pixel [B, V, H, W]`` (depth over focal
    length), so depth edges do not smear."""
    limit = (stretch * pixel)[..., None]

    def step(d: torch.Tensor) -> torch.Tensor:
        return d * (limit / d.norm(dim=-1, keepdim=True).clamp(min=1e-9)).clamp(max=1.0)

    du = step(torch.gradient(means, dim=3)[0])
    dv = step(torch.gradient(means, dim=2)[0])
    normal = torch.nn.functional.normalize(torch.linalg.cross(du, dv), dim=-1)
    thickness = 0.05 * torch.minimum(du.norm(dim=-1), dv.norm(dim=-1))[..., None, None]
    outer = lambda x: x[..., :, None] * x[..., None, :]  # noqa: E731
    return size_px**2 * (outer(du) + outer(dv)) + thickness**2 * outer(normal)


def splat(images: torch.Tensor, depth: torch.Tensor, K: torch.Tensor, c2w: torch.Tensor, nc: int, a) -> torch.Tensor:
    """The targets rendered from the context views' Gaussians at ``depth [B, Vc, H, W]``: isotropic Gaussians of
    ``--size-px`` pixels (the objective's), or ``--footprint surfel`` (:func:`surfel_covariances`)."""
    colour = images[:, :nc]
    opacity = torch.full_like(depth, a.opacity)
    background = colour.mean(dim=(1, 3, 4))
    g = pixel_aligned(colour, depth, opacity, a.size_px, K[:, :nc], c2w[:, :nc], background)
    h, w = images.shape[-2:]
    if a.footprint == "isotropic":
        return render_gaussians(g, K[:, nc:], c2w[:, nc:], h, w, with_depth=False, eps2d=a.eps2d)["image"]
    b, t = K.shape[0], K.shape[1] - nc
    pixel = depth / K[:, :nc, 0, 0, None, None]
    covs = surfel_covariances(g.means.reshape(b, nc, h, w, 3), pixel, a.size_px).reshape(b, -1, 3, 3)
    projected = project(
        per_target(g.means, t), per_target(covs, t), K[:, nc:].reshape(-1, 3, 3), c2w[:, nc:].reshape(-1, 4, 4), h, w,
        eps2d=a.eps2d,
    )  # fmt: skip
    image, _ = rasterize(
        projected, per_target(g.opacities, t), per_target(g.colours, t), h, w, background.repeat_interleave(t, 0)
    )
    return image.unflatten(0, (b, t))


def fit_depth(batch: dict, a) -> None:
    images, nc = batch["images"], int(batch["num_context"])
    K, c2w, true = relative_cameras(batch)
    target = images[:, nc:]
    h, w = images.shape[-2:]
    median = true.flatten(1).median(dim=1).values.clamp(min=1e-3)[:, None, None, None]
    log_depth = torch.zeros(*true.shape[:2], *((a.grid, a.grid) if a.grid else (h, w)), requires_grad=True)

    def depth() -> torch.Tensor:  # a constant at the start (the scene's median depth, as if its scale were known)
        d = log_depth.exp()
        return median * (F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False) if a.grid else d)

    with torch.no_grad():
        truth = psnr(splat(images, true.clamp(min=1e-3), K, c2w, nc, a), target).mean()
        start_psnr = psnr(splat(images, depth(), K, c2w, nc, a), target).mean()
    fit([log_depth], lambda: F.mse_loss(splat(images, depth(), K, c2w, nc, a), target), a.steps, a.lr)
    with torch.no_grad():
        end = psnr(splat(images, depth(), K, c2w, nc, a), target).mean()
        errors = scaled_depth_errors(depth()[:, :, None], true[:, :, None])
        constant = scaled_depth_errors(torch.ones_like(true)[:, :, None], true[:, :, None])
    what = f"a {a.grid}x{a.grid} grid per view" if a.grid else "per pixel"
    print(f"free depth ({what}), true cameras, {a.size} px, {len(target)} held-out scenes, {a.steps} steps:")
    print(f"  render PSNR {start_psnr:.2f} -> {end:.2f} dB (the true depth renders {truth:.2f} dB)")
    print(
        f"  depth AbsRel {errors['abs_rel']:.3f}, delta<1.25 {errors['delta1']:.3f} "
        f"(a constant depth: {constant['abs_rel']:.3f}, {constant['delta1']:.3f})"
    )


def fit_pose(batch: dict, a) -> None:
    images, nc = batch["images"], int(batch["num_context"])
    K, c2w, true = relative_cameras(batch)
    b, v = images.shape[:2]
    target = images[:, nc:]
    if a.checkpoint:
        model = load_objective(a.checkpoint).eval().requires_grad_(False)
        if not isinstance(model, MaskedViewPrediction) or model.gaussians is None:
            raise SystemExit(f"{a.checkpoint} is not a masked-view checkpoint with renderer: gaussians")
        feats = model.encoder(images.flatten(0, 1)).patches.unflatten(0, images.shape[:2])

        def render(cams: torch.Tensor) -> torch.Tensor:
            return model.render_from(images, feats, K, cams, nc)["render"]

        source = f"the Gaussians of {a.checkpoint}"
    else:
        true = true.clamp(min=1e-3)

        def render(cams: torch.Tensor) -> torch.Tensor:
            return splat(images, true, K, cams, nc, a)

        source = "the true depth"
    axis_angle = torch.zeros(b, v - nc, 3, requires_grad=True)
    translation = torch.zeros(b, v - nc, 3, requires_grad=True)

    def cameras() -> torch.Tensor:
        rot = axis_angle_to_rotation_matrix(axis_angle.reshape(-1, 3)).reshape(b, v - nc, 3, 3)
        pose = torch.cat([torch.cat([rot, translation[..., None]], -1), c2w[:, nc:, 3:]], -2)
        return torch.cat([c2w[:, :nc], pose], 1)

    def rotation_error(cams: torch.Tensor) -> float:
        rel = c2w[:, nc:, :3, :3].transpose(-1, -2) @ cams[:, nc:, :3, :3]
        return math.degrees(rotation_angle(rel).median().item())

    with torch.no_grad():
        truth = psnr(render(c2w), target).mean()
        still = rotation_error(torch.cat([c2w[:, :nc], torch.eye(4).expand(b, v - nc, 4, 4)], 1))
    fit([axis_angle, translation], lambda: F.mse_loss(render(cameras()), target), a.steps, a.lr)
    with torch.no_grad():
        cams = cameras()
        end = psnr(render(cams), target).mean()
        err = rotation_error(cams)
    print(f"free target poses through {source}, true context cameras, {a.size} px, {len(target)} scenes:")
    print(f"  targets' median rotation error {err:.2f} deg (cameras that never turn: {still:.2f} deg)")
    print(f"  render PSNR {end:.2f} dB at the fitted poses, {truth:.2f} dB at the true poses")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["depth", "pose"])
    parser.add_argument("--data", default="data/room48", help="multi-view shards in capture order, with depth")
    parser.add_argument("--size", type=int, default=16, help="image size (a checkpoint's own, with --checkpoint)")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--context", type=int, default=6)
    parser.add_argument("--window", type=int, default=16, help="consecutive views the views come from")
    parser.add_argument("--scenes", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--grid", type=int, default=0, help="depth: a coarse grid per view (0: per pixel)")
    parser.add_argument("--checkpoint", default=None, help="pose: a masked-view checkpoint's Gaussians")
    parser.add_argument("--size-px", type=float, default=0.3, help="Gaussian size (pixels, standard deviation)")
    parser.add_argument("--eps2d", type=float, default=0.05)
    parser.add_argument(
        "--footprint", choices=["isotropic", "surfel"], default="isotropic",
        help="isotropic: the objective's Gaussians; surfel: flattened onto the depth map's surface (anisotropic)",
    )  # fmt: skip
    parser.add_argument("--opacity", type=float, default=0.999)
    parser.add_argument("--threads", type=int, default=1)
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    batch = held_out_batch(a.data, a.size, a.views, a.context, a.window, a.scenes)
    (fit_depth if a.what == "depth" else fit_pose)(batch, a)


if __name__ == "__main__":
    main()
