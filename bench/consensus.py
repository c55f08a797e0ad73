"""Throughput and peak memory of the 3D branch of the feature-consensus objective: fuse posed depth into a
point cloud, voxelise it, run the 3D U-Net, render the feature grid and its depth into every view, compare
with the 2D branch's features (consensus + depth losses), forward and backward.

    python bench/consensus.py                          # the CPU demo size, then the GPU size (one iteration on a CPU)
    python bench/consensus.py --size gpu --iters 5     # the GPU size only
    python bench/consensus.py --fusion-check data/embedded/val-000000.tar   # real scenes: fuse, render depth back

Sizes (``--size``):

* ``demo``: 2 scenes x 4 views of 64^2, a 32^3 grid, U-Net width 16 (3 levels), 32 feature channels,
  2D tokens of width 64 on an 8^2 patch grid, F3D rendered at 16^2 per view, 16 + 16 samples per ray.
* ``gpu``: 2 scenes x 8 views of 224^2, a 64^3 grid, U-Net width 32 (3 levels, capped at 256), 64 feature
  channels, ViT-B tokens (width 768 on the 16^2 patch grid of patch 14) projected down to 64 by the light
  head, F3D rendered at 32^2 per view (twice the patch grid), 32 + 32 samples per ray.

The scenes are spheres of random size and place seen by cameras on a ring (analytic depth); images and
tokens are random (the cost does not depend on them). One step, as the objective will run it:

1. light head: a 1x1 convolution from the token width to the feature channels: F2D ``[B, V, C, p, p]``;
2. J3D: :func:`~selfsup3d.geometry.points.depth_to_points`, the unit cube, and
   :func:`~selfsup3d.geometry.points.voxelize` of the pixels' colours (``--input rgb``) or of F2D lifted to
   the pixels (``--input features``, the second head; gradients flow into F2D through the voxel means);
3. H3D: :class:`~selfsup3d.layers.unet3d.UNet3D` to ``C`` features + 1 density logit
   (density ``softplus(logit - 2) * R``: opaque within a few voxels);
4. :func:`~selfsup3d.geometry.volume.render_rays` of a :func:`~selfsup3d.geometry.points.grid_field`
   along every view's rays at the render size (depth range: the union of the rays' cube intersections);
5. consensus (cosine, F2D upsampled bilinearly to the render size) + depth L1; backward.

Before timing, the script checks the library against a plain reference of the same math on a small scene:
a Python loop over the points for the voxel means, eight explicit corner taps for the trilinear sampling, and
transmittance as a cumulative product (features, depth and the grid's gradient). Throughput is ray samples
(rays x samples per ray) per second of forward + backward; the stage times are forward only, synchronised.
Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the level before the step; on the CPU the rise
of the process's peak resident set during one step, measured in a fresh subprocess as in
``bench/triplane.py`` (``VmHWM`` reset through ``/proc/self/clear_refs``, every block above 64 KiB
``mmap``'d so freed tensors leave the resident set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.geometry.cameras import intrinsics_from_fov, look_at, spherical_to_cartesian
from selfsup3d.geometry.points import (
    depth_to_points,
    fit_unit_cube,
    grid_field,
    posed_rays,
    ray_box_intersection,
    values_at_pixels,
    voxelize,
)
from selfsup3d.geometry.volume import render_rays
from selfsup3d.layers.unet3d import UNet3D
from selfsup3d.losses.consensus import consensus_loss, depth_loss


@dataclass
class Size:
    batch: int
    views: int
    image: int
    grid: int
    width: int
    levels: int
    max_width: int | None
    channels: int
    token_width: int
    patch_grid: int
    render: int
    coarse: int
    fine: int


SIZES = {
    "demo": Size(2, 4, 64, 32, 16, 3, None, 32, 64, 8, 16, 16, 16),
    "gpu": Size(2, 8, 224, 64, 32, 3, 256, 64, 768, 16, 32, 32, 32),
}


# ---------------------------------------------------------------------------- synthetic scenes
def sphere_scenes(size: Size, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Spheres seen from a ring of cameras: images, K, c2w, analytic z-depth (0 off the sphere)."""
    g = torch.Generator().manual_seed(seed)
    b, v, h = size.batch, size.views, size.image
    az = torch.arange(v) * (2 * math.pi / v) + torch.rand(b, 1, generator=g)
    el = torch.full_like(az, math.radians(25.0))
    eye = spherical_to_cartesian(az, el, torch.full_like(az, 3.0))
    c2w = look_at(eye, torch.zeros_like(eye))  # [B, V, 4, 4]
    K = intrinsics_from_fov(math.radians(40.0), h, h).expand(b, v, 3, 3).clone()
    centre = (torch.rand(b, 1, 1, 3, generator=g) - 0.5) * 0.4
    radius = 0.5 + 0.3 * torch.rand(b, 1, 1, generator=g)
    o, d = posed_rays(K, c2w, h, h)  # [B, V, H*W, 3]
    oc = o - centre
    qa, qb, qc = d.square().sum(-1), 2 * (d * oc).sum(-1), oc.square().sum(-1) - radius.square()
    disc = qb.square() - 4 * qa * qc
    t = (-qb - disc.clamp(min=0).sqrt()) / (2 * qa)
    depth = torch.where(disc > 0, t, torch.zeros_like(t)).view(b, v, 1, h, h)
    images = torch.rand(b, v, 3, h, h, generator=g)
    return {k: x.to(device) for k, x in dict(images=images, K=K, c2w=c2w, depth=depth).items()}


# ---------------------------------------------------------------------------- the pipeline
class Branch3D(nn.Module):
    """Light head, J3D (voxeliser), H3D (U-Net) and the render of F3D and depth: the bench's step."""

    def __init__(self, size: Size, input_kind: str) -> None:
        super().__init__()
        self.size, self.input_kind = size, input_kind
        self.light_head = nn.Conv2d(size.token_width, size.channels, 1)
        in_channels = (3 if input_kind == "rgb" else size.channels) + 1
        self.unet = UNet3D(in_channels, size.channels + 1, size.width, size.levels, size.max_width)

    def forward(self, scene: dict[str, Tensor], tokens: Tensor, timer: StageTimer | None = None) -> dict[str, Tensor]:
        s = self.size
        b, v = tokens.shape[:2]
        timer = timer or StageTimer(None)
        f2d = self.light_head(tokens.flatten(0, 1)).unflatten(0, (b, v))  # [B, V, C, p, p]
        timer.mark("light head")
        points, valid = depth_to_points(scene["depth"], scene["K"], scene["c2w"])
        cube = fit_unit_cube(points, valid, margin=0.05)
        source = scene["images"] if self.input_kind == "rgb" else f2d
        values = values_at_pixels(source, s.image, s.image)
        grid = voxelize(cube.to_unit(points), values, valid, s.grid)
        timer.mark("voxelise")
        out = self.unet(grid)
        features, density = out[:, :-1], F.softplus(out[:, -1:] - 2.0) * s.grid
        timer.mark("U-Net")
        K = scene["K"] * torch.tensor([s.render / s.image, s.render / s.image, 1.0], device=tokens.device)[:, None]
        c2w = cube.cameras_to_unit(scene["c2w"])
        origins, directions = posed_rays(K, c2w, s.render, s.render)  # [B, V, r*r, 3]
        origins, directions = origins.flatten(1, 2), directions.flatten(1, 2)
        t_near, t_far, hit = ray_box_intersection(origins, directions)
        near, far = float(t_near[hit].min()), float(t_far[hit].max())
        rendered = render_rays(grid_field(features, density), origins, directions, near, far, s.coarse, s.fine)
        f3d = rendered.rgb.view(b, v, s.render, s.render, -1).permute(0, 1, 4, 2, 3)
        timer.mark("render")
        target = F.interpolate(f2d.flatten(0, 1), size=(s.render, s.render), mode="bilinear", align_corners=False)
        depth_target = F.interpolate(cube.depth_to_unit(scene["depth"]).flatten(0, 1), size=(s.render, s.render))
        hit_mask = hit.view(b * v, 1, s.render, s.render)
        loss = consensus_loss(f3d.flatten(0, 1), target, hit_mask) + depth_loss(
            rendered.depth.view(b * v, 1, s.render, s.render), depth_target
        )
        return {"loss": loss, "f3d": f3d, "depth": rendered.depth, "near": torch.tensor(near)}


class StageTimer:
    """Forward time per stage (synchronised on CUDA); inactive with ``device=None``."""

    def __init__(self, device: torch.device | None) -> None:
        self.device, self.times, self._last = device, {}, time.perf_counter()

    def mark(self, name: str) -> None:
        if self.device is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._last
        self._last = now


def make_step(size: Size, device: torch.device, input_kind: str, bf16: bool):
    """A closure running one forward + backward on fixed inputs; returns the stage times of its forward."""
    torch.manual_seed(0)
    model = Branch3D(size, input_kind).to(device)
    scene = sphere_scenes(size, device)
    tokens = torch.randn(size.batch, size.views, size.token_width, size.patch_grid, size.patch_grid, device=device)
    tokens.requires_grad_()

    def step() -> dict[str, float]:
        model.zero_grad(set_to_none=True)
        tokens.grad = None
        timer = StageTimer(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = model(scene, tokens, timer)
        out["loss"].backward()
        timer.mark("backward")
        return timer.times

    return step


# ---------------------------------------------------------------------------- the reference
def reference_voxelize(points: Tensor, values: Tensor, valid: Tensor, r: int) -> Tensor:
    """Voxel means and occupancy by a Python loop over the points (one scene)."""
    sums: dict[tuple[int, int, int], Tensor] = {}
    counts: dict[tuple[int, int, int], int] = {}
    for p, val, ok in zip(points.tolist(), values, valid.tolist()):
        if not ok or any(c < -1 or c >= 1 for c in p):
            continue
        key = tuple(int(math.floor((c + 1) / 2 * r)) for c in p)  # (i, j, k) = (x, y, z)
        sums[key] = sums.get(key, 0) + val
        counts[key] = counts.get(key, 0) + 1
    grid = torch.zeros(values.shape[1] + 1, r, r, r)
    for (i, j, k), total in sums.items():
        grid[:-1, k, j, i] = total / counts[(i, j, k)]
        grid[-1, k, j, i] = 1.0
    return grid


def reference_trilinear(grid: Tensor, points: Tensor) -> Tensor:
    """Eight explicit corner taps, zero outside: ``grid [C, R, R, R]`` (z, y, x), ``points [M, 3]`` -> ``[M, C]``."""
    r = grid.shape[-1]
    f = (points + 1) * (r / 2) - 0.5  # continuous voxel coordinates, voxel centres at integers
    lo = torch.floor(f).long()
    w1 = f - lo
    out = torch.zeros(points.shape[0], grid.shape[0])
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                i, j, k = lo[:, 0] + dx, lo[:, 1] + dy, lo[:, 2] + dz
                inside = (i >= 0) & (i < r) & (j >= 0) & (j < r) & (k >= 0) & (k < r)
                wx = w1[:, 0] if dx else 1 - w1[:, 0]
                wy = w1[:, 1] if dy else 1 - w1[:, 1]
                wz = w1[:, 2] if dz else 1 - w1[:, 2]
                tap = grid[:, k.clamp(0, r - 1), j.clamp(0, r - 1), i.clamp(0, r - 1)].T
                out = out + (wx * wy * wz * inside)[:, None] * tap
    return out


def reference_render(
    features: Tensor, density: Tensor, o: Tensor, d: Tensor, near: float, far: float, n: int
) -> tuple[Tensor, Tensor]:
    """Bin-centre samples, trilinear taps, transmittance as a cumulative product: features ``[R, C]``, depth."""
    t = near + (torch.arange(n) + 0.5) * (far - near) / n
    pts = o[:, None] + t[None, :, None] * d[:, None]  # [R, S, 3]
    taps = reference_trilinear(torch.cat([features, density]), pts.reshape(-1, 3)).view(o.shape[0], n, -1)
    feat, sigma = taps[..., :-1], taps[..., -1]
    edges = torch.cat([torch.tensor([near]), 0.5 * (t[1:] + t[:-1]), torch.tensor([far])])
    alpha = 1 - torch.exp(-sigma * edges.diff() * d.norm(dim=-1, keepdim=True))
    trans = torch.cumprod(torch.cat([torch.ones(o.shape[0], 1), 1 - alpha[:, :-1]], dim=1), dim=1)
    w = alpha * trans
    return (w[..., None] * feat).sum(1), (w * t).sum(1) + (1 - w.sum(1)) * far


def check_agreement() -> dict[str, float]:
    """Library vs reference on a small scene (CPU, float32): voxel grid, rendered features and depth, and the
    gradient of the rendered features' energy with respect to the feature grid."""
    size = Size(1, 2, 16, 16, 8, 1, None, 4, 8, 4, 16, 48, 0)
    scene = sphere_scenes(size, torch.device("cpu"), seed=3)
    points, valid = depth_to_points(scene["depth"], scene["K"], scene["c2w"])
    cube = fit_unit_cube(points, valid, margin=0.05)
    unit = cube.to_unit(points)
    values = values_at_pixels(scene["images"], size.image, size.image)
    grid = voxelize(unit, values, valid, size.grid)
    ref_grid = reference_voxelize(unit[0], values[0], valid[0], size.grid)
    torch.manual_seed(0)
    features = torch.randn(1, size.channels, size.grid, size.grid, size.grid, requires_grad=True)
    density = grid[:, -1:] * 30.0
    c2w = cube.cameras_to_unit(scene["c2w"])[:, 0]
    o, d = posed_rays(scene["K"][:, 0], c2w, size.image, size.image)
    t_near, t_far, hit = ray_box_intersection(o, d)
    near, far = float(t_near[hit].min()), float(t_far[hit].max())
    out = render_rays(grid_field(features, density), o, d, near, far, size.coarse, 0, perturb=False)
    out.rgb.square().sum().backward()
    grad = features.grad.clone()
    ref_features = features.detach().clone().requires_grad_()
    ref_rgb, ref_depth = reference_render(ref_features[0], density[0], o[0], d[0], near, far, size.coarse)
    ref_rgb.square().sum().backward()
    return {
        "grid": float((grid[0] - ref_grid).abs().max()),
        "features": float((out.rgb[0] - ref_rgb).abs().max().detach()),
        "depth": float((out.depth[0] - ref_depth).abs().max().detach()),
        "grad": float((grad - ref_features.grad).abs().max()),
        "grad_scale": float(grad.abs().max()),
        "occupied": float(grid[0, -1].sum()),
    }


# ---------------------------------------------------------------------------- memory
def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def peak_memory(size: Size, device: torch.device, input_kind: str, bf16: bool) -> int:
    """Peak memory of one step above the level before it (after a warm-up step)."""
    step = make_step(size, device, input_kind, bf16)
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS") * 1024
    step()
    return _status_kib("VmHWM") * 1024 - base


def _child_memory(name: str, args: argparse.Namespace) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--size", name, "--input", args.input, "--memory-child"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


# ---------------------------------------------------------------------------- real scenes
def fusion_check(urls: str, resolution: int, scenes: int, image_size: int = 64, views: int = 8) -> dict[str, float]:
    """Fuse the views of real scenes, voxelise, render view 0's depth back through the occupancy; print the
    depth error on view 0's valid pixels (those whose true surface lies inside the cube), in voxels.

    Returns:
        ``mean``, ``median`` absolute error and mean ``signed`` error over all those pixels (voxels), and the
        mean ``relative`` error (share of the depth)."""
    from selfsup3d.datamodules import MultiViewShards

    dm = MultiViewShards(
        train_urls=urls, val_urls=urls, batch_size=scenes, num_workers=0, image_size=image_size, num_views=views,
        with_depth=True, with_masks=True,
    )  # fmt: skip
    dm.setup("validate")
    batch = dm.prepare_batch(next(iter(dm.val_dataloader())), train=False)
    depth, K, c2w = batch["depth"], batch["K"], batch["c2w"]
    h, w = depth.shape[-2:]
    points, valid = depth_to_points(depth, K, c2w)
    # the cube fits the object (the mask): a ground plane to the horizon would shrink it; plane points
    # outside the cube are dropped by the voxeliser
    cube = fit_unit_cube(points, valid & (batch["mask"].flatten(1) > 0), margin=0.05)
    occupancy = voxelize(cube.to_unit(points), None, valid, resolution)
    o, d = posed_rays(K[:, 0], cube.cameras_to_unit(c2w)[:, 0], h, w)
    t_near, t_far, hit = ray_box_intersection(o, d)
    near, far = float(t_near[hit].min()), float(t_far[hit].max())
    field = grid_field(occupancy, (occupancy - 0.5).clamp(min=0) * 25.0 * resolution)
    out = render_rays(field, o, d, near, far, num_coarse=128, num_fine=64, perturb=False)
    truth = cube.depth_to_unit(depth)[:, 0, 0].flatten(1)
    ok = (truth > 0) & ((o + truth[..., None] * d).abs().amax(-1) < 1)
    voxel = 2.0 / resolution
    n = depth.shape[0]
    print(f"fusion check: {urls}, {n} scenes x {views} views of {h}x{w}, grid {resolution}^3, view 0 rendered back")
    print(f"{'scene':12s} {'pixels':>7s} {'mean |err|':>11s} {'median':>8s} {'mean err':>9s} {'rel':>7s} (voxels)")
    errs, rels = [], []
    for b in range(depth.shape[0]):
        e = (out.depth[b] - truth[b])[ok[b]]
        rel = (e.abs() / truth[b][ok[b]]).mean()
        errs.append(e)
        rels.append(rel)
        print(
            f"{batch['key'][b]:12s} {int(ok[b].sum()):7d} {e.abs().mean() / voxel:11.2f} "
            f"{e.abs().median() / voxel:8.2f} {e.mean() / voxel:9.2f} {rel:7.3f}"
        )
    allerr = torch.cat(errs)
    result = {
        "mean": float(allerr.abs().mean() / voxel),
        "median": float(allerr.abs().median() / voxel),
        "signed": float(allerr.mean() / voxel),
        "relative": float(torch.stack(rels).mean()),
    }
    print(
        "all: mean |err| {mean:.2f} voxels, median {median:.2f} voxels, mean signed {signed:.2f} voxels, "
        "mean relative error {relative:.3f}".format(**result)
    )
    return result


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--size", choices=["demo", "gpu", "both"], default="both", help="(default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (GPU size on a CPU: 1)")
    p.add_argument("--input", choices=["rgb", "features"], default="rgb", help="J3D input (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-bf16", action="store_true", help="CUDA: keep everything in float32")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--fusion-check", metavar="URLS", help="real shards: fuse, voxelise, render depth back")
    p.add_argument("--fusion-grid", type=int, default=32, help="grid of the fusion check (default 32)")
    p.add_argument("--fusion-scenes", type=int, default=8, help="scenes in the fusion check (default 8)")
    p.add_argument("--fusion-image", type=int, default=64, help="image size of the fusion check (default 64)")
    p.add_argument("--fusion-views", type=int, default=8, help="views fused in the fusion check (default 8)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_size(name: str, args: argparse.Namespace, device: torch.device) -> None:
    size = SIZES[name]
    bf16 = device.type == "cuda" and not args.no_bf16
    iters = args.iters if device.type == "cuda" or name == "demo" else 1
    rays = size.batch * size.views * size.render**2
    samples = rays * (size.coarse + size.fine)
    print(
        f"[{name}] {size.batch} scenes x {size.views} views of {size.image}^2 (J3D: {args.input}), grid {size.grid}^3, "
        f"U-Net width {size.width} x {size.levels} levels, {size.channels} channels (tokens {size.token_width} on "
        f"{size.patch_grid}^2), F3D {size.render}^2 per view, {size.coarse} + {size.fine} samples: "
        f"{rays:,} rays, {samples:,} samples per step; {iters} timed iteration(s) after a warm-up"
        f"{', bf16 autocast' if bf16 else ''}"
    )
    memory = None
    if not args.no_memory:
        memory = _child_memory(name, args) if device.type == "cpu" else peak_memory(size, device, args.input, bf16)
    step = make_step(size, device, args.input, bf16)
    step()  # warm-up
    times, stages = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        stages.append(step())
        times.append(time.perf_counter() - t0)
    best = min(times)
    stage = stages[times.index(best)]
    label = "peak CUDA memory" if device.type == "cuda" else "peak RSS rise"
    mem = f", {label} {memory / 2**20:.0f} MiB" if memory is not None else ""
    print(
        f"[{name}] {best:.3f} s/step (min of {iters}), {samples / best / 1e6:.3f} Msamples/s, "
        f"{rays / best:,.0f} rays/s{mem}"
    )
    print(f"[{name}] stages: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in stage.items()))


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fusion_check:
        fusion_check(args.fusion_check, args.fusion_grid, args.fusion_scenes, args.fusion_image, args.fusion_views)
        return 0
    device = _device(args)
    if args.memory_child:
        bf16 = device.type == "cuda" and not args.no_bf16
        print(json.dumps({"peak_bytes": peak_memory(SIZES[args.size], device, args.input, bf16)}))
        return 0
    print(f"consensus 3D-branch benchmark on {device} ({torch.get_num_threads()} threads, torch {torch.__version__})")
    agree = check_agreement()
    print(
        "agreement with the reference ({occupied:.0f} occupied voxels): grid {grid:.1e}, features {features:.1e}, "
        "depth {depth:.1e}, grid gradient {grad:.1e} (max |grad| {grad_scale:.1e})".format(**agree)
    )
    if max(agree["grid"], agree["features"], agree["depth"]) > 1e-4 or agree["grad"] > 1e-4 * agree["grad_scale"]:
        print("the library and the reference disagree: not timing")
        return 1
    for name in ["demo", "gpu"] if args.size == "both" else [args.size]:
        run_size(name, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
