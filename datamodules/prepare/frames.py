"""Image files of converted scenes and images: loading, alpha masks, resizing with the intrinsics, capture
order, and one multi-view scene encoded from its frames (shared by the Blender and COLMAP converters).

Encoded images are copied unchanged when they need no change (JPEG/PNG/WebP, RGB, not resized). Views keep
their capture order, so that a video's frames stay neighbours (the view-overlap curriculum of
:class:`~selfsup3d.datamodules.MultiViewShards` picks windows of consecutive views): file names sort in natural
order (``frame_2`` before ``frame_10``, :func:`capture_order_key`); ``max_views`` subsampling keeps every
``n / max_views``-th view.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from selfsup3d.datamodules.format import EncodedImage, Scene, eight_bit, encode_scene, make_key, png_bit_depth
from selfsup3d.datamodules.prepare.writer import Unit

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


_PASSTHROUGH_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


# ============================================================================ images
ImageSource = Path | bytes | np.ndarray
"""Where a view's image comes from: a file, its encoded bytes (a RE10K chunk's JPEG) or decoded RGB ``[H, W, 3]``
uint8 (an undistorted DL3DV view; always re-encoded)."""


def load_image(source: ImageSource) -> tuple[Image.Image, bytes]:
    """The image of ``source`` and its encoded bytes (``b""`` for an array: nothing to copy unchanged)."""
    if isinstance(source, np.ndarray):
        return Image.fromarray(np.ascontiguousarray(source, dtype=np.uint8)), b""
    data = source if isinstance(source, bytes) else source.read_bytes()
    image = Image.open(io.BytesIO(data))
    image.load()
    return image, data


def orthonormal(c2w: np.ndarray, tol: float = 1e-3) -> np.ndarray | None:
    """``c2w`` (``[4, 4]`` or ``[3, 4]``) with its rotation snapped to the nearest rotation, or ``None`` when it is
    not one (not finite, scaled, sheared or reflected beyond ``tol``)."""
    c2w = np.asarray(c2w, dtype=np.float64)
    if c2w.shape not in ((4, 4), (3, 4)) or not np.all(np.isfinite(c2w)):
        return None
    rot = c2w[:3, :3]
    if np.abs(rot @ rot.T - np.eye(3)).max() > tol or np.linalg.det(rot) < 0:
        return None
    u, _, vt = np.linalg.svd(rot)
    out = np.eye(4)
    out[:3, :4] = c2w[:3, :4]
    out[:3, :3] = u @ vt
    return out


def rigid_inverse(w2c: np.ndarray) -> np.ndarray | None:
    """The camera-to-world matrix of a world-to-camera ``[3, 4]`` or ``[4, 4]`` one (``None`` when it is not rigid)."""
    rigid = orthonormal(w2c)
    if rigid is None:
        return None
    c2w = np.eye(4)
    c2w[:3, :3] = rigid[:3, :3].T
    c2w[:3, 3] = -rigid[:3, :3].T @ rigid[:3, 3]
    return c2w


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


def fit_size(size: tuple[int, int], max_size: int | None) -> tuple[int, int]:
    w, h = size
    if not max_size or max(w, h) <= max_size:
        return w, h
    s = max_size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def prepare_image(
    image: Image.Image, data: bytes, target: tuple[int, int], background: tuple[int, int, int]
) -> tuple[np.ndarray | EncodedImage, np.ndarray | None]:
    """The image for the writer (original bytes when nothing changes: an 8-bit RGB file of a format shards hold)
    and its alpha mask, at ``target``. 16-bit greyscale is scaled to 8 bits (:func:`eight_bit`; ``ValueError`` for
    a mode whose range is not known); a 16-bit RGB PNG, which Pillow opens scaled, is re-encoded."""
    image = eight_bit(image)
    alpha = _alpha(image)
    if (
        alpha is None
        and image.size == target
        and image.format in _PASSTHROUGH_FORMATS
        and image.mode == "RGB"
        and png_bit_depth(data) in (None, 8)
    ):
        return EncodedImage(data, _PASSTHROUGH_FORMATS[image.format]), None
    rgb, mask = _rgb_and_mask(image, background)
    if image.size != target:
        rgb = np.asarray(Image.fromarray(rgb).resize(target, Image.Resampling.LANCZOS))
        if mask is not None:
            mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(target, Image.Resampling.NEAREST)) > 0
    return rgb, mask


def scale_K(K: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Intrinsics of an image resized by ``(sx, sy)`` (pixel centres at +0.5: exact)."""
    out = np.array(K, dtype=np.float64)
    out[0] *= sx
    out[1] *= sy
    return out


def capture_order_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of an image file name in natural order: digit runs compare as numbers (``frame_2`` before
    ``frame_10``), the rest as lower-case text, so that numbered video frames sort in capture order."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p)) if p.isdigit() else (1, p.lower()) for p in parts if p)


def list_files(src: Path, suffix: str, what: str) -> list[tuple[Path, str]]:
    """``(path, id)`` of ``src`` (a file) or of the ``*suffix`` files under the folder ``src`` in natural order.

    Raises:
        FileNotFoundError: ``src`` does not exist, or the folder holds no such file.
    """
    if src.is_file():
        return [(src, src.name)]
    if not src.is_dir():
        raise FileNotFoundError(f"{src} does not exist")
    found = sorted(src.rglob(f"*{suffix}"), key=lambda p: capture_order_key(str(p.relative_to(src))))
    if not found:
        raise FileNotFoundError(f"{src} holds no {what} (*{suffix})")
    return [(p, str(p.relative_to(src))) for p in found]


def read_frames_json(path: Path) -> dict[str, Any]:
    """A scene's JSON (``transforms.json``, an LVSM scene): an object with a non-empty ``frames`` list.

    Raises:
        ValueError: unreadable, not JSON, not an object, or no ``frames`` list.
    """
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"unreadable JSON ({type(err).__name__}: {err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("frames"), list) or not spec["frames"]:
        raise ValueError("no 'frames' list")
    return spec


def _subsample(n: int, max_views: int | None) -> list[int]:
    if not max_views or n <= max_views:
        return list(range(n))
    return [(i * n) // max_views for i in range(max_views)]


def scene_record(
    name: str,
    frames: list[tuple[str, ImageSource, np.ndarray, np.ndarray]],
    source: str,
    opts: Mapping[str, Any],
    unit: Unit,
    sparse: Mapping[str, np.ndarray] | None = None,
    depth: Mapping[str, np.ndarray] | None = None,
    meta: Mapping[str, Any] | None = None,
    key: str | None = None,
) -> Unit:
    """Load the frames ``(what, image, K, c2w)`` of one scene (``image``: an :data:`ImageSource`), keep those of
    the most common size, resize, and encode the scene (or skip it when fewer than ``min_views`` remain).
    ``opts``: the converter's options (:func:`~selfsup3d.datamodules.prepare.writer.converter_options`:
    ``max_size``, ``max_views``, ``min_views``, ``background``, ``image_format``). ``sparse``: per frame (by
    ``what``) the source's sparse points seen in it, ``[N, 3]`` rows ``(u, v, z)`` in the image file's pixels,
    written as the scene's ``sparse_depth.npy``. ``depth``: per frame (by ``what``) metric z-depth ``[H, W]`` at
    the image's size (0 = none), resized with the image (nearest neighbour); the scene has depth when every
    kept view has. ``meta``: more ``meta.json`` entries. ``key``: the sample key (a converter's
    :class:`~selfsup3d.datamodules.format.SampleKeys` keeps keys of one conversion distinct; default
    :func:`~selfsup3d.datamodules.format.make_key` of ``name``)."""
    max_size, max_views, min_views = opts["max_size"], opts["max_views"], opts["min_views"]
    background, image_format = opts["background"], opts["image_format"]
    loaded: list[tuple[str, Image.Image, bytes, np.ndarray, np.ndarray]] = []
    for what, path, K, c2w in frames:
        try:
            image, data = load_image(path)
            eight_bit(image)  # a mode whose range is not known is said here, as a skipped view
        except Exception as err:
            name = f" {path.name}" if isinstance(path, Path) else ""
            unit.skipped.append((what, f"unreadable image{name} ({type(err).__name__}: {err})"))
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
    target = fit_size(size, max_size)
    images, masks, Ks, c2ws, rows, depths = [], [], [], [], [], []
    sx, sy = target[0] / size[0], target[1] / size[1]
    for view, (what, image, data, K, c2w) in enumerate(kept):
        prepared, mask = prepare_image(image, data, target, background)
        images.append(prepared)
        masks.append(mask)
        Ks.append(scale_K(K, sx, sy))
        c2ws.append(c2w)
        uvz = np.asarray(sparse.get(what, np.zeros((0, 3))) if sparse is not None else np.zeros((0, 3)))
        rows.append(np.column_stack([np.full(len(uvz), view), uvz * [sx, sy, 1.0]]).reshape(-1, 4))
        z = None if depth is None else depth.get(what)
        if z is not None and z.shape != (size[1], size[0]):
            unit.notes.append((what, f"depth is {z.shape[1]}x{z.shape[0]}, the image {size[0]}x{size[1]}: left out"))
            z = None
        elif z is not None and target != size:
            z = np.asarray(Image.fromarray(z.astype(np.float32)).resize(target, Image.Resampling.NEAREST))
        depths.append(z)
    has_masks = all(m is not None for m in masks)
    if any(m is not None for m in masks) and not has_masks:
        unit.notes.append((name, "only some views have alpha: masks left out"))
    has_depth = depth is not None and all(z is not None for z in depths)
    if depth is not None and not has_depth:
        unit.notes.append((name, "only some views have depth: depth left out"))
    scene = Scene(
        key=key or make_key(name),
        images=images,
        K=np.stack(Ks),
        c2w=np.stack(c2ws),
        masks=masks if has_masks else None,  # type: ignore[arg-type]
        depth=depths if has_depth else None,  # type: ignore[arg-type]
        meta={"source": source, "scene_id": name, "label": -1, **(meta or {})},
        sparse_depth=np.concatenate(rows) if sparse is not None else None,
    )
    try:
        unit.record = encode_scene(scene, image_format)
    except ValueError as err:
        unit.skipped.append((name, f"scene skipped: {err}"))
        return unit
    unit.views = len(images)
    return unit
