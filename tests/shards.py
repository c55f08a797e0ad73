"""Tiny shards for tests, made with the real renderer and writer (``from shards import ...``).

Everything here is deterministic for its arguments and fast at 32x32 (a few scenes take well under a
second). Rendering happens in-process with one pybullet client shared by the calls of a test process.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsup3d.datamodules.format import ImageSample, Scene, ShardSink, make_key
from selfsup3d.datamodules.prepare.render import RenderSettings, connect, render_scene

_CLIENT: int | None = None


def render_scenes(num_scenes: int = 4, num_views: int = 4, size: int = 32, split: str = "train", seed: int = 0,
                  start: int = 0) -> list[Scene]:  # fmt: skip
    """``num_scenes`` rendered scenes (arrays in memory: images, K, c2w, depth, masks, meta with ``label``).

    Args:
        num_scenes: how many scenes.
        num_views: views per scene.
        size: image width and height.
        split: asset split, ``train`` or ``val`` (validation assets are disjoint from training assets).
        seed: render seed.
        start: index of the first scene (scenes ``start .. start + num_scenes - 1``).
    """
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = connect()
    settings = RenderSettings(num_views=num_views, size=size, seed=seed)
    return [render_scene(_CLIENT, split, i, settings) for i in range(start, start + num_scenes)]


def _asset_split(split: str) -> str:
    """Shard names starting with ``val`` show validation assets, all others training assets."""
    return "val" if split.startswith("val") else "train"


def write_multiview_shards(
    directory: str | os.PathLike[str],
    num_scenes: int = 4,
    num_views: int = 4,
    size: int = 32,
    num_shards: int = 2,
    split: str = "train",
    seed: int = 0,
    with_depth: bool = True,
    with_masks: bool = True,
    image_format: str = "png",
) -> str:
    """Render ``num_scenes`` scenes and write them as multi-view shards ``directory/SPLIT-NNNNNN.tar``
    (``split`` names the shards; names starting with ``val`` show validation assets).

    Returns:
        the brace URL pattern of the shards, e.g. ``/tmp/x/train-{000000..000001}.tar``, ready for
        ``MultiViewShards(train_urls=...)`` (or ``SingleViewShards``, which takes the views one by one).
    """
    scenes = render_scenes(num_scenes, num_views, size, _asset_split(split), seed)
    with ShardSink(
        Path(directory), split, samples_per_shard=math.ceil(num_scenes / num_shards), image_format=image_format
    ) as sink:
        for scene in scenes:
            if not with_depth:
                scene.depth = None
            if not with_masks:
                scene.masks = None
            sink.write(scene)
    return sink.url


def write_singleview_shards(
    directory: str | os.PathLike[str],
    num_samples: int = 8,
    size: int = 32,
    num_shards: int = 2,
    split: str = "train",
    seed: int = 0,
    with_depth: bool = True,
    with_masks: bool = False,
    depth_kind: str = "metric",
    image_format: str = "png",
) -> str:
    """Write ``num_samples`` single-view samples (views of rendered scenes, 4 per scene) with metric depth,
    class labels and optionally masks, as ``directory/SPLIT-NNNNNN.tar``.

    Returns:
        the brace URL pattern of the shards, for ``SingleViewShards(train_urls=...)``.
    """
    views_per_scene = 4
    scenes = render_scenes(math.ceil(num_samples / views_per_scene), views_per_scene, size, _asset_split(split), seed)
    with ShardSink(
        Path(directory), split, samples_per_shard=math.ceil(num_samples / num_shards), image_format=image_format
    ) as sink:
        for n in range(num_samples):
            scene, view = scenes[n // views_per_scene], n % views_per_scene
            sink.write(
                ImageSample(
                    key=make_key(scene.key, f"v{view}"),
                    image=scene.images[view],
                    depth=scene.depth[view] if with_depth and scene.depth is not None else None,
                    mask=scene.masks[view] if with_masks and scene.masks is not None else None,
                    label=int(scene.meta["label"]),
                    meta={"source": "tests", "class_name": scene.meta["class_name"]},
                    depth_kind=depth_kind,
                )
            )
    return sink.url


def reprojection_error(
    image_i: torch.Tensor,
    depth_i: torch.Tensor,
    K_i: torch.Tensor,
    c2w_i: torch.Tensor,
    image_j: torch.Tensor,
    depth_j: torch.Tensor,
    K_j: torch.Tensor,
    c2w_j: torch.Tensor,
    rel_tol: float = 0.01,
) -> tuple[float, float]:
    """Warp view ``i`` into view ``j`` through ``i``'s depth and both cameras (OpenCV ``c2w``, pixel ``K``).

    Images are ``[3, H, W]`` in [0, 1], depths ``[1, H, W]`` (0 = none). A pixel of ``i`` counts when it
    lands inside ``j`` in front of the camera and agrees with ``j``'s depth there within ``rel_tol`` (so it is
    visible in both views).

    Returns:
        ``(mean absolute colour difference over those pixels, their fraction of i's pixels with depth)``;
        ``(1.0, 0.0)`` when no pixel qualifies.
    """
    from selfsup3d.geometry.cameras import project_points, unproject_depth

    i_valid = depth_i[0] > 0
    points = unproject_depth(depth_i.double(), K_i.double(), c2w_i.double())[i_valid]
    uv, z = project_points(points, K_j.double(), c2w_j.double())
    h, w = image_j.shape[-2:]
    col, row = torch.floor(uv[:, 0]).long(), torch.floor(uv[:, 1]).long()
    inside = (z > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    col, row, z = col[inside], row[inside], z[inside]
    d_j = depth_j[0][row, col].double()
    visible = (d_j > 0) & ((d_j - z).abs() < rel_tol * z)
    if not visible.any():
        return 1.0, 0.0
    src = image_i[:, i_valid][:, inside][:, visible]
    dst = image_j[:, row[visible], col[visible]]
    return float((src - dst).abs().mean()), float(visible.sum()) / max(1, int(i_valid.sum()))


# ---------------------------------------------------------------------------- COLMAP models
def rotation_to_quaternion(rot: np.ndarray) -> np.ndarray:
    """(w, x, y, z) of a rotation matrix (Shepperd's method), written independently of the converter."""
    m = rot
    trace = np.trace(m)
    if trace > 0:
        s = 2 * math.sqrt(1 + trace)
        return np.array([s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s])
    i = int(np.argmax(np.diag(m)))
    j, k = (i + 1) % 3, (i + 2) % 3
    s = 2 * math.sqrt(1 + m[i, i] - m[j, j] - m[k, k])
    q = np.zeros(4)
    q[0] = (m[k, j] - m[j, k]) / s
    q[1 + i] = s / 4
    q[1 + j] = (m[j, i] + m[i, j]) / s
    q[1 + k] = (m[k, i] + m[i, k]) / s
    return q


def write_colmap(
    folder: Path,
    scene: Scene,
    model: str = "PINHOLE",
    extra: str = "",
    name: str = "view_{:02d}.png",
    points: int = 0,
) -> None:
    """Write ``scene`` (its images, K and c2w) as a COLMAP text model in ``folder`` (``sparse/0``, ``images/``);
    with ``points``, also ``points3D.txt``: that many surface points per view (from the scene's depth, on a grid of
    pixels), each observed by its view in ``images.txt``, as structure from motion would give them."""
    (folder / "sparse" / "0").mkdir(parents=True)
    (folder / "images").mkdir()
    K = scene.K[0]
    h, w = scene.images[0].shape[:2]
    params = {
        "PINHOLE": [K[0, 0], K[1, 1], K[0, 2], K[1, 2]],
        "SIMPLE_PINHOLE": [K[0, 0], K[0, 2], K[1, 2]],
        "SIMPLE_RADIAL": [K[0, 0], K[0, 2], K[1, 2], 0.05],
        "OPENCV": [K[0, 0], K[1, 1], K[0, 2], K[1, 2], 0, 0, 0, 0],
    }[model]
    params = " ".join(repr(float(x)) for x in params)
    (folder / "sparse" / "0" / "cameras.txt").write_text(f"# Camera list\n1 {model} {w} {h} {params}\n")
    lines = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
    ]
    views = list(range(len(scene.images)))
    random.Random(0).shuffle(views)  # images.txt need not be sorted
    observed, points3d = _sparse_points(scene, points) if points else ({}, [])
    for n, v in enumerate(views):
        w2c = np.linalg.inv(scene.c2w[v])
        q = rotation_to_quaternion(w2c[:3, :3])
        t = w2c[:3, 3]
        numbers = " ".join(repr(float(x)) for x in [*q, *t])
        lines.append(f"{n + 1} {numbers} 1 {name.format(v)}")
        if points:
            lines.append(" ".join(f"{u!r} {v_!r} {pid}" for u, v_, pid in observed[v]) + " 1.0 1.0 -1")
        else:
            lines.append("" if n % 2 else "10.5 12.25 -1 3.0 4.0 7")  # the points line may be empty
    (folder / "sparse" / "0" / "images.txt").write_text("\n".join(lines) + "\n" + extra)
    if points:
        rows = [f"{pid} {x!r} {y!r} {z!r} 128 128 128 0.5" for pid, (x, y, z) in points3d]
        (folder / "sparse" / "0" / "points3D.txt").write_text("# 3D point list\n" + "\n".join(rows) + "\n")
    for v, image in enumerate(scene.images):
        Image.fromarray(image).save(folder / "images" / name.format(v))


def _sparse_points(scene: Scene, per_view: int) -> tuple[dict[int, list], list]:
    """Surface points of ``scene`` from its depth: per view, ``per_view`` pixels on a grid where there is depth,
    unprojected to the world; ``({view: [(u, v, point id)]}, [(point id, xyz)])``."""
    observed: dict[int, list] = {}
    points3d = []
    for v, depth in enumerate(scene.depth):
        rows, cols = np.nonzero(depth > 0)
        pick = np.linspace(0, len(rows) - 1, per_view).astype(int)
        observed[v] = []
        for i, j in zip(rows[pick], cols[pick]):
            u, vv, z = j + 0.5, i + 0.5, float(depth[i, j])
            cam = np.linalg.inv(scene.K[v]) @ np.array([u, vv, 1.0]) * z
            world = scene.c2w[v][:3, :3] @ cam + scene.c2w[v][:3, 3]
            pid = len(points3d) + 1
            points3d.append((pid, tuple(float(x) for x in world)))
            observed[v].append((float(u), float(vv), pid))
    return observed, points3d
