"""The Gaussian splatter: agreement first, then speed.

    python bench/splat.py                  # the CPU splatter at the demo's and a paper-like size
    python bench/splat.py --size 256 --views 5 --targets 5 --scenes 8   # E-RayZer's sizes (on a GPU)

For pixel-aligned Gaussians as the masked-view objective makes them (every pixel of the context views one
Gaussian, on a plausible depth), it renders the targets with :func:`selfsup3d.geometry.splat.rasterize` and
checks it against the brute-force definition :func:`~selfsup3d.geometry.splat.rasterize_reference` on a small
scene (values and gradients); where CUDA and gsplat are present it also checks gsplat's ``rasterization`` on the
same Gaussians (colour, opacity and depth) before timing both. It prints forward and backward milliseconds,
contributions per Gaussian and, on CUDA, peak memory.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import torch

from selfsup3d.geometry.cameras import intrinsics_from_fov, look_at
from selfsup3d.geometry.splat import covariance, project, rasterize, rasterize_reference, reach_radii
from selfsup3d.heads.gaussians import PixelGaussians, gsplat_available, pixel_aligned, render_gaussians


def pixel_gaussians(
    scenes: int, views: int, targets: int, size: int, device: torch.device, seed: int = 0
) -> tuple[PixelGaussians, torch.Tensor, torch.Tensor]:
    """Gaussians of ``views`` context views on an orbit around a bumpy object, and ``targets`` cameras between
    them: ``(gaussians, K [S, T, 3, 3], c2w [S, T, 4, 4])``."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.linspace(-0.6, 0.6, views + targets)
    eye = torch.stack([torch.sin(angles), -torch.cos(angles), 0.3 * torch.ones_like(angles)], -1) * 1.5
    c2w = look_at(eye, torch.zeros_like(eye))
    K = intrinsics_from_fov(math.radians(45), size, size).expand(views + targets, 3, 3)
    context = torch.arange(0, views + targets, (views + targets) / views).long()[:views]
    target = torch.tensor([i for i in range(views + targets) if i not in context.tolist()])
    depth = 1.5 + 0.2 * torch.rand(scenes, views, size, size, generator=g)
    opacity = torch.rand(scenes, views, size, size, generator=g).mul(0.9).add(0.05)
    colour = torch.rand(scenes, views, 3, size, size, generator=g)
    background = torch.rand(scenes, 3, generator=g)
    ctx = (K[context][None].expand(scenes, -1, 3, 3), c2w[context][None].expand(scenes, -1, 4, 4))
    gaussians = pixel_aligned(colour.to(device), depth.to(device), opacity.to(device), 0.3,
                              ctx[0].to(device), ctx[1].to(device), background.to(device))  # fmt: skip
    return (
        gaussians,
        K[target][None].expand(scenes, -1, 3, 3).to(device),
        c2w[target][None].expand(scenes, -1, 4, 4).to(device),
    )


def check_reference() -> float:
    """Largest difference of values and gradients between the splatter and its definition on a small scene."""
    gaussians, K, c2w = pixel_gaussians(1, 2, 1, 8, torch.device("cpu"))
    means = gaussians.means.double().requires_grad_()
    opacities = gaussians.opacities.double().requires_grad_()
    colours = gaussians.colours.double().requires_grad_()
    projected = project(means, covariance(gaussians.scales.double()), K[:, 0].double(), c2w[:, 0].double(), 8, 8)
    worst = 0.0
    results = []
    for fn in (lambda *a: rasterize(*a, max_radius=None), rasterize_reference):
        image, alpha = fn(projected, opacities, colours, 8, 8)
        grads = torch.autograd.grad(image.sum() + alpha.sum(), (means, opacities, colours), retain_graph=True)
        results.append((image, alpha, grads))
    (i1, a1, g1), (i2, a2, g2) = results
    worst = max(float((i1 - i2).detach().abs().max()), float((a1 - a2).detach().abs().max()))
    for x, y in zip(g1, g2):
        worst = max(worst, float((x - y).abs().max()))
    return worst


def check_gsplat(gaussians: PixelGaussians, K: torch.Tensor, c2w: torch.Tensor, size: int, eps2d: float) -> str:
    """gsplat against the CPU path's math on the same Gaussians (colour, alpha, depth)."""
    ours = render_gaussians(gaussians, K, c2w, size, size, backend="torch", eps2d=eps2d)
    theirs = render_gaussians(gaussians, K, c2w, size, size, backend="gsplat", eps2d=eps2d)
    parts = []
    for key in ("image", "alpha", "depth"):
        diff = (ours[key] - theirs[key]).abs()
        parts.append(f"{key} max {float(diff.max()):.2e} mean {float(diff.mean()):.2e}")
    return "gsplat vs torch: " + ", ".join(parts)


def time_backend(
    gaussians: PixelGaussians, K: torch.Tensor, c2w: torch.Tensor, size: int, backend: str, eps2d: float, repeats: int
) -> tuple[float, float]:
    """Median forward and backward milliseconds of rendering the targets and a loss on them."""
    leaves = [gaussians.means, gaussians.opacities, gaussians.colours]
    for t in leaves:
        t.requires_grad_(True)
    forward, backward = [], []
    sync = torch.cuda.synchronize if gaussians.means.is_cuda else (lambda: None)
    for i in range(repeats + 1):
        sync()
        start = time.perf_counter()
        out = render_gaussians(gaussians, K, c2w, size, size, backend=backend, eps2d=eps2d)
        loss = out["image"].square().mean() + out["alpha"].mean()
        sync()
        mid = time.perf_counter()
        torch.autograd.grad(loss, leaves)
        sync()
        end = time.perf_counter()
        if i:  # the first run warms up
            forward.append(1e3 * (mid - start))
            backward.append(1e3 * (end - mid))
    return sorted(forward)[len(forward) // 2], sorted(backward)[len(backward) // 2]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs="*", default=[16, 32], help="image sizes (default 16 32)")
    parser.add_argument("--views", type=int, default=6, help="context views (default 6)")
    parser.add_argument("--targets", type=int, default=2, help="target views (default 2)")
    parser.add_argument("--scenes", type=int, default=8, help="scenes in a batch (default 8)")
    parser.add_argument("--eps2d", type=float, default=0.05, help="the 2D low-pass of the projection (default 0.05)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (default 5)")
    args = parser.parse_args(argv)
    print(f"splatter vs its brute-force definition (values and gradients): max difference {check_reference():.1e}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = ["torch"] + (["gsplat"] if gsplat_available() else [])
    if device.type == "cpu":
        print(f"on the CPU ({torch.get_num_threads()} threads); gsplat needs CUDA")
    for size in args.size:
        gaussians, K, c2w = pixel_gaussians(args.scenes, args.views, args.targets, size, device)
        with torch.no_grad():
            b, t = K.shape[:2]
            expand = [x[:, None].expand(b, t, *x.shape[1:]).flatten(0, 1) for x in (gaussians.means, gaussians.scales)]
            projected = project(
                expand[0], covariance(expand[1]), K.flatten(0, 1), c2w.flatten(0, 1), size, size, args.eps2d
            )
            radii = reach_radii(projected, gaussians.opacities[:, None].expand(b, t, -1).flatten(0, 1), 8)
            window = ((2 * radii + 1) ** 2 * (radii >= 0)).float().mean()
        head = f"{args.scenes} scenes x {args.views} context views -> {args.targets} targets at {size}x{size}"
        print(f"{head}: {gaussians.means.shape[1]} Gaussians per scene, {float(window):.1f} pixels evaluated each")
        if "gsplat" in backends:
            print("  " + check_gsplat(gaussians, K, c2w, size, args.eps2d))
        for backend in backends:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            fwd, bwd = time_backend(gaussians, K, c2w, size, backend, args.eps2d, args.repeats)
            memory = f", peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if device.type == "cuda" else ""
            print(f"  {backend:6s} forward {fwd:8.1f} ms  backward {bwd:8.1f} ms{memory}")


if __name__ == "__main__":
    main()
