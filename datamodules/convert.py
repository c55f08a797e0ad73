"""Converters from formats users have to selfsup3d shards (``docs/shard-format.md``).

* **Blender / NeRF** (``transforms*.json``): OpenGL camera-to-world matrices (x right, y up, z backward)
  become OpenCV ones (``c2w @ diag(1, -1, -1, 1)``); intrinsics from ``camera_angle_x`` (and
  ``camera_angle_y``) or ``fl_x``/``fl_y``/``cx``/``cy`` (also per frame), scaled when ``w``/``h`` differ
  from the image files; all ``transforms_*.json`` of a scene (train/val/test) are merged into one scene.
  RGBA images are composited over the ``background`` colour and their alpha becomes the mask.
* **COLMAP** text model (``cameras.txt``, ``images.txt`` in ``sparse/0/``, ``sparse/`` or the scene folder)
  with its ``images/`` folder: world-to-camera quaternions and translations are inverted into ``c2w``
  (COLMAP cameras already use OpenCV axes and pixel centres at +0.5, like the shard format). Models
  SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL and OPENCV are read; lens distortion is **ignored with a
  warning** by default (the pinhole part is kept), or the views are refused with ``refuse_distortion``.
* **Image folder** (single-view): class = first-level sub-folder name (like torchvision's ImageFolder),
  sorted names give the indices; images directly in a folder without sub-folders get label -1.

Views keep their capture order, so that a video's frames stay neighbours (the view-overlap curriculum of
:class:`~selfsup3d.datamodules.MultiViewShards` picks windows of consecutive views): Blender frames in the
order of their ``frames`` lists, COLMAP images by file name in natural order (``frame_2`` before
``frame_10``, :func:`capture_order_key`); ``max_views`` subsampling keeps every ``n / max_views``-th view.

Each converter takes one scene or a folder of scenes, shows a progress bar, and returns a
:class:`ConvertReport` whose :meth:`~ConvertReport.summary` says what was written and what was skipped
and why. Encoded images are copied unchanged when they need no change (JPEG/PNG/WebP, RGB, not resized).
"""

from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

from selfsup3d.datamodules.format import (
    EncodedImage,
    ImageSample,
    Scene,
    ShardSink,
    encode_image_sample,
    encode_scene,
    make_key,
)

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
_PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# ============================================================================ reporting
@dataclass
class ConvertReport:
    """What a conversion wrote and skipped (``skipped``: ``(what, why)``; ``notes``: ``(what, note)``)."""

    kind: str
    out: str
    split: str
    written: int = 0
    views: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""
    shards: int = 0
    class_names: list[str] | None = None

    def summary(self, limit: int = 20) -> str:
        """Human-readable summary: written samples and shards, skipped items with reasons, notes."""
        unit = "samples" if self.kind == "images" else "scenes"
        lines = [f"wrote {self.written} {unit}" + (f" ({self.views} views)" if self.kind != "images" else "")]
        lines[0] += f" to {self.shards} shard(s): {self.url}" if self.shards else " (no shards written)"
        if self.class_names is not None:
            lines.append(
                f"{len(self.class_names)} classes: {', '.join(self.class_names[:10])}"
                + (", ..." if len(self.class_names) > 10 else "")
            )
        for title, items in (("skipped", self.skipped), ("notes", self.notes)):
            if not items:
                continue
            lines.append(f"{title}: {len(items)}")
            for what, why in items[:limit]:
                lines.append(f"  {what}: {why}")
            if len(items) > limit:
                counts = Counter(_reason_kind(why) for _, why in items[limit:])
                lines.append(
                    f"  ... and {len(items) - limit} more: " + "; ".join(f"{n} x {r}" for r, n in counts.items())
                )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "written": self.written,
            "views": self.views,
            "shards": self.shards,
            "url": self.url,
            "skipped": len(self.skipped),
            "class_names": self.class_names,
        }


def _reason_kind(why: str) -> str:
    return why.split(":")[0].split("(")[0].strip()


@dataclass
class _Unit:
    """One scene or image's result from a worker: a ShardWriter record (or None) plus what was skipped."""

    record: dict[str, Any] | None
    views: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


# ============================================================================ images
def _load_image(path: Path) -> tuple[Image.Image, bytes]:
    data = path.read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image, data


def _alpha(image: Image.Image) -> np.ndarray | None:
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return np.asarray(image.convert("RGBA"))[..., 3]
    return None


def _rgb_and_mask(image: Image.Image, background: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
    """RGB array (alpha composited over ``background``) and the alpha mask (``None`` without alpha)."""
    alpha = _alpha(image)
    if alpha is None:
        return np.asarray(image.convert("RGB"), dtype=np.uint8), None
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
    a = rgba[..., 3:4] / 255.0
    rgb = rgba[..., :3] * a + np.asarray(background, np.float32) * (1 - a)
    return rgb.round().clip(0, 255).astype(np.uint8), alpha > 127


def _fit_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    w, h = size
    if not max_size or max(w, h) <= max_size:
        return w, h
    s = max_size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _prepare_image(
    image: Image.Image, data: bytes, target: tuple[int, int], background: tuple[int, int, int]
) -> tuple[np.ndarray | EncodedImage, np.ndarray | None]:
    """The image for the writer (original bytes when nothing changes) and its alpha mask, at ``target``."""
    alpha = _alpha(image)
    if alpha is None and image.size == target and image.format in _PASSTHROUGH_FORMATS and image.mode == "RGB":
        return EncodedImage(data, _PASSTHROUGH_FORMATS[image.format]), None
    rgb, mask = _rgb_and_mask(image, background)
    if image.size != target:
        rgb = np.asarray(Image.fromarray(rgb).resize(target, Image.Resampling.LANCZOS))
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(target, Image.Resampling.NEAREST)) > 0
    return rgb, mask


def _scale_K(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Intrinsics of an image resized by ``(sx, sy)`` (pixel centres at +0.5: exact)."""
    out = np.array(K, dtype=np.float64)
    out[0] *= sx
    out[1] *= sy
    return out


def _orthonormal(c2w: np.ndarray, tol: float = 1e-3) -> np.ndarray | None:
    """``c2w`` with its rotation snapped to the nearest rotation, or ``None`` when it is not one (scaled,
    sheared or reflected beyond ``tol``)."""
    rot = c2w[:3, :3]
    if not np.all(np.isfinite(c2w)) or np.abs(rot @ rot.T - np.eye(3)).max() > tol or np.linalg.det(rot) < 0:
        return None
    u, _, vt = np.linalg.svd(rot)
    out = np.array(c2w, dtype=np.float64)
    out[:3, :3] = u @ vt
    out[3] = [0, 0, 0, 1]
    return out


def capture_order_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of an image file name in natural order: digit runs compare as numbers (``frame_2`` before
    ``frame_10``), the rest as lower-case text, so that numbered video frames sort in capture order."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in parts if p)


def _subsample(n: int, max_views: int | None) -> list[int]:
    if not max_views or n <= max_views:
        return list(range(n))
    return [(i * n) // max_views for i in range(max_views)]


def _scene_record(
    name: str,
    frames: list[tuple[str, Path, np.ndarray, np.ndarray]],
    source: str,
    max_size: int | None,
    max_views: int | None,
    min_views: int,
    background: tuple[int, int, int],
    image_format: str,
    unit: _Unit,
) -> _Unit:
    """Load the frames ``(what, path, K, c2w)`` of one scene, keep those of the first frame's size, resize,
    and encode the scene (or skip it when fewer than ``min_views`` remain)."""
    loaded: list[tuple[str, Image.Image, bytes, np.ndarray, np.ndarray]] = []
    for what, path, K, c2w in frames:
        try:
            image, data = _load_image(path)
        except Exception as err:
            unit.skipped.append((what, f"unreadable image {path.name} ({type(err).__name__}: {err})"))
            continue
        loaded.append((what, image, data, K, c2w))
    if not loaded:
        unit.skipped.append((name, "scene skipped: no usable views"))
        return unit
    size = Counter(im.size for _, im, _, _, _ in loaded).most_common(1)[0][0]
    kept = []
    for item in loaded:
        if item[1].size != size:
            w, h = item[1].size
            unit.skipped.append((item[0], f"image is {w}x{h}, the scene's are {size[0]}x{size[1]}"))
        else:
            kept.append(item)
    kept = [kept[i] for i in _subsample(len(kept), max_views)]
    if len(kept) < min_views:
        unit.skipped.append((name, f"scene skipped: {len(kept)} usable view(s), fewer than {min_views}"))
        return unit
    target = _fit_size(size, max_size)
    images, masks, Ks, c2ws = [], [], [], []
    for _, image, data, K, c2w in kept:
        prepared, mask = _prepare_image(image, data, target, background)
        images.append(prepared)
        masks.append(mask)
        Ks.append(_scale_K(K, target[0] / size[0], target[1] / size[1]))
        c2ws.append(c2w)
    has_masks = all(m is not None for m in masks)
    if any(m is not None for m in masks) and not has_masks:
        unit.notes.append((name, "only some views have alpha: masks left out"))
    key = make_key(name)
    scene = Scene(
        key=key,
        images=images,
        K=np.stack(Ks),
        c2w=np.stack(c2ws),
        masks=masks if has_masks else None,  # type: ignore[arg-type]
        meta={"source": source, "scene_id": name, "label": -1},
    )
    try:
        unit.record = encode_scene(scene, image_format)
    except ValueError as err:
        unit.skipped.append((name, f"scene skipped: {err}"))
        return unit
    unit.views = len(images)
    return unit


# ============================================================================ Blender / NeRF
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
    return _scale_K(K, width / w_ref, height / h_ref)


_BLENDER_CAMERA_KEYS = ("camera_angle_x", "camera_angle_y", "fl_x", "fl_y", "cx", "cy", "w", "h")
_DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")


def _blender_unit(args: tuple[Path, str, dict[str, Any]]) -> _Unit:
    scene_dir, name, opts = args
    unit = _Unit(None)
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
            c2w = _orthonormal(gl @ GL_TO_CV)
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
    return _scene_record(
        name,
        frames,
        "blender",
        opts["max_size"],
        opts["max_views"],
        opts["min_views"],
        opts["background"],
        opts["image_format"],
        unit,
    )


# ============================================================================ COLMAP
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


def _colmap_unit(args: tuple[Path, str, dict[str, Any]]) -> _Unit:
    scene_dir, name, opts = args
    unit = _Unit(None)
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
        records = parse_colmap_images((model_dir / "images.txt").read_text())
    except (OSError, ValueError, IndexError) as err:
        unit.skipped.append((name, f"unreadable COLMAP model ({type(err).__name__}: {err})"))
        return unit
    frames: list[tuple[str, Path, np.ndarray, np.ndarray]] = []
    distorted = 0
    for _, qvec, tvec, camera_id, image_name in sorted(records, key=lambda r: capture_order_key(r[4])):
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
        K = _scale_K(K, actual[0] / width, actual[1] / height)  # e.g. a downscaled image folder
        rot = quaternion_to_rotation(qvec)
        c2w = np.eye(4)
        c2w[:3, :3] = rot.T
        c2w[:3, 3] = -rot.T @ tvec
        frames.append((what, path, K, c2w))
    if distorted:
        unit.notes.append(
            (
                name,
                f"{distorted} view(s): lens distortion ignored (pinhole part kept); "
                "pass --refuse-distortion to skip them",
            )
        )
    return _scene_record(
        name,
        frames,
        "colmap",
        opts["max_size"],
        opts["max_views"],
        opts["min_views"],
        opts["background"],
        opts["image_format"],
        unit,
    )


# ============================================================================ image folder
def _image_unit(args: tuple[Path, str, int, str | None, dict[str, Any]]) -> _Unit:
    path, key, label, class_name, opts = args
    unit = _Unit(None)
    try:
        image, data = _load_image(path)
        image = ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
        prepared, mask = _prepare_image(image, data, _fit_size(image.size, opts["max_size"]), opts["background"])
        meta = {"source": "images", "path": opts["relative"](path)}
        if class_name is not None:
            meta["class_name"] = class_name
        unit.record = encode_image_sample(
            ImageSample(key, prepared, mask=mask, label=label, meta=meta), opts["image_format"]
        )
        unit.views = 1
    except Exception as err:
        unit.skipped.append((opts["relative"](path), f"unreadable image ({type(err).__name__}: {err})"))
    return unit


# ============================================================================ driver
def _pool_map(
    fn: Callable[[Any], _Unit], jobs: Sequence[Any], workers: int | None, desc: str, progress: bool
) -> Iterable[_Unit]:
    workers = len(os.sched_getaffinity(0)) if workers is None else max(1, workers)
    bar = tqdm(total=len(jobs), desc=desc, unit="item", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
                bar.update()
        else:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers) as pool:
                for unit in pool.imap(fn, jobs, chunksize=1):
                    yield unit
                    bar.update()
    finally:
        bar.close()


def _write(units: Iterable[_Unit], report: ConvertReport, sink: ShardSink) -> ConvertReport:
    with sink:
        for unit in units:
            report.skipped.extend(unit.skipped)
            report.notes.extend(unit.notes)
            if unit.record is not None:
                sink.write(unit.record)
                report.written += 1
                report.views += unit.views
    report.shards = len(sink.shards)
    report.url = sink.url if report.shards else ""
    _update_info(Path(report.out), report)
    return report


def _update_info(out: Path, report: ConvertReport) -> None:
    path = out / "info.json"
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        info = {}
    info.setdefault("format", "selfsup3d shards, see docs/shard-format.md")
    info.setdefault("splits", {})[report.split] = report.as_dict()
    path.write_text(json.dumps(info, indent=2))


def _scene_dirs(src: Path, is_scene: Callable[[Path], bool], what: str) -> list[Path]:
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is not a folder")
    if is_scene(src):
        return [src]
    scenes = sorted(p for p in src.iterdir() if p.is_dir() and is_scene(p))
    if not scenes:
        raise FileNotFoundError(f"{src} holds no {what}, neither itself nor in its sub-folders")
    return scenes


def _options(
    max_size: int | None, max_views: int | None, min_views: int, background: Sequence[int], image_format: str
) -> dict[str, Any]:
    if len(background) != 3 or not all(0 <= int(c) <= 255 for c in background):
        raise ValueError(f"background must be three values in 0..255, got {list(background)}")
    if max_size is not None and max_size < 8:
        raise ValueError(f"max_size must be >= 8, got {max_size}")
    return {
        "max_size": max_size,
        "max_views": max_views,
        "min_views": max(1, min_views),
        "background": tuple(int(c) for c in background),
        "image_format": image_format,
    }


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
    scenes = _scene_dirs(src_path, lambda p: bool(_blender_files(p)), "transforms*.json")
    opts = _options(max_size, max_views, min_views, background, image_format)
    jobs = [(d, d.name if d != src_path else src_path.resolve().name, opts) for d in scenes]
    report = ConvertReport("blender", str(out), split)
    sink = ShardSink(out, split, samples_per_shard=scenes_per_shard, image_format=image_format, overwrite=overwrite)
    return _write(_pool_map(_blender_unit, jobs, workers, "convert blender", progress), report, sink)


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

    scenes = _scene_dirs(src_path, is_scene, "COLMAP model (sparse/0/cameras.txt, images.txt)")
    opts = _options(max_size, max_views, min_views, (0, 0, 0), image_format)
    opts.update(images=images, refuse_distortion=refuse_distortion)
    report = ConvertReport("colmap", str(out), split)
    jobs = []
    for d in scenes:
        name = d.name if d != src_path else src_path.resolve().name
        if _colmap_model_dir(d) is None:
            binary = _colmap_binary_dir(d)
            hint = f"colmap model_converter --input_path {binary} --output_path {binary} --output_type TXT"
            report.skipped.append((name, f"binary COLMAP model only; convert it to text with `{hint}`"))
            continue
        jobs.append((d, name, opts))
    sink = ShardSink(out, split, samples_per_shard=scenes_per_shard, image_format=image_format, overwrite=overwrite)
    return _write(_pool_map(_colmap_unit, jobs, workers, "convert colmap", progress), report, sink)


def _hidden(relative: Path) -> bool:
    """Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are not part of a data set."""
    return any(part.startswith(".") for part in relative.parts)


def _unsupported(path: Path) -> str:
    """Why ``convert_images`` leaves a file out: its type (grouped by extension in the summary)."""
    kind = path.suffix.lower() or "without extension"
    if kind == ".gif":
        return ".gif file not converted (save the frames you want as PNG to include them)"
    return f"{kind} file not converted (not an image type it reads: {', '.join(sorted(IMAGE_SUFFIXES))})"


def convert_images(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    split: str = "train",
    samples_per_shard: int = 1000,
    max_size: int | None = None,
    background: Sequence[int] = (255, 255, 255),
    image_format: str = "jpg",
    shuffle: bool = True,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert an image folder into single-view shards (class = first-level sub-folder, like ImageFolder).

    Args:
        src: the folder; with sub-folders, each is a class (images found recursively inside it) and images
            directly in ``src`` are skipped; without sub-folders, its images get label -1. Files of other
            types (``.gif``, ``.txt``, ...) are listed in the report's ``skipped`` with their type; hidden files
            (``.DS_Store``) are ignored.
        out: output folder.
        split: shard name prefix.
        samples_per_shard: images per tar shard.
        max_size: downscale so the longer side is at most this.
        background: RGB that transparent pixels are composited over (their alpha becomes the mask).
        image_format: encoding of images that are re-encoded (JPEG/PNG/WebP RGB files are copied).
        shuffle: write the images in a random order (seeded), so shards mix classes.
        seed: seed of that order.
        workers: processes (all cores when ``None``).
        overwrite: replace existing shards of ``split``.
        progress: show a progress bar.
    """
    src_path = Path(src)
    if not src_path.is_dir():
        raise FileNotFoundError(f"{src_path} is not a folder")
    opts = _options(max_size, None, 1, background, image_format)
    opts["relative"] = _RelativeTo(src_path)
    report = ConvertReport("images", str(out), split)
    class_dirs = sorted(p for p in src_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int, str | None]] = []
    if class_dirs:
        report.class_names = [d.name for d in class_dirs]
        for label, d in enumerate(class_dirs):
            found = sorted(p for p in d.rglob("*") if p.is_file() and not _hidden(p.relative_to(src_path)))
            files.extend((p, label, d.name) for p in found if p.suffix.lower() in IMAGE_SUFFIXES)
            report.skipped.extend(
                (opts["relative"](p), _unsupported(p)) for p in found if p.suffix.lower() not in IMAGE_SUFFIXES
            )
        for p in sorted(src_path.iterdir()):
            if p.is_file() and not _hidden(Path(p.name)):
                report.skipped.append((p.name, "not in a class folder"))
    else:
        found = sorted(p for p in src_path.iterdir() if p.is_file() and not _hidden(Path(p.name)))
        files = [(p, -1, None) for p in found if p.suffix.lower() in IMAGE_SUFFIXES]
        report.skipped.extend((p.name, _unsupported(p)) for p in found if p.suffix.lower() not in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{src_path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    if shuffle:
        random.Random(seed).shuffle(files)
    used: set[str] = set()
    jobs = []
    for path, label, class_name in files:
        key = base = make_key(str(path.relative_to(src_path).with_suffix("")))
        n = 1
        while key in used:
            n += 1
            key = f"{base}_{n}"
        used.add(key)
        jobs.append((path, key, label, class_name, opts))
    sink = ShardSink(out, split, samples_per_shard=samples_per_shard, image_format=image_format, overwrite=overwrite)
    return _write(_pool_map(_image_unit, jobs, workers, "convert images", progress), report, sink)


class _RelativeTo:
    """``path -> str(path relative to root)``, picklable for worker processes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


__all__ = [
    "COLMAP_MODELS",
    "ConvertReport",
    "colmap_pinhole",
    "convert_blender",
    "convert_colmap",
    "convert_images",
    "parse_colmap_cameras",
    "parse_colmap_images",
    "quaternion_to_rotation",
]
