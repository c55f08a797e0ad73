"""CO3Dv2 sequences (``frame_annotations.jgz``, ``sequence_annotations.jgz``, images and depth) into posed
multi-view shards with depth: ``selfsup3d data convert co3d``.

Per category, ``frame_annotations.jgz`` (gzipped JSON list) gives every frame's ``sequence_name``,
``frame_number``, ``image {path, size: [H, W]}``, ``depth {path, scale_adjustment, mask_path}`` and ``viewpoint
{R, T, focal_length, principal_point, intrinsics_format}``; ``sequence_annotations.jgz`` gives each sequence's
``viewpoint_quality_score``; ``set_lists/set_lists_NAME.json`` maps ``train``/``val``/``test`` to
``[sequence, frame_number, path]`` entries. Paths are relative to the data set's root (the categories' parent).

Cameras are **PyTorch3D's**: row vectors, ``X_cam = X_world R + T``, camera axes x left, y up, z forward, and
intrinsics in NDC: with ``intrinsics_format`` ``ndc_norm_image_bounds`` (the legacy default) each axis spans
``[-1, 1]`` (``s = (W/2, H/2)``), with ``ndc_isotropic`` the shorter side does (``s = min(W, H)/2`` on both). In
pixels (corner at 0, as the shard format): ``f = focal_length * s``, ``c = (W/2, H/2) - principal_point * s``.
To OpenCV: world-to-camera rotation ``diag(-1, -1, 1) R^T``, translation ``diag(-1, -1, 1) T``, then inverted.
(Reading ``R`` as a column-vector world-to-camera matrix, or ``f * W/2`` with ``(p + 1) * W/2``, is the mistake a
public LVSM fork makes.) Depth PNGs hold **float16 bit patterns** (16-bit PNG values reinterpreted), times
``scale_adjustment``; where a depth mask is given, depth outside it is 0 (unknown). Depth is z-depth in the
cameras' units, as the shard format's.

``SRC`` is the data set's root (categories below it) or one category folder. ``set_list`` (``fewview_dev``) with
``subset`` (``train``/``val``/``test``) converts only the frames that set list names; ``min_quality`` skips
sequences whose ``viewpoint_quality_score`` is lower (DUSt3R keeps those above 0.5). One job per sequence, frames
in ``frame_number`` order (resumable, ``--part i/n``).
"""

from __future__ import annotations

import gzip
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfsup3d.datamodules.prepare.frames import capture_order_key, rigid_inverse, scale_K, scene_record
from selfsup3d.datamodules.prepare.journal import RunOptions, SceneOptions, convert_scenes
from selfsup3d.datamodules.prepare.writer import ConvertReport, Unit

FRAMES_FILE = "frame_annotations.jgz"
SEQUENCES_FILE = "sequence_annotations.jgz"
INTRINSICS_FORMATS = ("ndc_norm_image_bounds", "ndc_isotropic")
P3D_TO_CV = np.diag([-1.0, -1.0, 1.0])
"""PyTorch3D's camera axes (x left, y up) to OpenCV's (x right, y down); z forward in both."""


def co3d_camera(viewpoint: dict[str, Any], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(K, c2w)`` (pixels, OpenCV) of a CO3D ``viewpoint`` for an image of ``height x width`` (the
    annotation's ``image.size``).

    Raises:
        ValueError: a missing field, a wrong shape, an unknown ``intrinsics_format`` or a non-rigid ``R``.
    """
    missing = [k for k in ("R", "T", "focal_length", "principal_point") if k not in viewpoint]
    if missing:
        raise ValueError(f"viewpoint lacks {', '.join(missing)}")
    R = np.asarray(viewpoint["R"], dtype=np.float64)
    T = np.asarray(viewpoint["T"], dtype=np.float64)
    focal = np.asarray(viewpoint["focal_length"], dtype=np.float64)
    principal = np.asarray(viewpoint["principal_point"], dtype=np.float64)
    if R.shape != (3, 3) or T.shape != (3,) or focal.shape != (2,) or principal.shape != (2,):
        raise ValueError(
            f"viewpoint needs R 3x3, T 3, focal_length 2, principal_point 2; got {list(R.shape)}, {list(T.shape)}, "
            f"{list(focal.shape)}, {list(principal.shape)}"
        )
    fmt = viewpoint.get("intrinsics_format", "ndc_norm_image_bounds")
    half = np.array([width, height], dtype=np.float64) / 2
    if fmt == "ndc_norm_image_bounds":
        scale = half
    elif fmt == "ndc_isotropic":
        scale = np.full(2, half.min())
    else:
        raise ValueError(f"intrinsics_format must be one of {INTRINSICS_FORMATS}, got {fmt!r}")
    fx, fy = focal * scale
    cx, cy = half - principal * scale
    w2c = np.zeros((3, 4))
    w2c[:, :3] = P3D_TO_CV @ R.T
    w2c[:, 3] = P3D_TO_CV @ T
    c2w = rigid_inverse(w2c)
    if c2w is None:
        raise ValueError("viewpoint R is not a rotation")
    return np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]), c2w


def read_float16_depth(path: Path, scale: float, mask: Path | None) -> np.ndarray:
    """A CO3D depth PNG (16-bit values holding float16 bit patterns) in the cameras' units, 0 where unknown (not
    finite, not positive, or outside the depth ``mask``)."""
    with Image.open(path) as im:
        bits = np.asarray(im).astype(np.uint16)
    depth = bits.view(np.float16).astype(np.float32) * np.float32(scale)
    depth[~np.isfinite(depth) | (depth <= 0)] = 0
    if mask is not None:
        with Image.open(mask) as im:
            valid = np.asarray(im.convert("L")) > 0
        if valid.shape == depth.shape:
            depth[~valid] = 0
    return depth


def _read_jgz(path: Path) -> Any:
    with gzip.open(path, "rt") as f:
        return json.load(f)


_CATEGORY: dict[str, dict[str, list[dict[str, Any]]]] = {}
"""The frames of the last category a worker read, by sequence (jobs come in category order)."""


def category_frames(category: Path) -> dict[str, list[dict[str, Any]]]:
    """``{sequence: [frame annotation, ...]}`` of a category, read once per process and category."""
    key = str(category)
    if key not in _CATEGORY:
        _CATEGORY.clear()
        grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for frame in _read_jgz(category / FRAMES_FILE):
            grouped[str(frame.get("sequence_name"))].append(frame)
        _CATEGORY[key] = dict(grouped)
    return _CATEGORY[key]


def _find(root: Path, category: Path, relative: str | None) -> Path | None:
    if not relative:
        return None
    return next((p for p in (root / relative, category / relative) if p.is_file()), None)


def _co3d_unit(args: tuple[tuple[str, str, list[int] | None], dict[str, Any]]) -> Unit:
    """One sequence (category folder, sequence, frame numbers to keep or ``None``) into a unit (a worker's job)."""
    (category_dir, sequence, keep), opts = args
    category = Path(category_dir)
    name = f"{category.name}/{sequence}"
    root = category.parent
    unit = Unit()
    try:
        annotations = category_frames(category).get(sequence, [])
    except (OSError, ValueError) as err:
        unit.skipped.append((name, f"unreadable {FRAMES_FILE} ({type(err).__name__}: {err})"))
        return unit
    if not annotations:
        unit.skipped.append((name, f"no frames in {FRAMES_FILE}"))
        return unit
    wanted = None if keep is None else set(keep)
    frames, depths = [], {}
    for frame in sorted(annotations, key=lambda f: int(f.get("frame_number", 0))):
        number = int(frame.get("frame_number", -1))
        if wanted is not None and number not in wanted:
            continue
        what = f"{name}/{number}"
        try:
            image = frame["image"]
            path = _find(root, category, image.get("path"))
            if path is None:
                raise FileNotFoundError(f"image not found: {image.get('path')}")
            height, width = (int(v) for v in image["size"])
            K, c2w = co3d_camera(frame["viewpoint"], height, width)
            with Image.open(path) as im:
                K = scale_K(K, im.width / width, im.height / height)  # the file, when it differs from the annotation
            info = frame.get("depth") or {}
            depth_path = _find(root, category, info.get("path"))
            if depth_path is not None:
                mask = _find(root, category, info.get("mask_path"))
                depths[what] = read_float16_depth(depth_path, float(info.get("scale_adjustment", 1.0)), mask)
        except (KeyError, TypeError, OSError, ValueError) as err:
            unit.skipped.append((what, f"{type(err).__name__}: {err}"))
            continue
        frames.append((what, path, K, c2w))
    return scene_record(name, frames, "co3d", opts, unit, depth=depths or None, meta={"category": category.name})


def _set_list_frames(category: Path, set_list: str, subset: str) -> dict[str, list[int]]:
    """``{sequence: frame numbers}`` that ``set_lists/set_lists_{set_list}.json`` names for ``subset``."""
    path = category / "set_lists" / f"set_lists_{set_list}.json"
    lists = json.loads(path.read_text())
    if subset not in lists:
        raise ValueError(f"{path} has no '{subset}' list (it has {', '.join(sorted(lists))})")
    out: dict[str, list[int]] = defaultdict(list)
    for entry in lists[subset]:
        out[str(entry[0])].append(int(entry[1]))
    return dict(out)


def list_sequences(
    src: Path, set_list: str | None, subset: str, min_quality: float | None
) -> tuple[list[tuple[Path, str, list[int] | None]], list[tuple[str, str]]]:
    """``(category folder, sequence, frame numbers or None)`` of every sequence to convert, in category and
    sequence order, and the sequences left out with the reason.

    Raises:
        FileNotFoundError: no category (a folder with ``frame_annotations.jgz``) at or under ``src``, or a set list
            that does not exist.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    categories = [src] if (src / FRAMES_FILE).is_file() else sorted(p.parent for p in src.glob(f"*/{FRAMES_FILE}"))
    if not categories:
        raise FileNotFoundError(f"{src} holds no CO3D category ({FRAMES_FILE}), neither itself nor its sub-folders")
    jobs, skipped = [], []
    for category in categories:
        sequences = _read_jgz(category / SEQUENCES_FILE) if (category / SEQUENCES_FILE).is_file() else None
        if sequences is None:
            names = sorted(category_frames(category), key=capture_order_key)
            scores: dict[str, Any] = {}
        else:
            names = sorted((str(s["sequence_name"]) for s in sequences), key=capture_order_key)
            scores = {str(s["sequence_name"]): s.get("viewpoint_quality_score") for s in sequences}
        listed = None
        if set_list:
            path = category / "set_lists" / f"set_lists_{set_list}.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (--set-list {set_list})")
            listed = _set_list_frames(category, set_list, subset)
        for sequence in names:
            name = f"{category.name}/{sequence}"
            score = scores.get(sequence)
            if min_quality is not None and score is not None and float(score) < min_quality:
                skipped.append((name, f"viewpoint_quality_score {float(score):.3f} < {min_quality}"))
                continue
            if listed is not None and sequence not in listed:
                continue  # not in this subset of the set list: not converted, not a skip
            jobs.append((category, sequence, None if listed is None else sorted(listed[sequence])))
    return jobs, skipped


def convert_co3d(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    set_list: str | None = None,
    subset: str | None = None,
    min_quality: float | None = None,
    scenes: SceneOptions | None = None,
    run: RunOptions | None = None,
) -> ConvertReport:
    """Convert CO3Dv2 sequences (the data set's root or one category folder) into posed multi-view shards with
    depth.

    Args:
        set_list: convert only the frames of ``set_lists/set_lists_{set_list}.json`` (``fewview_dev``,
            ``manyview_dev_0``, ...) in ``subset``; ``None``: every frame.
        subset: ``train``, ``val`` or ``test`` of the set list (default: ``split``).
        min_quality: skip sequences with a lower ``viewpoint_quality_score`` (``None``: keep all).
        **others: as :func:`~selfsup3d.datamodules.prepare.re10k.convert_re10k`'s.
    """
    subset = subset or split
    sequences, skipped = list_sequences(Path(src), set_list, subset, min_quality)
    inputs = [(f"{c.name}/{s}", (str(c), s, keep)) for c, s, keep in sequences]
    extra = {"set_list": set_list, "subset": subset if set_list else None, "min_quality": min_quality}
    return convert_scenes("co3d", inputs, _co3d_unit, out, split, scenes, run, extra, skipped)
