"""Synthetic multi-view scenes with exact geometry for the probe tests (``from probe_synthetic import ...``).

A scene is a textured square ``|x|, |y| <= 1.2`` of the ground plane ``z = 0`` seen by ``V`` pinhole cameras
on the upper hemisphere looking at the origin. Depth is the exact ray-plane intersection (0 off the square),
the texture a smooth pattern of world position, different per scene, and the background a flat colour.
Deterministic for its arguments; a few scenes take milliseconds.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from selfsup3d.datamodules.format import Scene, ShardSink
from selfsup3d.eval.scenes import SceneSet
from selfsup3d.geometry.cameras import camera_directions, intrinsics_from_fov, look_at, spherical_to_cartesian

HALF = 1.2


def plane_scene(index: int, num_views: int = 4, size: int = 32, seed: int = 0, num_classes: int = 3) -> Scene:
    """One synthetic scene (see the module docstring); ``label = index % num_classes``, asset ``plane_<index>``."""
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    u = torch.rand(num_views, 3, generator=g, dtype=torch.float64)
    azimuth = u[:, 0] * 2 * math.pi
    elevation = torch.deg2rad(35 + 35 * u[:, 1])
    radius = 1.9 + 0.5 * u[:, 2]
    eye = spherical_to_cartesian(azimuth, elevation, radius)
    target = (torch.rand(num_views, 3, generator=g, dtype=torch.float64) - 0.5) * torch.tensor([0.3, 0.3, 0.0])
    c2w = look_at(eye, target.to(eye.dtype))
    K = intrinsics_from_fov(torch.tensor(math.radians(50.0), dtype=torch.float64), size, size).expand(num_views, 3, 3)
    dirs = camera_directions(K, size, size)  # [V, H, W, 3], z = 1
    world = dirs @ c2w[:, None, :3, :3].transpose(-1, -2)  # [V, H, W, 3]
    centre = c2w[:, None, None, :3, 3]
    t = -centre[..., 2] / world[..., 2].clamp(max=-1e-9)
    points = centre + t[..., None] * world
    on = (t > 0) & (points[..., 0].abs() <= HALF) & (points[..., 1].abs() <= HALF)
    depth = torch.where(on, t, torch.zeros_like(t))
    freq = 4 + 8 * torch.rand(3, 2, generator=g, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(3, generator=g, dtype=torch.float64)
    pattern = 0.5 + 0.45 * torch.sin(points[..., None, 0] * freq[:, 0] + points[..., None, 1] * freq[:, 1] + phase)
    background = torch.rand(3, generator=g, dtype=torch.float64) * 0.5 + 0.25
    rgb = torch.where(on[..., None], pattern, background)
    images = [(rgb[v].numpy() * 255).round().astype(np.uint8) for v in range(num_views)]
    return Scene(
        key=f"plane_{index:04d}",
        images=images,
        K=K.numpy().copy(),
        c2w=c2w.numpy(),
        depth=[depth[v].numpy().astype(np.float32) for v in range(num_views)],
        meta={"source": "tests", "label": index % num_classes, "asset": f"plane_{index}"},
    )


def plane_scene_set(num_scenes: int, num_views: int = 4, size: int = 32, seed: int = 0, start: int = 0) -> SceneSet:
    """``num_scenes`` synthetic scenes (indices ``start ..``) as a :class:`SceneSet`, exact (float) depth."""
    scenes = [plane_scene(start + i, num_views, size, seed) for i in range(num_scenes)]
    return SceneSet(
        images=torch.from_numpy(np.stack([np.stack(s.images) for s in scenes])).permute(0, 1, 4, 2, 3).contiguous(),
        depth=torch.from_numpy(np.stack([np.stack(s.depth) for s in scenes]))[:, :, None].float(),
        K=torch.from_numpy(np.stack([s.K for s in scenes])).float(),
        c2w=torch.from_numpy(np.stack([s.c2w for s in scenes])).float(),
        labels=torch.tensor([s.meta["label"] for s in scenes]),
        keys=[s.key for s in scenes],
        groups=[s.meta["asset"] for s in scenes],
    )


def write_plane_shards(
    directory: str | Path, num_scenes: int, num_views: int = 4, size: int = 32, split: str = "val", start: int = 0
) -> str:
    """Write synthetic scenes as shards ``directory/SPLIT-NNNNNN.tar`` (2 shards); returns the brace URL."""
    with ShardSink(Path(directory), split, samples_per_shard=max(1, math.ceil(num_scenes / 2))) as sink:
        for i in range(num_scenes):
            sink.write(plane_scene(start + i, num_views, size))
    return sink.url
