"""LVSM's and RayZer's per-scene JSON into posed multi-view shards: ``selfsup3d data convert lvsm``.

Two schemas exist (the scene's frames decide which; a file mixing them is refused):

* **LVSM** (its ``preprocess_data.py``): ``{"scene_name", "frames": [{"image_path", "fxfycxcy": [fx, fy, cx, cy],
  "w2c": 4x4}]}``, intrinsics in pixels of the image file;
* **RayZer / E-RayZer** (their DL3DV lists): ``{"frames": [{"file_path", "w", "h", "fx", "fy", "cx", "cy",
  "w2c"}]}``, intrinsics in pixels of a ``w x h`` image, rescaled to the file's size.

``w2c`` is world-to-camera with OpenCV axes (``4x4``, or ``3x4``); the shard gets its inverse. Image paths are
absolute, or relative to the JSON's folder or to its parent (LVSM's ``metadata/`` beside ``images/``). The scene's
name is ``scene_name`` or the file's stem. Frames keep the JSON's order (capture order), so view ``i`` is frame
``i`` of the scene, as LVSM's evaluation index counts.

``SRC`` is LVSM's ``full_list.txt`` (one JSON path a line, relative to the list's folder), a folder searched
recursively for ``*.json`` or one JSON. One job per scene (resumable, ``--part i/n``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfsup3d.datamodules.prepare.frames import list_files, read_frames_json, rigid_inverse, scale_K, scene_record
from selfsup3d.datamodules.prepare.journal import RunOptions, SceneOptions, convert_scenes
from selfsup3d.datamodules.prepare.writer import ConvertReport, Unit

SCHEMAS = {"lvsm": ("image_path", "fxfycxcy", "w2c"), "rayzer": ("file_path", "fx", "fy", "cx", "cy", "w2c")}
"""The fields a frame of each schema has."""


def frame_schema(frame: Any) -> str:
    """``lvsm`` or ``rayzer``: the schema of one frame dict.

    Raises:
        ValueError: a frame of neither schema, naming the fields it lacks.
    """
    if not isinstance(frame, dict):
        raise ValueError(f"a frame must be a dict, got {type(frame).__name__}")
    for schema, fields in SCHEMAS.items():
        if all(f in frame for f in fields):
            return schema
    lacks = {s: [f for f in fields if f not in frame] for s, fields in SCHEMAS.items()}
    raise ValueError(
        "unknown schema: a frame needs image_path, fxfycxcy, w2c (LVSM) or file_path, fx, fy, cx, cy, w2c "
        f"(RayZer); this one lacks {lacks['lvsm']} (LVSM) and {lacks['rayzer']} (RayZer)"
    )


def lvsm_camera(frame: dict[str, Any], schema: str, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``(K, c2w)`` of one frame for its image file of ``width x height`` pixels.

    Raises:
        ValueError: malformed intrinsics or ``w2c`` (wrong shape, not finite, not rigid).
    """
    if schema == "lvsm":
        values = np.asarray(frame["fxfycxcy"], dtype=np.float64)
        if values.shape != (4,):
            raise ValueError(f"fxfycxcy must hold 4 numbers, got shape {list(values.shape)}")
        fx, fy, cx, cy = values
        sx = sy = 1.0
    else:
        fx, fy, cx, cy = (float(frame[k]) for k in ("fx", "fy", "cx", "cy"))
        sx, sy = width / float(frame.get("w", width)), height / float(frame.get("h", height))
    K = scale_K(np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64), sx, sy)
    if not np.all(np.isfinite(K)) or fx <= 0 or fy <= 0:
        raise ValueError(f"intrinsics must be finite with fx, fy > 0, got {[fx, fy, cx, cy]}")
    w2c = np.asarray(frame["w2c"], dtype=np.float64)
    if w2c.shape not in ((4, 4), (3, 4)):
        raise ValueError(f"w2c must be 4x4 or 3x4, got shape {list(w2c.shape)}")
    c2w = rigid_inverse(w2c)
    if c2w is None:
        raise ValueError("w2c is not a rigid transform (finite, orthonormal rotation with det +1)")
    return K, c2w


def find_image(json_path: Path, relative: str) -> Path | None:
    """The image a frame names: absolute, or relative to the JSON's folder or to its parent."""
    path = Path(relative)
    candidates = [path] if path.is_absolute() else [json_path.parent / path, json_path.parent.parent / path]
    return next((c for c in candidates if c.is_file()), None)


def _lvsm_unit(args: tuple[tuple[str, str], dict[str, Any]]) -> Unit:
    """One scene JSON (path, id) into a unit (a worker's job)."""
    (path, name), opts = args
    json_path = Path(path)
    unit = Unit()
    try:
        spec = read_frames_json(json_path)
    except ValueError as err:
        unit.skipped.append((name, str(err)))
        return unit
    try:
        schemas = {frame_schema(frame) for frame in spec["frames"]}
    except ValueError as err:
        unit.skipped.append((name, str(err)))
        return unit
    if len(schemas) > 1:
        unit.skipped.append((name, "frames of both schemas (LVSM image_path and RayZer file_path) in one scene"))
        return unit
    schema = schemas.pop()
    scene = str(spec.get("scene_name") or json_path.stem)
    frames = []
    for i, frame in enumerate(spec["frames"]):
        relative = str(frame["image_path" if schema == "lvsm" else "file_path"])
        what = f"{scene}/{i}"
        image = find_image(json_path, relative)
        if image is None:
            unit.skipped.append((what, f"image not found: {relative}"))
            continue
        try:
            with Image.open(image) as im:
                width, height = im.size
            K, c2w = lvsm_camera(frame, schema, width, height)
        except Exception as err:
            unit.skipped.append((what, f"{type(err).__name__}: {err}"))
            continue
        frames.append((what, image, K, c2w))
    return scene_record(scene, frames, "lvsm", opts, unit, meta={"schema": schema})


def list_scenes(src: Path) -> list[tuple[Path, str]]:
    """``(json path, id)`` of the scenes of ``src``: ``full_list.txt`` (or any ``.txt`` list), a folder or a JSON.

    Raises:
        FileNotFoundError: nothing there, an empty list, or a listed file that does not exist.
    """
    if src.is_file() and src.suffix.lower() == ".txt":
        entries = [line.strip() for line in src.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not entries:
            raise FileNotFoundError(f"{src} lists no scene JSON")
        paths = [Path(e) if Path(e).is_absolute() else src.parent / e for e in entries]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{src} lists {len(missing)} JSON file(s) that do not exist, e.g. {missing[0]}")
        return list(zip(paths, entries))
    return list_files(src, ".json", "scene JSON files")


def convert_lvsm(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    scenes: SceneOptions | None = None,
    run: RunOptions | None = None,
) -> ConvertReport:
    """Convert LVSM's or RayZer's per-scene JSON (``full_list.txt``, a folder of JSON files or one) with their
    images into posed multi-view shards (the other arguments as
    :func:`~selfsup3d.datamodules.prepare.re10k.convert_re10k`'s)."""
    inputs = [(name, (str(path), name)) for path, name in list_scenes(Path(src))]
    return convert_scenes("lvsm", inputs, _lvsm_unit, out, split, scenes, run)
