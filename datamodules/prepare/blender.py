"""NeRF / Blender scenes (``transforms*.json`` + images) into multi-view shards: ``selfsup3d data convert blender``.

OpenGL camera-to-world matrices (x right, y up, z backward) become OpenCV ones (``c2w @ diag(1, -1, -1, 1)``);
intrinsics from ``camera_angle_x`` (and ``camera_angle_y``) or ``fl_x``/``fl_y``/``cx``/``cy`` (also per frame),
scaled when ``w``/``h`` differ from the image files; all ``transforms_*.json`` of a scene (train/val/test) are
merged into one scene, its frames in the order of their ``frames`` lists. RGBA images are composited over the
``background`` colour and their alpha becomes the mask.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfsup3d.datamodules.format import SampleKeys, ShardSink
from selfsup3d.datamodules.prepare.frames import IMAGE_SUFFIXES, orthonormal, scale_K, scene_record
from selfsup3d.datamodules.prepare.writer import (
    ConvertReport,
    Unit,
    converter_options,
    pool_map,
    scene_dirs,
    write_units,
)

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


_BLENDER_ORDER = ("transforms.json", "transforms_train.json", "transforms_val.json", "transforms_test.json")


def _blender_files(scene: Path) -> list[Path]:
    """``transforms*.json`` of a scene: train, val, test first (views keep that order), then the rest sorted."""
    files = sorted(scene.glob("transforms*.json"))
    return sorted(files, key=lambda f: (_BLENDER_ORDER.index(f.name) if f.name in _BLENDER_ORDER else 99, f.name))


def _find_frame_image(base: Path, file_path: str) -> Path | None:
    path = (base / file_path).resolve()
    if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
        return path
    for ext in (".png", ".jpg", ".jpeg", ".webp", ".PNG", ".JPG", ".JPEG"):
        candidate = path.with_name(path.name + ext)
        if candidate.is_file():
            return candidate
    return None


def _blender_intrinsics(spec: dict[str, Any], width: int, height: int) -> np.ndarray:
    """Intrinsics at the image files' size from a transforms.json (or frame) dict."""
    w_ref = float(spec.get("w", width))
    h_ref = float(spec.get("h", height))
    if "fl_x" in spec:
        fx = float(spec["fl_x"])
        fy = float(spec.get("fl_y", fx))
    elif "camera_angle_x" in spec:
        fx = 0.5 * w_ref / math.tan(0.5 * float(spec["camera_angle_x"]))
        fy = 0.5 * h_ref / math.tan(0.5 * float(spec["camera_angle_y"])) if "camera_angle_y" in spec else fx
    else:
        raise ValueError("no intrinsics: neither camera_angle_x nor fl_x")
    cx = float(spec.get("cx", w_ref / 2))
    cy = float(spec.get("cy", h_ref / 2))
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
    return scale_K(K, width / w_ref, height / h_ref)


_BLENDER_CAMERA_KEYS = ("camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "cx", "cy", "w", "h")


_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def _blender_unit(args: tuple[Path, str, str, dict[str, Any]]) -> Unit:
    scene_dir, name, key, opts = args
    unit = Unit(None)
    frames: list[tuple[str, Path, np.ndarray, np.ndarray]] = []
    for tf in _blender_files(scene_dir):
        try:
            spec = json.loads(tf.read_text())
        except (OSError, ValueError) as err:
            unit.skipped.append((f"{name}/{tf.name}", f"unreadable JSON ({err})"))
            continue
        if not isinstance(spec, dict) or not isinstance(spec.get("frames"), list):
            unit.skipped.append((f"{name}/{tf.name}", "no 'frames' list"))
            continue
        if any(float(spec.get(k, 0) or 0) != 0 for k in _DISTORTION_KEYS):
            unit.notes.append((f"{name}/{tf.name}", "distortion coefficients ignored (pinhole part kept)"))
        for i, frame in enumerate(spec["frames"]):
            what = f"{name}/{tf.name}[{i}]"
            file_path = frame.get("file_path") if isinstance(frame, dict) else None
            if not isinstance(file_path, str):
                unit.skipped.append((what, "frame without 'file_path'"))
                continue
            what = f"{name}/{file_path}"
            path = _find_frame_image(tf.parent, file_path)
            if path is None:
                unit.skipped.append((what, "image not found"))
                continue
            try:
                gl = np.asarray(frame["transform_matrix"], dtype=np.float64)
                if gl.shape != (4, 4):
                    raise ValueError(f"shape {list(gl.shape)}")
            except (KeyError, TypeError, ValueError) as err:
                unit.skipped.append((what, f"bad transform_matrix ({err})"))
                continue
            c2w = orthonormal(gl @ GL_TO_CV)
            if c2w is None:
                unit.skipped.append((what, "transform_matrix is not a rigid transform"))
                continue
            try:
                with Image.open(path) as im:
                    width, height = im.size
                camera = {k: spec[k] for k in _BLENDER_CAMERA_KEYS if k in spec}
                camera.update({k: frame[k] for k in _BLENDER_CAMERA_KEYS if k in frame})
                K = _blender_intrinsics(camera, width, height)
            except Exception as err:
                unit.skipped.append((what, f"{type(err).__name__}: {err}"))
                continue
            frames.append((what, path, K, c2w))
    return scene_record(name, frames, "blender", opts, unit, key=key)


def convert_blender(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    scenes_per_shard: int = 16,
    max_size: int | None = None,
    max_views: int | None = None,
    min_views: int = 2,
    background: Sequence[int] = (255, 255, 255),
    image_format: str = "png",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert NeRF/Blender scenes (``transforms*.json`` + images) into multi-view shards.

    Args:
        src: a scene folder (with ``transforms*.json``) or a folder of scene folders.
        out: output folder.
        split: shard name prefix.
        scenes_per_shard: scenes per tar shard.
        max_size: downscale so the longer side is at most this (intrinsics follow).
        max_views: keep at most this many views per scene, evenly spread.
        min_views: skip scenes with fewer usable views.
        background: RGB that transparent pixels are composited over (their alpha becomes the mask).
        image_format: encoding of images that are re-encoded (others are copied).
        workers: processes (all cores when ``None``).
        overwrite: replace existing shards of ``split``.
        progress: show a progress bar.
    """
    src_path = Path(src)
    scenes = scene_dirs(src_path, lambda p: bool(_blender_files(p)), "transforms*.json")
    opts = converter_options(max_size, max_views, min_views, background, image_format)
    names = [d.name if d != src_path else src_path.resolve().name for d in scenes]
    keys = SampleKeys()
    jobs = [(d, name, keys.key(name), opts) for d, name in zip(scenes, names)]
    report = ConvertReport("blender", str(out), split)
    sink = ShardSink(out, split, samples_per_shard=scenes_per_shard, image_format=image_format, overwrite=overwrite)
    return write_units(pool_map(_blender_unit, jobs, workers, "convert blender", progress), report, sink)
