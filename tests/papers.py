"""Known cameras for the papers' data sets' round trips (tests/test_data_papers.py): 640x360 views with an
off-centre principal point, seen from a world frame that is none of the cameras', a tilted plane for depth,
and a reader of converted shards. Each test writes these cameras in its source's own convention."""

from __future__ import annotations

import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from selfsup3d.datamodules.format import depth_to_array

WIDTH, HEIGHT = 640, 360
PLANE = (np.array([0.1, -0.2, 1.0]) / np.linalg.norm([0.1, -0.2, 1.0]), 2.5)
"""A plane ``n . X = d`` in the cameras' look-at frame (before the world motion), in front of every camera."""


def intrinsics(view: int = 0) -> np.ndarray:
    """Pixel intrinsics of 640x360 views: fx != fy, the principal point well off the centre, varying per view."""
    return np.array([[512.0 + 3 * view, 0, 337.25], [0, 498.5 + 2 * view, 171.75], [0, 0, 1]])


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


WORLD = np.eye(4)
WORLD[:3, :3] = _rotation(np.array([0.3, -1.0, 0.4]), 1.1)
WORLD[:3, 3] = [4.0, -2.5, 7.0]
"""The motion from the look-at frame to the world the source writes (no camera's frame)."""


def cameras(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 4, 4]`` OpenCV camera-to-world matrices: cameras on an arc looking at the plane, in :data:`WORLD`."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        angle = -0.4 + 0.8 * i / max(1, n - 1) + 0.05 * rng.normal()
        position = np.array([2.0 * np.sin(angle), 0.3 * rng.normal(), -1.0 + 2.0 * (1 - np.cos(angle))])
        forward = np.array([0.0, 0.0, 2.5]) - position
        forward /= np.linalg.norm(forward)
        right = np.cross([0.0, 1.0, 0.0], forward)  # y down: right = down x forward
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        c2w = np.eye(4)
        c2w[:3, :3] = np.column_stack([right, down, forward])
        c2w[:3, 3] = position
        out.append(WORLD @ c2w)
    return np.stack(out)


def plane_depth(K: np.ndarray, c2w: np.ndarray, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Z-depth ``[H, W]`` of :data:`PLANE` (moved into :data:`WORLD`) at the pixel centres of camera ``K, c2w``."""
    normal = WORLD[:3, :3] @ PLANE[0]
    offset = PLANE[1] + normal @ WORLD[:3, 3]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays = np.linalg.inv(K) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])  # z = 1
    dirs = c2w[:3, :3] @ rays
    t = (offset - normal @ c2w[:3, 3]) / (normal @ dirs)
    return t.reshape(height, width)


def texture(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> np.ndarray:
    """A smooth RGB image (uint8) that differs per ``seed``."""
    v, u = np.mgrid[0:height, 0:width] + 0.5
    phase = seed * 0.7
    channels = [np.sin(u / 37 + phase) * np.cos(v / 29), np.cos(u / 53 - v / 41 + phase), np.sin((u + v) / 61)]
    return (127.5 + 100 * np.stack(channels, -1)).round().astype(np.uint8)


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


def read_shards(folder: Path, pattern: str = "*.tar") -> dict[str, dict]:
    """``{key: {"fields": {field: bytes}, "cameras": dict | None, "meta": dict}}`` of every sample in the shards."""
    samples: dict[str, dict] = defaultdict(lambda: {"fields": {}})
    for shard in sorted(folder.glob(pattern)):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                samples[key]["fields"][field] = tar.extractfile(member).read()
    for sample in samples.values():
        fields = sample["fields"]
        sample["cameras"] = json.loads(fields["cameras.json"]) if "cameras.json" in fields else None
        sample["meta"] = json.loads(fields["meta.json"])
    return dict(samples)


def shard_cameras(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(K [V, 3, 3], c2w [V, 4, 4])`` of a sample from :func:`read_shards`."""
    views = sample["cameras"]["views"]
    return np.array([v["K"] for v in views]), np.array([v["c2w"] for v in views])


def shard_depth(sample: dict, view: int) -> np.ndarray:
    """Metric depth ``[H, W]`` of one view of a sample from :func:`read_shards`."""
    with Image.open(io.BytesIO(sample["fields"][f"{view:03d}.depth.png"])) as im:
        return depth_to_array(im, sample["cameras"]["depth_scale"])


def relative_error(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(got - truth).max() / np.abs(truth).max())


def check_cameras(sample: dict, K: np.ndarray, c2w: np.ndarray, tol: float = 1e-4) -> None:
    """The shard's intrinsics equal ``K`` and its poses equal ``c2w`` up to one rigid motion of the world, both to
    relative error ``tol``."""
    got_K, got_c2w = shard_cameras(sample)
    assert got_K.shape == K.shape and got_c2w.shape == c2w.shape
    assert relative_error(got_K, K) <= tol, (got_K, K)
    motion = c2w[0] @ np.linalg.inv(got_c2w[0])  # the world's rigid motion, from the first view
    assert np.allclose(motion[:3, :3] @ motion[:3, :3].T, np.eye(3), atol=1e-6)
    moved = motion @ got_c2w
    assert relative_error(moved, c2w) <= tol, np.abs(moved - c2w).max()
