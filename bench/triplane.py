"""Throughput and peak memory of the 3D-Prior renderer: triplane sampling, radiance MLP, compositing,
importance sampling, forward and backward, at the paper's sizes, beside a plain reference implementation
of the same math.

    python bench/triplane.py                      # CPU (or CUDA when available), paper sizes
    python bench/triplane.py --batch 1 --rays 2048 --iters 3 --device cpu

Sizes (defaults, the paper's): triplanes ``3 x 32 x 128 x 128`` per image, a 2-layer MLP of width 64,
16 stratified + 16 importance samples per ray; ``--batch`` images x ``--rays`` rays per image.

* ``reference``: the textbook implementation: one ``F.grid_sample`` per plane, all rays at once in
  float32, transmittance as a cumulative product of ``1 - alpha``, every activation kept for the backward.
* ``selfsup3d``: :class:`~selfsup3d.heads.triplane.FixedCameraRenderer` with
  :class:`~selfsup3d.heads.triplane.TriplaneField` as the objective runs them: on the CPU the
  sparse-matrix sampler (:func:`~selfsup3d.geometry.triplane.sample_texels_sparse`: texels converted to
  channels-last once per render, the three planes' twelve bilinear taps and their sum one sparse-dense
  product, a blocked transposed product for the backward, only indices and weights kept); on CUDA
  ``grid_sample`` with the MLP in bf16; the MLP's hidden activations recomputed in the backward pass in
  blocks of 16k points (only the sampled features are kept); compositing in float32. ``--chunk`` renders
  rays in chunks, ``--recompute-chunks`` also recomputes whole chunks (not needed at these sizes).

Both render the same rays with the same weights; the script first checks that they agree (colour,
depth and the planes' gradient, deterministic samples), then times them. Throughput is rays x samples
per second of forward + backward. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the
baseline; on the CPU each variant runs in a fresh subprocess and the figure is the rise of the process's
peak resident set (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``) during one iteration over its
level before it, with glibc told to ``mmap`` every block above 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that
freed tensors leave the resident set at once: it counts the live tensors at the peak, small-block slack
included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.geometry.triplane import PLANE_AXES
from selfsup3d.heads.triplane import FixedCameraRenderer, TriplaneField


# ---------------------------------------------------------------------------- the reference
def reference_render(
    planes: Tensor,
    mlp: nn.Sequential,
    directions: Tensor,
    near: float,
    far: float,
    box_size: float,
    num_coarse: int,
    num_fine: int,
    perturb: bool,
    density_shift: float = -1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Colour ``[B, R, 3]``, depth and opacity ``[B, R]``: the same math as the library, written plainly."""
    b, r = directions.shape[:2]
    centre = torch.tensor([0.0, 0.0, 0.5 * (near + far)], device=directions.device)
    origins = -centre.expand(b, r, 3)
    ray_norm = directions.norm(dim=-1, keepdim=True)

    def field(t: Tensor) -> tuple[Tensor, Tensor]:
        points = origins[..., None, :] + t[..., None] * directions[..., None, :]  # [B, R, S, 3]
        flat = points.reshape(b, -1, 3) * (2.0 / box_size)
        feats = 0
        for p, (i, j) in enumerate(PLANE_AXES):
            grid = flat[..., [i, j]].unsqueeze(1)  # [B, 1, M, 2]
            feats = feats + F.grid_sample(
                planes[:, p], grid, mode="bilinear", padding_mode="zeros", align_corners=False
            )
        raw = mlp(feats[:, :, 0].transpose(1, 2))  # [B, M, 4]
        inside = (flat.abs() <= 1.0).all(dim=-1)
        density = F.softplus(raw[..., 0] + density_shift) * inside
        return density.view(b, r, -1), torch.sigmoid(raw[..., 1:]).view(b, r, -1, 3)

    def march(t: Tensor, density: Tensor, rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mids = 0.5 * (t[..., 1:] + t[..., :-1])
        edges = torch.cat([torch.full_like(t[..., :1], near), mids, torch.full_like(t[..., :1], far)], dim=-1)
        alpha = 1.0 - torch.exp(-density * edges.diff(dim=-1) * ray_norm)
        trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1.0 - alpha[..., :-1]], dim=-1), dim=-1)
        weights = alpha * trans
        opacity = weights.sum(-1)
        return (weights[..., None] * rgb).sum(-2), (weights * t).sum(-1) + (1.0 - opacity) * far, weights

    step = (far - near) / num_coarse
    u = torch.rand(b, r, num_coarse, device=directions.device) if perturb else torch.full((b, r, num_coarse), 0.5)
    t = near + (torch.arange(num_coarse, device=directions.device) + u.to(directions.device)) * step
    density, rgb = field(t)
    _, _, weights = march(t, density, rgb)
    # importance samples: inverse transform of the weights spread over each sample's interval, 1% uniform
    w = weights.detach()
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    edges = torch.cat([torch.full_like(t[..., :1], near), mids, torch.full_like(t[..., :1], far)], dim=-1)
    lengths = edges.diff(dim=-1)
    pmf = 0.99 * w / w.sum(-1, keepdim=True).clamp(min=1e-12) + 0.01 * lengths / (far - near)
    pmf = torch.where(w.sum(-1, keepdim=True) > 1e-12, pmf, lengths / (far - near))
    cdf = torch.cat([torch.zeros_like(pmf[..., :1]), torch.cumsum(pmf, -1)], dim=-1)
    cdf = cdf / cdf[..., -1:]
    q = torch.rand(b, r, num_fine, device=t.device) if perturb else torch.full((b, r, num_fine), 0.5, device=t.device)
    q = (torch.arange(num_fine, device=t.device) + q) / num_fine
    idx = torch.searchsorted(cdf.contiguous(), q.contiguous(), right=True).clamp(1, num_coarse)
    c0, c1 = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    e0, e1 = edges.gather(-1, idx - 1), edges.gather(-1, idx)
    t_fine = (e0 + ((q - c0) / (c1 - c0).clamp(min=1e-12)).clamp(0, 1) * (e1 - e0)).clamp(near, far)
    density_f, rgb_f = field(t_fine)
    t_all, order = torch.sort(torch.cat([t, t_fine], -1), -1)
    density_all = torch.cat([density, density_f], -1).gather(-1, order)
    rgb_all = torch.cat([rgb, rgb_f], -2).gather(-2, order[..., None].expand(-1, -1, -1, 3))
    color, depth, weights = march(t_all, density_all, rgb_all)
    return color, depth, weights.sum(-1)


# ---------------------------------------------------------------------------- set-up and one variant
def setup(args: argparse.Namespace, device: torch.device) -> tuple[Tensor, TriplaneField, FixedCameraRenderer, Tensor]:
    torch.manual_seed(0)
    planes = (torch.randn(args.batch, 3, args.channels, args.plane, args.plane, device=device) * 0.5).requires_grad_()
    sampler = "sparse" if device.type == "cpu" else "grid_sample"
    field = TriplaneField(args.channels, hidden=args.hidden, box_size=args.far - args.near, sampler=sampler).to(device)
    renderer = FixedCameraRenderer(
        size=args.image,
        fov_deg=30.0,
        near=args.near,
        far=args.far,
        num_coarse=args.coarse,
        num_fine=args.fine,
        ray_chunk=args.chunk,
        recompute_chunks=args.recompute_chunks,
    ).to(device)
    g = torch.Generator(device="cpu").manual_seed(1)
    pixels = torch.rand(args.batch, args.image**2, generator=g).argsort(dim=1)[:, : args.rays].to(device)
    return planes, field, renderer, pixels


def make_step(name: str, args: argparse.Namespace, device: torch.device, perturb: bool = True):
    """One forward + backward of ``name`` on fresh inputs, as a closure."""
    planes, field, renderer, pixels = setup(args, device)
    directions = renderer.directions[pixels]
    use_bf16 = device.type == "cuda" and not args.no_bf16
    box = args.far - args.near

    def step() -> None:
        planes.grad = None
        if name == "reference":
            rgb, depth, _ = reference_render(
                planes, field.mlp, directions, args.near, args.far, box, args.coarse, args.fine, perturb
            )
        else:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = renderer(field, planes, pixels, perturb=perturb)
            rgb, depth = out.values, out.depth
        (rgb.square().mean() + depth.square().mean()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def peak_memory(name: str, args: argparse.Namespace, device: torch.device) -> int:
    """Peak memory of one step of ``name`` above the level before it (after a warm-up step)."""
    step = make_step(name, args, device)
    step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    base = _reset_peak_rss()
    step()
    return _peak_rss() - base


def time_variants(args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of both variants, interleaved (reference, selfsup3d, reference, ...) so that both
    see the same machine load."""
    steps = {name: make_step(name, args, device) for name in ("reference", "selfsup3d")}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the peak resident set to the current one; return the current one in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def check_agreement(args: argparse.Namespace, device: torch.device) -> dict:
    """Max absolute differences of colour, depth and plane gradients between the two, deterministic samples."""
    small = argparse.Namespace(**{**vars(args), "batch": 1, "rays": min(args.rays, 1024)})
    results = []
    for name in ("reference", "selfsup3d"):
        planes, field, renderer, pixels = setup(small, device)
        if name == "reference":
            rgb, depth, _ = reference_render(
                planes,
                field.mlp,
                renderer.directions[pixels],
                small.near,
                small.far,
                small.far - small.near,
                small.coarse,
                small.fine,
                False,
            )
        else:
            out = renderer(field, planes, pixels, perturb=False)
            rgb, depth = out.values, out.depth
        (rgb.square().mean() + depth.square().mean()).backward()
        results.append((rgb.detach(), depth.detach(), planes.grad.detach()))
    (r0, d0, g0), (r1, d1, g1) = results
    return {
        "rgb_max_abs_diff": float((r0 - r1).abs().max()),
        "depth_max_abs_diff": float((d0 - d1).abs().max()),
        "grad_max_abs_diff": float((g0 - g1).abs().max()),
        "grad_max_abs": float(g0.abs().max()),
    }


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n")[0])
    p.add_argument("--device", default="auto", help="cpu, cuda (default: cuda when available)")
    p.add_argument("--batch", type=int, default=2, help="images (default %(default)s)")
    p.add_argument("--rays", type=int, default=4096, help="rays per image (default %(default)s)")
    p.add_argument("--image", type=int, default=256, help="render size the rays are drawn from (default 256)")
    p.add_argument("--plane", type=int, default=128, help="triplane resolution (default %(default)s)")
    p.add_argument("--channels", type=int, default=32, help="triplane channels (default %(default)s)")
    p.add_argument("--hidden", type=int, default=64, help="MLP width (default %(default)s)")
    p.add_argument("--coarse", type=int, default=16, help="stratified samples per ray (default %(default)s)")
    p.add_argument("--fine", type=int, default=16, help="importance samples per ray (default %(default)s)")
    p.add_argument("--near", type=float, default=1.5)
    p.add_argument("--far", type=float, default=3.5)
    p.add_argument("--chunk", type=int, default=None, help="rays per image per chunk (default: all)")
    p.add_argument("--recompute-chunks", action="store_true", help="recompute chunks in the backward pass")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-bf16", action="store_true", help="CUDA: keep the MLP in float32")
    p.add_argument("--variant", choices=["reference", "selfsup3d"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _device(args: argparse.Namespace) -> torch.device:
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(args.device)


def _child(variant: str) -> int:
    """Peak memory of one CPU variant measured in a fresh process (its peak resident set is its own)."""
    argv = [a for a in sys.argv[1:] if not a.startswith("--variant")]
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--variant", variant]
    # glibc returns mmap'd blocks to the system on free: with every block above 64 KiB mmap'd, the resident
    # set follows the live tensors instead of keeping freed memory cached (which hides the peak)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args)
    if args.variant:  # child process: memory of one variant
        print(json.dumps({"peak_bytes": peak_memory(args.variant, args, device)}))
        return 0
    samples = args.batch * args.rays * (args.coarse + args.fine)
    print(
        f"renderer benchmark on {device} ({torch.get_num_threads()} threads, torch {torch.__version__}): "
        f"{args.batch} images x {args.rays} rays x ({args.coarse} + {args.fine}) samples = {samples:,} samples, "
        f"triplanes 3x{args.channels}x{args.plane}x{args.plane}, MLP width {args.hidden}, "
        f"chunk {args.chunk or 'all'} rays{' recomputed' if args.recompute_chunks else ''}"
    )
    if hasattr(os, "getloadavg"):
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    agree = check_agreement(args, device)
    print(
        "agreement (deterministic samples): colour {rgb_max_abs_diff:.2e}, depth {depth_max_abs_diff:.2e}, "
        "plane gradient {grad_max_abs_diff:.2e} (max |grad| {grad_max_abs:.2e})".format(**agree)
    )
    names = ("reference", "selfsup3d")
    memory = {n: (_child(n) if device.type == "cpu" else peak_memory(n, args, device)) for n in names}
    times = time_variants(args, device)
    label = "peak CUDA memory" if device.type == "cuda" else "peak RSS rise"
    print(f"{'variant':12s} {'s/iter (min)':>13s} {'s/iter (med)':>13s} {'Msamples/s':>11s} {label:>17s}")
    rate = {}
    for n in names:
        best, med = min(times[n]), sorted(times[n])[len(times[n]) // 2]
        rate[n] = samples / best
        print(f"{n:12s} {best:13.3f} {med:13.3f} {rate[n] / 1e6:11.3f} {memory[n] / 2**20:14.1f} MiB")
    speed = rate["selfsup3d"] / rate["reference"]
    mem = memory["selfsup3d"] / max(memory["reference"], 1)
    print(f"selfsup3d vs reference: {speed:.2f}x throughput, {mem:.2f}x peak memory (target: >= 2x, <= 0.5x)")
    if hasattr(os, "getloadavg"):
        print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
