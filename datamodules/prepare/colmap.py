"""COLMAP text models (``cameras.txt``, ``images.txt``) with their images into multi-view shards:
``selfsup3d data convert colmap``.

The model is read from ``sparse/0/``, ``sparse/`` or the scene folder, the images from its ``images/`` folder:
world-to-camera quaternions and translations are inverted into ``c2w`` (COLMAP cameras already use OpenCV axes
and pixel centres at +0.5, like the shard format). Models SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL and
OPENCV are read; lens distortion is **ignored with a note** by default (the pinhole part is kept), or the views
are refused with ``refuse_distortion``. Views are ordered by file name in natural order
(:func:`~selfsup3d.datamodules.prepare.frames.capture_order_key`). When the model has ``points3D.txt``, every
view's observations of the sparse points (``images.txt``'s second lines) are kept as ``sparse_depth.npy``
(pixel position and z-depth in the model's units), so that ``selfsup3d data pseudo-depth`` can scale
monocular depth to them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfsup3d.datamodules.format import SampleKeys, ShardSink
from selfsup3d.datamodules.prepare.frames import capture_order_key, scale_K, scene_record
from selfsup3d.datamodules.prepare.writer import (
    ConvertReport,
    Unit,
    converter_options,
    pool_map,
    scene_dirs,
    write_units,
)

COLMAP_MODELS = {"SIMPLE_PINHOLE": 3, "PINHOLE": 4, "SIMPLE_RADIAL": 4, "RADIAL": 5, "OPENCV": 8}


def _colmap_model_dir(scene: Path) -> Path | None:
    for candidate in (scene / "sparse" / "0", scene / "sparse", scene):
        if (candidate / "cameras.txt").is_file() and (candidate / "images.txt").is_file():
            return candidate
    return None


def _colmap_binary_dir(scene: Path) -> Path | None:
    for candidate in (scene / "sparse" / "0", scene / "sparse", scene):
        if (candidate / "cameras.bin").is_file():
            return candidate
    return None


def parse_colmap_cameras(text: str) -> dict[int, tuple[str, int, int, list[float]]]:
    """``cameras.txt`` -> ``{camera_id: (model, width, height, params)}``."""
    cameras = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        cameras[int(parts[0])] = (parts[1], int(parts[2]), int(parts[3]), [float(p) for p in parts[4:]])
    return cameras


def parse_colmap_points(text: str) -> dict[int, np.ndarray]:
    """``points3D.txt`` -> ``{point3d_id: xyz}``."""
    points = {}
    for line in text.splitlines():
        parts = line.split()
        if parts and not parts[0].startswith("#"):
            points[int(parts[0])] = np.array([float(p) for p in parts[1:4]])
    return points


def parse_colmap_observations(text: str) -> dict[int, np.ndarray]:
    """``images.txt`` -> ``{image_id: [N, 3] rows (x, y, point3d_id)}``: each image's observations of sparse
    points (its second line; ``point3d_id`` -1, an unmatched feature, left out)."""
    lines = [line.rstrip("\n") for line in text.splitlines() if not line.startswith("#")]
    out = {}
    for header, points in zip(lines[::2], lines[1::2] + [""] * (len(lines) % 2)):
        parts = header.split()
        if len(parts) < 10:
            continue
        values = np.array([float(p) for p in points.split()], dtype=np.float64).reshape(-1, 3)
        out[int(parts[0])] = values[values[:, 2] >= 0]
    return out


def sparse_view_depth(observations: np.ndarray, points: dict[int, np.ndarray], c2w: np.ndarray) -> np.ndarray:
    """``[N, 3]`` rows ``(u, v, z)`` of one view: its observed points' pixel positions and z-depth in the camera
    ``c2w`` (points in front of it only)."""
    rows = [(x, y, points[int(pid)]) for x, y, pid in observations if int(pid) in points]
    if not rows:
        return np.zeros((0, 3))
    world = np.stack([r[2] for r in rows])
    w2c = np.linalg.inv(c2w)
    z = world @ w2c[:3, :3].T[:, 2] + w2c[2, 3]
    uvz = np.column_stack([[r[0] for r in rows], [r[1] for r in rows], z])
    return uvz[uvz[:, 2] > 0]


def parse_colmap_images(text: str) -> list[tuple[int, np.ndarray, np.ndarray, int, str]]:
    """``images.txt`` -> ``[(image_id, qvec (w, x, y, z), tvec, camera_id, name)]``; every image takes two
    lines (the second, its 2D points, may be empty)."""
    lines = [line.rstrip("\n") for line in text.splitlines() if not line.startswith("#")]
    out = []
    for header in lines[::2]:
        parts = header.strip().split()
        if not parts:
            continue
        if len(parts) < 10:
            raise ValueError(f"images.txt: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got {header!r}")
        qvec = np.array([float(p) for p in parts[1:5]])
        tvec = np.array([float(p) for p in parts[5:8]])
        out.append((int(parts[0]), qvec, tvec, int(parts[8]), " ".join(parts[9:])))
    return out


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """Unit quaternion ``(w, x, y, z)`` (COLMAP's order) to a rotation matrix."""
    w, x, y, z = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


def colmap_pinhole(model: str, params: list[float]) -> tuple[np.ndarray, list[float]]:
    """``(K, distortion coefficients)`` of a supported COLMAP camera model."""
    if model not in COLMAP_MODELS:
        raise ValueError(f"camera model {model} is not supported (supported: {', '.join(COLMAP_MODELS)})")
    if len(params) != COLMAP_MODELS[model]:
        raise ValueError(f"camera model {model} needs {COLMAP_MODELS[model]} parameters, got {len(params)}")
    if model in ("SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL"):
        fx = fy = params[0]
        cx, cy = params[1], params[2]
        distortion = params[3:]
    else:
        fx, fy, cx, cy = params[:4]
        distortion = params[4:]
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64), list(distortion)


def _colmap_unit(args: tuple[Path, str, str, dict[str, Any]]) -> Unit:
    scene_dir, name, key, opts = args
    unit = Unit(None)
    model_dir = _colmap_model_dir(scene_dir)
    images_dir = scene_dir / opts["images"]
    if model_dir is None:
        unit.skipped.append((name, "no cameras.txt/images.txt"))
        return unit
    if not images_dir.is_dir():
        unit.skipped.append((name, f"no image folder {images_dir}"))
        return unit
    try:
        cameras = parse_colmap_cameras((model_dir / "cameras.txt").read_text())
        images_txt = (model_dir / "images.txt").read_text()
        records = parse_colmap_images(images_txt)
        points_txt = model_dir / "points3D.txt"
        points = parse_colmap_points(points_txt.read_text()) if points_txt.is_file() else {}
        observations = parse_colmap_observations(images_txt) if points else {}
    except (OSError, ValueError, IndexError) as err:
        unit.skipped.append((name, f"unreadable COLMAP model ({type(err).__name__}: {err})"))
        return unit
    frames: list[tuple[str, Path, np.ndarray, np.ndarray]] = []
    sparse: dict[str, np.ndarray] = {}
    distorted = 0
    for image_id, qvec, tvec, camera_id, image_name in sorted(records, key=lambda r: capture_order_key(r[4])):
        what = f"{name}/{image_name}"
        if camera_id not in cameras:
            unit.skipped.append((what, f"camera {camera_id} is not in cameras.txt"))
            continue
        model, width, height, params = cameras[camera_id]
        try:
            K, distortion = colmap_pinhole(model, params)
        except ValueError as err:
            unit.skipped.append((what, str(err)))
            continue
        if any(abs(d) > 0 for d in distortion):
            if opts["refuse_distortion"]:
                unit.skipped.append(
                    (
                        what,
                        f"distorted camera ({model} {distortion}) refused; undistort it first "
                        "(colmap image_undistorter)",
                    )
                )
                continue
            distorted += 1
        path = images_dir / image_name
        if not path.is_file():
            unit.skipped.append((what, "image not found"))
            continue
        try:
            with Image.open(path) as im:
                actual = im.size
        except Exception as err:
            unit.skipped.append((what, f"unreadable image ({type(err).__name__}: {err})"))
            continue
        K = scale_K(K, actual[0] / width, actual[1] / height)  # e.g. a downscaled image folder
        rot = quaternion_to_rotation(qvec)
        c2w = np.eye(4)
        c2w[:3, :3] = rot.T
        c2w[:3, 3] = -rot.T @ tvec
        frames.append((what, path, K, c2w))
        if image_id in observations:
            uvz = sparse_view_depth(observations[image_id], points, c2w)
            sparse[what] = uvz * [actual[0] / width, actual[1] / height, 1.0]  # pixels of the image file
    if distorted:
        unit.notes.append(
            (
                name,
                f"{distorted} view(s): lens distortion ignored (pinhole part kept); "
                "pass --refuse-distortion to skip them",
            )
        )
    return scene_record(name, frames, "colmap", opts, unit, sparse if points else None, key=key)


def convert_colmap(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    images: str = "images",
    refuse_distortion: bool = False,
    scenes_per_shard: int = 16,
    max_size: int | None = None,
    max_views: int | None = None,
    min_views: int = 2,
    image_format: str = "png",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert COLMAP text models with their images into multi-view shards.

    Args:
        src: a scene folder (``sparse/0/``, ``sparse/`` or the text files, and ``images/``) or a folder of them.
        out: output folder.
        split: shard name prefix.
        images: name of the image folder inside each scene (e.g. ``images_4``; intrinsics are scaled to it).
        refuse_distortion: skip views whose camera has non-zero distortion (default: keep them, ignoring the
            distortion, with a note in the summary).
        scenes_per_shard: scenes per tar shard.
        max_size: downscale so the longer side is at most this.
        max_views: keep at most this many views per scene, evenly spread (by image name).
        min_views: skip scenes with fewer usable views.
        image_format: encoding of images that are re-encoded (others are copied).
        workers: processes (all cores when ``None``).
        overwrite: replace existing shards of ``split``.
        progress: show a progress bar.
    """
    src_path = Path(src)

    def is_scene(p: Path) -> bool:
        return _colmap_model_dir(p) is not None or _colmap_binary_dir(p) is not None

    scenes = scene_dirs(src_path, is_scene, "COLMAP model (sparse/0/cameras.txt, images.txt)")
    opts = converter_options(max_size, max_views, min_views, (0, 0, 0), image_format)
    opts.update(images=images, refuse_distortion=refuse_distortion)
    report = ConvertReport("colmap", str(out), split)
    jobs = []
    keys = SampleKeys()
    for d in scenes:
        name = d.name if d != src_path else src_path.resolve().name
        if _colmap_model_dir(d) is None:
            binary = _colmap_binary_dir(d)
            hint = f"colmap model_converter --input_path {binary} --output_path {binary} --output_type TXT"
            report.skipped.append((name, f"binary COLMAP model only; convert it to text with `{hint}`"))
            continue
        jobs.append((d, name, keys.key(name), opts))
    sink = ShardSink(out, split, samples_per_shard=scenes_per_shard, image_format=image_format, overwrite=overwrite)
    return write_units(pool_map(_colmap_unit, jobs, workers, "convert colmap", progress), report, sink)
