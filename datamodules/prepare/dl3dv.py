"""DL3DV scenes (nerfstudio ``transforms.json`` with their images) into posed multi-view shards: ``selfsup3d data
convert dl3dv``.

``transforms.json`` (DL3DV-10K's ``process_one_scene`` writes it, the 140-scene benchmark ships it as
``nerfstudio/transforms.json`` beside ``images_4/``) gives one camera for the scene: ``w``, ``h``, ``fl_x``,
``fl_y``, ``cx``, ``cy`` (pixels of a ``w x h`` image), lens distortion ``k1 k2 p1 p2`` (and ``k3``), and per frame
``file_path`` and ``transform_matrix``, a camera-to-world matrix with **OpenGL camera axes** (x right, y up,
z backward) in a world that nerfstudio rotated by ``applied_transform`` (``3x4``) from COLMAP's:

* intrinsics are rescaled to the image files actually present (``--images images_4``: the folder the frames'
  ``images/...`` paths are read from; the scene's ``w``, ``h`` are the full resolution);
* lens distortion is **undone** (kornia's ``undistort_image``, bilinear, keeping the same ``K``; pixels whose
  source falls outside the image are black): the shard's views are pinhole images;
* ``c2w`` becomes OpenCV's (``c2w @ diag(1, -1, -1, 1)``), and the world is taken back to COLMAP's by the inverse
  of ``applied_transform``, which is **read and checked**, not assumed: DL3DV's (older nerfstudio: x and y swapped,
  z negated), current nerfstudio's (y and z swapped, the new z negated) or any other rigid one are undone alike and
  named in ``meta.json`` (``applied_transform``); a non-rigid one refuses the scene. Without one the world is
  kept as written (noted).

``SRC`` is a scene (a folder with ``transforms.json`` or ``nerfstudio/transforms.json``) or a folder of scenes
(searched recursively). One job per scene (resumable, ``--part i/n``). DL3DV has no depth.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfsup3d.datamodules.prepare.blender import GL_TO_CV
from selfsup3d.datamodules.prepare.frames import (
    capture_order_key,
    orthonormal,
    read_frames_json,
    scale_K,
    scene_record,
)
from selfsup3d.datamodules.prepare.journal import RunOptions, SceneOptions, convert_scenes
from selfsup3d.datamodules.prepare.writer import ConvertReport, Unit

APPLIED_TRANSFORMS = {
    "dl3dv": np.array([[0.0, 1, 0], [1, 0, 0], [0, 0, -1]]),
    "nerfstudio": np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]),
}
"""The rotations of ``applied_transform`` known by name: DL3DV's (the older nerfstudio convention) and the one current
nerfstudio writes."""
DISTORTION = ("k1", "k2", "p1", "p2", "k3")
"""Lens distortion coefficients read, in OpenCV's (and kornia's) order."""
SUPPORTED_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL")


def applied_world(spec: dict[str, Any]) -> tuple[np.ndarray, str]:
    """``(4x4 transform, name)``: the world transform nerfstudio applied (identity and ``none`` without one).

    Raises:
        ValueError: ``applied_transform`` is not ``3x4`` or ``4x4``, or not a rigid transform.
    """
    if "applied_transform" not in spec:
        return np.eye(4), "none"
    matrix = np.asarray(spec["applied_transform"], dtype=np.float64)
    if matrix.shape not in ((3, 4), (4, 4)):
        raise ValueError(f"applied_transform must be 3x4 or 4x4, got shape {list(matrix.shape)}")
    rigid = orthonormal(matrix, tol=1e-5)
    if rigid is None:
        raise ValueError("applied_transform is not a rigid transform (orthonormal rotation with det +1)")
    name = next((n for n, rot in APPLIED_TRANSFORMS.items() if np.allclose(rigid[:3, :3], rot, atol=1e-6)), "other")
    return rigid, name


def dl3dv_intrinsics(spec: dict[str, Any], width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """``(K, distortion k1 k2 p1 p2 k3)`` of the scene's camera at the image files' size ``width x height``.

    Raises:
        ValueError: a missing field or an unsupported camera model.
    """
    model = str(spec.get("camera_model", "OPENCV"))
    if model not in SUPPORTED_MODELS:
        raise ValueError(f"camera_model {model} is not supported ({', '.join(SUPPORTED_MODELS)})")
    missing = [k for k in ("w", "h", "fl_x", "fl_y", "cx", "cy") if k not in spec]
    if missing:
        raise ValueError(f"transforms.json lacks {', '.join(missing)}")
    fx, fy, cx, cy, w, h = (float(spec[k]) for k in ("fl_x", "fl_y", "cx", "cy", "w", "h"))
    K = scale_K(np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]]), width / w, height / h)
    return K, np.array([float(spec.get(k, 0.0) or 0.0) for k in DISTORTION])


def undistortion_map(K: np.ndarray, distortion: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Where each pixel centre of the pinhole camera ``K`` (pixel centres at +0.5) lies in the image of the same
    camera with OpenCV distortion ``k1 k2 p1 p2 k3``: ``[H, W, 2]`` pixel indices (kornia's ``distort_points``)."""
    from kornia.geometry.calibration import distort_points

    width, height = size
    K_index = np.array(K, dtype=np.float64)
    K_index[:2, 2] -= 0.5  # kornia puts pixel (j, i) at (j, i); the shard format at (j + 0.5, i + 0.5)
    v, u = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                          indexing="ij")  # fmt: skip
    points = torch.stack([u, v], -1).reshape(-1, 2)
    return distort_points(points, torch.from_numpy(K_index), torch.from_numpy(distortion)).reshape(height, width, 2)


def undistort(rgb: np.ndarray, where: torch.Tensor) -> np.ndarray:
    """``rgb`` ``[H, W, 3]`` uint8 resampled (bilinear, kornia's ``remap``) at :func:`undistortion_map`'s ``where``:
    the pinhole image (black where the source is outside the image)."""
    from kornia.geometry.transform import remap

    image = torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)[None].float()
    out = remap(image, where[None, ..., 0].float(), where[None, ..., 1].float(), align_corners=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def frame_image(scene: Path, file_path: str, images: str | None) -> Path:
    """The image file a frame names (``images/frame_00001.png``), read from the folder ``images`` instead of the
    path's first folder when given (``images_4``)."""
    parts = Path(file_path).parts
    if images and len(parts) > 1:
        return scene / images / Path(*parts[1:])
    return scene / file_path


def _dl3dv_unit(args: tuple[tuple[str, str], dict[str, Any]]) -> Unit:
    """One scene (its ``transforms.json``) into a unit (a worker's job), on one thread: the workers are the
    parallelism (torch's threads would fight over the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _scene_unit(args)
    finally:
        torch.set_num_threads(threads)


def _scene_unit(args: tuple[tuple[str, str], dict[str, Any]]) -> Unit:
    (path, name), opts = args
    transforms = Path(path)
    unit = Unit()
    try:
        spec = read_frames_json(transforms)
        applied, convention = applied_world(spec)
    except ValueError as err:
        unit.skipped.append((name, f"{type(err).__name__}: {err}"))
        return unit
    if convention == "none":
        unit.notes.append((name, "no applied_transform: the world is kept as transforms.json gives it"))
    to_colmap = np.linalg.inv(applied)
    frames = []
    maps: dict[tuple[Any, ...], torch.Tensor] = {}
    distorted = False
    for i, frame in enumerate(sorted(spec["frames"], key=lambda f: capture_order_key(str(f.get("file_path", ""))))):
        what = f"{name}/{frame.get('file_path', i)}"
        try:
            image_path = frame_image(transforms.parent, str(frame["file_path"]), opts["images"])
            gl = np.asarray(frame["transform_matrix"], dtype=np.float64)
            if gl.shape != (4, 4):
                raise ValueError(f"transform_matrix must be 4x4, got shape {list(gl.shape)}")
            c2w = orthonormal(to_colmap @ gl @ GL_TO_CV)
            if c2w is None:
                raise ValueError("transform_matrix is not a rigid transform")
            if not image_path.is_file():
                raise FileNotFoundError(f"image not found: {image_path.relative_to(transforms.parent)}")
            with Image.open(image_path) as im:
                K, distortion = dl3dv_intrinsics({**spec, **frame}, *im.size)
                source: Any = image_path
                if np.any(distortion != 0):
                    camera = (im.size, K.tobytes(), distortion.tobytes())
                    if camera not in maps:  # one map per camera: a scene's frames share it
                        maps[camera] = undistortion_map(K, distortion, im.size)
                    source = undistort(np.asarray(im.convert("RGB")), maps[camera])
                    distorted = True
        except (KeyError, OSError, ValueError) as err:
            unit.skipped.append((what, f"{type(err).__name__}: {err}"))
            continue
        frames.append((what, source, K, c2w))
    if distorted:
        unit.notes.append((name, "lens distortion undone (pinhole views, same K)"))
    return scene_record(name, frames, "dl3dv", opts, unit, meta={"applied_transform": convention})


def list_dl3dv_scenes(src: Path) -> list[tuple[Path, str]]:
    """``(transforms.json, scene id)`` of ``src``: a scene or a folder of scenes (recursive), sorted.

    Raises:
        FileNotFoundError: no ``transforms.json`` under ``src``.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    found = sorted(src.rglob("transforms.json"), key=lambda p: capture_order_key(str(p.relative_to(src))))
    if not found:
        raise FileNotFoundError(f"{src} holds no transforms.json (nerfstudio), neither itself nor below")
    out = []
    for path in found:
        scene = path.parent.parent if path.parent.name == "nerfstudio" else path.parent
        name = str(scene.relative_to(src)) if scene != src else src.resolve().name
        out.append((path, name))
    return out


def convert_dl3dv(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    images: str | None = None,
    scenes: SceneOptions | None = None,
    run: RunOptions | None = None,
) -> ConvertReport:
    """Convert DL3DV scenes (a scene folder with nerfstudio's ``transforms.json``, or a folder of them) into posed,
    undistorted multi-view shards; ``images``: the image folder the frames are read from instead of the first
    folder of their ``file_path`` (``images_4`` for DL3DV's 960x540 images; ``None``: as ``file_path`` says). The
    other arguments as :func:`~selfsup3d.datamodules.prepare.re10k.convert_re10k`'s."""
    inputs = [(name, (str(path), name)) for path, name in list_dl3dv_scenes(Path(src))]
    return convert_scenes("dl3dv", inputs, _dl3dv_unit, out, split, scenes, run, {"images": images})
