"""RealEstate10K / ACID in pixelSplat's ``.torch`` chunks into posed multi-view shards: ``selfsup3d data convert
re10k``.

A chunk (``torch.save`` of a list, about 100 MB) holds scenes as dicts: ``key`` (the scene id), ``url``,
``timestamps`` int64 ``[N]``, ``cameras`` float32 ``[N, 18]`` and ``images``, ``N`` 1-D uint8 tensors of JPEG
bytes (pixelSplat's ``real_estate_10k_tools/src/convert.py`` writes them; LVSM and RayZer read them). A camera row
is ``fx, fy, cx, cy`` normalised by the image's width (``fx``, ``cx``) and height (``fy``, ``cy``), two unused
numbers, then the world-to-camera ``3x4`` matrix, row-major, OpenCV axes (x right, y down, z forward). The shard
gets ``K`` in pixels of the JPEG's size and the inverted ``c2w``; the JPEG bytes are copied unchanged unless
``max_size`` resizes them. Frames keep their order in the chunk (capture order, by timestamp), so view ``i`` of a
scene is frame ``i`` of the source: the evaluation index of pixelSplat and LVSM
(``assets/evaluation_index_re10k.json``) names frames that way, and ``MultiViewShards(eval_index=...)`` reads it.

``SRC`` is a chunk or a folder searched recursively for ``*.torch`` (pixelSplat's ``re10k/{train,test}/``). One
job per chunk (resumable, ``--part i/n``: :mod:`~selfsup3d.datamodules.prepare.journal`). Chunks are read with
``torch.load(weights_only=True)``: they hold only strings, lists, dicts and tensors.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfsup3d.datamodules.prepare.frames import list_files, rigid_inverse, scene_record
from selfsup3d.datamodules.prepare.journal import RunOptions, SceneOptions, convert_scenes
from selfsup3d.datamodules.prepare.writer import ConvertReport, Unit

CAMERA_ROW = 18
"""Numbers per camera in a chunk: ``fx fy cx cy`` (normalised), two unused, a ``3x4`` world-to-camera matrix."""


def re10k_camera(row: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``(K, c2w)`` of one 18-number camera row for an image of ``width x height`` pixels (``c2w`` is ``None``
    when the row's world-to-camera matrix is not rigid)."""
    fx, fy, cx, cy = (float(v) for v in row[:4])
    K = np.array([[fx * width, 0, cx * width], [0, fy * height, cy * height], [0, 0, 1]], dtype=np.float64)
    return K, rigid_inverse(np.asarray(row[6:18], dtype=np.float64).reshape(3, 4))


def _as_bytes(image: Any) -> bytes:
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 1:
            raise ValueError(
                f"an image must be a 1-D uint8 tensor of JPEG bytes, got {image.dtype} {list(image.shape)}"
            )
        return image.numpy().tobytes()
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    raise ValueError(f"an image must be a 1-D uint8 tensor of JPEG bytes, got {type(image).__name__}")


def _scene_unit(scene: Any, where: str, opts: dict[str, Any]) -> Unit:
    """One scene dict of a chunk (see the module docstring) into a unit."""
    unit = Unit()
    if not isinstance(scene, dict):
        unit.skipped.append((where, f"a scene must be a dict, got {type(scene).__name__}"))
        return unit
    missing = [k for k in ("key", "cameras", "images") if k not in scene]
    if missing:
        named = f"{where} (key {scene['key']})" if "key" in scene else where
        unit.skipped.append((named, f"missing field(s) {', '.join(missing)}"))
        return unit
    name = str(scene["key"])
    cameras = np.asarray(scene["cameras"], dtype=np.float64)
    images = scene["images"]
    if cameras.ndim != 2 or cameras.shape[1] != CAMERA_ROW:
        unit.skipped.append((name, f"cameras must be [N, {CAMERA_ROW}], got {list(cameras.shape)}"))
        return unit
    if not isinstance(images, (list, tuple)) or len(images) != len(cameras):
        count = len(images) if isinstance(images, (list, tuple)) else type(images).__name__
        unit.skipped.append((name, f"{len(cameras)} cameras but {count} images"))
        return unit
    frames = []
    for i, (row, image) in enumerate(zip(cameras, images)):
        what = f"{name}/{i}"
        try:
            data = _as_bytes(image)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
        except Exception as err:
            unit.skipped.append((what, f"unreadable image ({type(err).__name__}: {err})"))
            continue
        K, c2w = re10k_camera(row, width, height)
        if c2w is None or not np.all(np.isfinite(K)):
            unit.skipped.append((what, "camera row is not finite or its world-to-camera matrix is not rigid"))
            continue
        frames.append((what, data, K, c2w))
    meta = {"url": str(scene.get("url", ""))}
    if "timestamps" in scene:
        meta["timestamps"] = [int(t) for t in np.asarray(scene["timestamps"]).reshape(-1)]
    return scene_record(name, frames, "re10k", opts, unit, meta=meta)


def _chunk_unit(args: tuple[tuple[str, str], dict[str, Any]]) -> Unit:
    """One chunk file (path, id) into its scenes, in the chunk's order (a worker's job)."""
    (path, name), opts = args
    unit = Unit()
    try:
        scenes = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        unit.skipped.append((name, f"unreadable chunk ({type(err).__name__}: {str(err).splitlines()[0][:200]})"))
        return unit
    if not isinstance(scenes, (list, tuple)):
        unit.skipped.append((name, f"a chunk must hold a list of scene dicts, got {type(scenes).__name__}"))
        return unit
    for i, scene in enumerate(scenes):
        unit.absorb(_scene_unit(scene, f"{name}[{i}]", opts))
    return unit


def convert_re10k(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    scenes: SceneOptions | None = None,
    run: RunOptions | None = None,
) -> ConvertReport:
    """Convert pixelSplat's RealEstate10K/ACID ``.torch`` chunks (a chunk or a folder of them, searched
    recursively) into posed multi-view shards in ``out``, as shards ``split-*.tar``, with the sizes of ``scenes``
    (``max_views`` subsamples, so that view indices no longer match an evaluation index), run as ``run`` says
    (resumable, by parts)."""
    inputs = [(name, (str(path), name)) for path, name in list_files(Path(src), ".torch", "pixelSplat chunks")]
    return convert_scenes("re10k", inputs, _chunk_unit, out, split, scenes, run)
