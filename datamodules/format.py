"""The selfsup3d shard format: one module that every writer and every reader uses.

The format is specified in ``docs/shard-format.md``; this module is its executable form. Shards are
plain tar files read by WebDataset, which groups members by the part of the file name before the first
dot (the sample key, ``__key__``) and names each member by the rest (the field).

Multi-view sample (one scene, ``V`` views, ``NNN`` = view index with at least three digits)::

    KEY.000.png | KEY.000.jpg | KEY.000.webp   one RGB image per view, all of one size
    KEY.000.depth.png                          optional: 16-bit z-depth, metres = value * depth_scale, 0 = none
    KEY.000.mask.png                           optional: 8-bit foreground mask, 0 = background
    KEY.cameras.json                           optional (none: an unposed scene, e.g. from video): width, height,
                                               depth_scale, views[i].K (3x3), views[i].c2w (4x4)
    KEY.sparse_depth.npy                       optional: float32 [M, 4] rows (view, u, v, z), the source's sparse
                                               points (COLMAP's) as z-depth in the cameras' world units
    KEY.meta.json                              source, scene id, label (-1 = unknown), class_name, depth_kind,
                                               and depth_scale when the scene has depth but no cameras.json

Single-view sample::

    KEY.png | KEY.jpg | KEY.webp                the RGB image
    KEY.depth.png                              optional: 16-bit depth, value * meta.depth_scale
    KEY.mask.png                               optional: foreground mask
    KEY.cls                                    optional: class index as decimal text
    KEY.meta.json                              source, label, depth_scale, depth_kind ("metric" | "relative")

Camera conventions: ``c2w`` maps OpenCV camera coordinates (x right, y down, z forward) to world
coordinates; ``K`` is in pixels with the image's top-left corner at ``(0, 0)``, so the centre of pixel
``(row i, column j)`` is ``(u, v) = (j + 0.5, i + 0.5)`` and a centred principal point is ``(W/2, H/2)``.
Depth is z-depth along the optical axis (not distance along the ray).

Writers use :class:`ShardSink` with :class:`Scene` or :class:`ImageSample`; readers use
:func:`parse_scene` (views, size, cameras when present, depth scale), :func:`parse_cameras`,
:func:`view_indices`, :func:`decode_rgb`, :func:`decode_depth`, :func:`decode_mask`
and :func:`parse_meta`, which raise :class:`SampleError` naming the shard, the key and the field.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps

from selfsup3d.errors import require

FORMAT_NAME = "selfsup3d"
FORMAT_VERSION = 1

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
"""Image fields a reader accepts, in order of preference when a view has several."""
DEPTH_SUFFIX = "depth.png"
MASK_SUFFIX = "mask.png"
CAMERAS_FIELD = "cameras.json"
SPARSE_DEPTH_FIELD = "sparse_depth.npy"
META_FIELD = "meta.json"
DEPTH_KINDS = ("metric", "relative")
"""``metric``: z-depth in the scene's world units (metres for renders, the cameras' units for a COLMAP capture);
``relative``: monocular pseudo depth of unknown scale (normalised per image or per scene)."""
CLASS_FIELD = "cls"

DEPTH_MAX_UNITS = 65535
"""Largest value of a 16-bit depth PNG; 0 means "no depth"."""

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
_VIEW_RE = re.compile(r"^(\d{3,})\.(png|jpg|jpeg|webp)$")


# ============================================================================ errors
class SampleError(ValueError):
    """A sample that does not follow the format. The message names the shard, the key and the field."""

    def __init__(
        self, url: str | None, key: str | None = None, field_name: str | None = None, problem: str | None = None
    ) -> None:
        if problem is None:  # one argument: a finished message (how DataLoader re-raises a worker's error)
            self.url = self.key = self.field = None
            self.problem = str(url)
            super().__init__(str(url))
            return
        self.url, self.key, self.field, self.problem = url, key, field_name, problem
        where = f"shard {url or '?'}, sample {key or '?'}"
        if field_name:
            where += f", field {field_name}"
        super().__init__(f"{where}: {problem}")


# ============================================================================ keys
def make_key(*parts: object) -> str:
    """A valid sample key from ``parts``: joined by ``_``, letters with accents written without them (``café`` ->
    ``cafe``), other characters than ``[A-Za-z0-9_-]`` replaced by ``-`` (WebDataset splits member names at the
    first dot, so keys carry none). A name with nothing left (``写真/咖啡``) is named by a short hash of it
    (``u`` and 8 hex digits): distinct names keep distinct keys. Names that differ only in what was dropped meet
    in one key; :class:`SampleKeys` tells them apart."""
    text = "_".join(str(p) for p in parts if str(p) != "")
    if not text:
        raise ValueError(f"cannot make a sample key from {parts!r}")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    key = re.sub(r"[^A-Za-z0-9_\-]+", "-", ascii_text).strip("-")
    return key or "u" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


class SampleKeys:
    """Distinct sample keys for the names of one conversion: :func:`make_key` of each name, and for a name whose
    key an earlier name already has (``café`` and ``cafè``, ``a b`` and ``a-b``), that key with the next free
    counter (``cafe``, ``cafe_2``). No file is lost or merged."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def key(self, *parts: object) -> str:
        key = base = make_key(*parts)
        n = 1
        while key in self.used:
            n += 1
            key = f"{base}_{n}"
        self.used.add(key)
        return key


def check_key(key: str) -> None:
    """Raise ``ValueError`` unless ``key`` is a valid sample key (no dots, no spaces, not empty)."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or key.startswith("__"):
        raise ValueError(
            f"invalid sample key {key!r}: use letters, digits, '_' and '-' (no dots: WebDataset splits "
            "member names at the first dot); make_key() builds one"
        )


def view_field(index: int, suffix: str) -> str:
    """Field name of view ``index`` with ``suffix`` (``png``, ``depth.png``, ...): ``"003.png"``."""
    return f"{index:03d}.{suffix}"


# ============================================================================ encoding helpers
class EncodedImage(NamedTuple):
    """An already encoded image passed through unchanged (e.g. a JPEG from a COLMAP folder); 8-bit (a 16-bit PNG is
    refused when written: decode it with :func:`eight_bit` and pass the array)."""

    data: bytes
    ext: str


# ============================================================================ image modes and orientation
_SIXTEEN_BIT_GREY = ("I;16", "I;16B", "I;16L", "I;16N")


def eight_bit(image: Image.Image) -> Image.Image:
    """``image`` in a mode whose ``convert("RGB")``/``convert("RGBA")`` is faithful: 16-bit greyscale (``I;16``
    and its byte orders, and ``I`` with values in ``[0, 65535]``, which is how Pillow opens 16-bit greyscale in
    some formats) scaled to 8-bit ``L`` (``round(v / 257)``; Pillow's own conversion clips every value above 255
    to white). 16-bit RGB(A) PNGs are opened by Pillow already scaled to 8-bit. Other modes are returned as they
    are.

    Raises:
        ValueError: a mode whose range cannot be known (32-bit float ``F``, ``I`` with values beyond 16 bits),
            saying what to do.
    """
    if image.mode in _SIXTEEN_BIT_GREY or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low < 0 or high > 65535:
            raise ValueError(
                f"a 32-bit integer greyscale image with values in [{low:g}, {high:g}]: its range is not that of an "
                "8- or 16-bit image; save it as an 8-bit image (or 16-bit, values in [0, 65535])"
            )
        return Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L")
    if image.mode == "F":
        raise ValueError("a 32-bit floating-point image: its range is not known; save it as an 8-bit (or 16-bit) image")
    return image


_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transpose that shows the image upright (as ``PIL.ImageOps.exif_transpose``)."""


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation (1: stored upright; 2-8: mirrored and/or rotated)."""
    try:
        value = int(image.getexif().get(0x0112, 1))
    except Exception:  # a damaged EXIF block: read the pixels as stored
        return 1
    return value if value in _TURNS else 1


def turn(image: Image.Image, how: int) -> Image.Image:
    """``image`` (an image, its depth or its mask) turned as the EXIF orientation ``how`` says."""
    return image.transpose(_TURNS[how]) if how in _TURNS else image


def upright(image: Image.Image) -> Image.Image:
    """``image`` turned as its EXIF orientation says (as image viewers show it), or itself when stored upright."""
    return ImageOps.exif_transpose(image) if orientation(image) != 1 else image


def png_bit_depth(data: bytes) -> int | None:
    """Bits per channel of PNG bytes (their header), or ``None`` for another format."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) > 24:
        return data[24]
    return None


def _image_ext(fmt: str) -> str:
    fmt = fmt.lower()
    require(fmt in IMAGE_EXTENSIONS, "image format", f"one of {IMAGE_EXTENSIONS}", fmt, ValueError)
    return "jpg" if fmt == "jpeg" else fmt


def encode_rgb(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """Encode an ``[H, W, 3]`` uint8 RGB array as ``png``, ``jpg`` or ``webp`` bytes."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"an image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
    buf = io.BytesIO()
    ext = _image_ext(fmt)
    pil_format = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext]
    kwargs: dict[str, Any] = {"compress_level": 1} if ext == "png" else {"quality": quality}
    Image.fromarray(image, mode="RGB").save(buf, format=pil_format, **kwargs)
    return buf.getvalue()


def depth_scale_for(depth: np.ndarray | Sequence[np.ndarray]) -> float:
    """A depth scale (metres per unit) that fits the largest finite depth into 16 bits with headroom."""
    arrays = [depth] if isinstance(depth, np.ndarray) else list(depth)
    largest = max((float(np.max(d[np.isfinite(d)], initial=0.0)) for d in arrays), default=0.0)
    if largest <= 0:
        return 1e-3
    return largest / (DEPTH_MAX_UNITS - 1)


def encode_depth(depth: np.ndarray, scale: float) -> bytes:
    """Encode float z-depth ``[H, W]`` (0 or non-finite = none) as a 16-bit PNG of ``round(depth / scale)``."""
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got shape {list(depth.shape)}")
    require(scale > 0, "depth_scale", "> 0", scale, ValueError)
    valid = np.isfinite(depth) & (depth > 0)
    units = np.zeros(depth.shape, dtype=np.float64)
    units[valid] = np.round(depth[valid] / scale)
    if units.max(initial=0) > DEPTH_MAX_UNITS:
        raise ValueError(
            f"depth {depth[valid].max():.4g} does not fit 16 bits at depth_scale {scale:.4g} "
            f"(max {DEPTH_MAX_UNITS * scale:.4g}); use depth_scale_for()"
        )
    units[valid] = np.maximum(units[valid], 1)  # a valid depth never encodes as "none"
    buf = io.BytesIO()
    Image.fromarray(units.astype(np.uint16)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """Encode a boolean or 0/1 mask ``[H, W]`` as an 8-bit PNG (0 or 255)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask must be [H, W], got shape {list(mask.shape)}")
    buf = io.BytesIO()
    Image.fromarray(np.where(mask > 0, 255, 0).astype(np.uint8), mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _image_size(image: np.ndarray | EncodedImage) -> tuple[int, int]:
    """``(width, height)`` of an array or of encoded bytes (reads the header only)."""
    if isinstance(image, EncodedImage):
        with Image.open(io.BytesIO(image.data)) as im:
            return im.size
    arr = np.asarray(image)
    return int(arr.shape[1]), int(arr.shape[0])


_K_ROW = np.array([0.0, 0.0, 1.0])
_C2W_ROW = np.array([0.0, 0.0, 0.0, 1.0])
_EYE3 = np.eye(3)


def _require_matrix(matrix: np.ndarray, name: str, shape: tuple[int, int], what: str) -> None:
    """Raise ``ValueError`` unless ``matrix`` has ``shape`` and only finite values (a shape problem and a non-finite
    value are said apart: a NaN camera is not a bad shape)."""
    if matrix.shape != shape:
        raise ValueError(f"{what}: {name} must be a {shape[0]}x{shape[1]} matrix, got shape {list(matrix.shape)}")
    bad = np.argwhere(~np.isfinite(matrix))
    if len(bad):
        row, col = (int(i) for i in bad[0])
        raise ValueError(
            f"{what}: {name} has {len(bad)} non-finite value(s) (NaN or infinite; a JSON null reads as NaN), the "
            f"first {matrix[row, col]} at [{row}, {col}]"
        )


def check_camera(K: np.ndarray, c2w: np.ndarray, what: str = "camera") -> None:
    """Raise ``ValueError`` unless ``K`` is a finite 3x3 intrinsic matrix with positive focal lengths and
    ``c2w`` a finite 4x4 rigid transform (rotation with determinant +1, last row ``0 0 0 1``)."""
    K = np.asarray(K, dtype=np.float64)
    c2w = np.asarray(c2w, dtype=np.float64)
    # plain comparisons: np.allclose costs more than the rest of a view's decoding
    _require_matrix(K, "K", (3, 3), what)
    require(
        K[0, 0] > 0 and K[1, 1] > 0 and np.abs(K[2] - _K_ROW).max() <= 1e-9 and K[1, 0] == 0,
        f"{what}: K",
        "[[fx, s, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0",
        K.tolist(),
        ValueError,
    )
    _require_matrix(c2w, "c2w", (4, 4), what)
    require(
        np.abs(c2w[3] - _C2W_ROW).max() <= 1e-6,
        f"{what}: the last row of c2w",
        "[0, 0, 0, 1]",
        c2w[3].tolist(),
        ValueError,
    )
    rot = c2w[:3, :3]
    if np.abs(rot @ rot.T - _EYE3).max() > 1e-4 or np.linalg.det(rot) < 0:
        raise ValueError(f"{what}: the rotation part of c2w is not a rotation (orthonormal, det +1)")


# ============================================================================ in-memory samples
@dataclass
class Scene:
    """A multi-view sample to write.

    Args:
        key: sample key (no dots; see :func:`make_key`).
        images: one RGB image per view: ``[H, W, 3]`` uint8 arrays or :class:`EncodedImage`, all one size, in
            capture order.
        K: ``[V, 3, 3]`` pixel intrinsics; ``None`` (with ``c2w``) for an unposed scene (no ``cameras.json``).
        c2w: ``[V, 4, 4]`` camera-to-world, OpenCV axes; ``None`` for an unposed scene.
        depth: optional ``V`` z-depth maps ``[H, W]`` (0 = none).
        masks: optional ``V`` foreground masks ``[H, W]``.
        meta: ``meta.json`` content; ``source``, ``scene_id`` and ``label`` are filled in when missing.
        depth_scale: world units per unit of the depth PNGs; chosen from the data when ``None``.
        depth_kind: ``metric`` (the scene's world units) or ``relative`` (see :data:`DEPTH_KINDS`).
        sparse_depth: optional ``[M, 4]`` rows ``(view, u, v, z)``: sparse points of the source (pixel
            coordinates of the stored views, z-depth in world units), for scaling pseudo depth to them.
    """

    key: str
    images: list[np.ndarray | EncodedImage]
    K: np.ndarray | None = None
    c2w: np.ndarray | None = None
    depth: list[np.ndarray] | None = None
    masks: list[np.ndarray] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    depth_scale: float | None = None
    depth_kind: str = "metric"
    sparse_depth: np.ndarray | None = None


@dataclass
class ImageSample:
    """A single-view sample to write.

    Args:
        key: sample key (no dots).
        image: ``[H, W, 3]`` uint8 array or :class:`EncodedImage`.
        depth: optional ``[H, W]`` depth (metric or relative, see ``depth_kind``; 0 = none).
        mask: optional ``[H, W]`` foreground mask.
        label: class index, -1 when unknown.
        meta: ``meta.json`` content (``source``, ``class_name``, ...).
        depth_scale: units per PNG step; chosen from the data when ``None``.
        depth_kind: ``"metric"`` (metres) or ``"relative"`` (monocular pseudo depth, arbitrary scale).
    """

    key: str
    image: np.ndarray | EncodedImage
    depth: np.ndarray | None = None
    mask: np.ndarray | None = None
    label: int = -1
    meta: dict[str, Any] = field(default_factory=dict)
    depth_scale: float | None = None
    depth_kind: str = "metric"


def _encode_image_field(image: np.ndarray | EncodedImage, fmt: str, quality: int) -> tuple[str, bytes]:
    if isinstance(image, EncodedImage):
        depth = png_bit_depth(image.data)
        if depth is not None and depth > 8:
            raise ValueError(
                f"a {depth}-bit PNG: images in shards are 8-bit (docs/shard-format.md); decode it (eight_bit) and "
                "pass the array"
            )
        return _image_ext(image.ext), image.data
    ext = _image_ext(fmt)
    return ext, encode_rgb(image, ext, quality)


def encode_scene(scene: Scene, image_format: str = "png", quality: int = 95) -> dict[str, Any]:
    """Validate ``scene`` and turn it into the dict :class:`webdataset.ShardWriter` writes (bytes values).

    A scene without ``K`` and ``c2w`` is unposed: it gets no ``cameras.json``, and its depth scale goes to
    ``meta.json``.

    Raises:
        ValueError: naming the key and what is wrong.
    """
    check_key(scene.key)
    where = f"scene {scene.key}"
    n = len(scene.images)
    if n < 1:
        raise ValueError(f"{where}: no views")
    if (scene.K is None) != (scene.c2w is None):
        raise ValueError(f"{where}: give both K and c2w (a posed scene) or neither (an unposed one)")
    posed = scene.K is not None
    if posed:
        K = np.asarray(scene.K, dtype=np.float64)
        c2w = np.asarray(scene.c2w, dtype=np.float64)
        if K.shape != (n, 3, 3) or c2w.shape != (n, 4, 4):
            raise ValueError(
                f"{where}: K must be [{n}, 3, 3] and c2w [{n}, 4, 4], got {list(K.shape)}, {list(c2w.shape)}"
            )
    sizes = {_image_size(im) for im in scene.images}
    if len(sizes) != 1:
        raise ValueError(f"{where}: all views must have one size, got {sorted(sizes)}")
    width, height = sizes.pop()
    if posed:
        for i in range(n):
            check_camera(K[i], c2w[i], f"{where}, view {i}")
    out: dict[str, Any] = {"__key__": scene.key}
    for i, image in enumerate(scene.images):
        ext, data = _encode_image_field(image, image_format, quality)
        out[view_field(i, ext)] = data
    depth_scale = None
    if scene.depth is not None:
        if len(scene.depth) != n:
            raise ValueError(f"{where}: {len(scene.depth)} depth maps for {n} views")
        require(scene.depth_kind in DEPTH_KINDS, f"{where}: depth_kind", f"one of {DEPTH_KINDS}", scene.depth_kind,
                ValueError)  # fmt: skip
        depth_scale = scene.depth_scale or depth_scale_for(scene.depth)
        for i, d in enumerate(scene.depth):
            if np.shape(d) != (height, width):
                raise ValueError(f"{where}, view {i}: depth is {list(np.shape(d))}, image is [{height}, {width}]")
            out[view_field(i, DEPTH_SUFFIX)] = encode_depth(d, depth_scale)
    if scene.masks is not None:
        if len(scene.masks) != n:
            raise ValueError(f"{where}: {len(scene.masks)} masks for {n} views")
        for i, m in enumerate(scene.masks):
            if np.shape(m) != (height, width):
                raise ValueError(f"{where}, view {i}: mask is {list(np.shape(m))}, image is [{height}, {width}]")
            out[view_field(i, MASK_SUFFIX)] = encode_mask(m)
    if scene.sparse_depth is not None:
        out[SPARSE_DEPTH_FIELD] = encode_sparse_depth(scene.sparse_depth, n, where)
    meta = {"source": "unknown", "scene_id": scene.key, "label": -1, **scene.meta}
    if depth_scale is not None:
        meta["depth_kind"] = scene.depth_kind
    if posed:
        cameras = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "width": width,
            "height": height,
            "depth_scale": depth_scale,
            "views": [{"K": K[i].tolist(), "c2w": c2w[i].tolist()} for i in range(n)],
        }
        out[CAMERAS_FIELD] = json.dumps(cameras).encode()
    elif depth_scale is not None:
        meta["depth_scale"] = depth_scale
    _check_label(meta.get("label"), where)
    out[META_FIELD] = json.dumps(meta).encode()
    return out


def encode_sparse_depth(rows: np.ndarray, num_views: int, where: str = "scene") -> bytes:
    """``[M, 4]`` rows ``(view, u, v, z)`` as ``.npy`` bytes (float32), checked: views in range, ``z > 0``."""
    rows = np.asarray(rows, dtype=np.float32).reshape(-1, 4)
    if not np.isfinite(rows).all() or (rows[:, 3] <= 0).any():
        raise ValueError(f"{where}: sparse_depth rows must be finite with z > 0")
    if len(rows) and (rows[:, 0].min() < 0 or rows[:, 0].max() >= num_views):
        raise ValueError(f"{where}: sparse_depth names views outside 0..{num_views - 1}")
    buf = io.BytesIO()
    np.save(buf, rows, allow_pickle=False)
    return buf.getvalue()


def encode_image_sample(sample: ImageSample, image_format: str = "jpg", quality: int = 95) -> dict[str, Any]:
    """Validate a single-view sample and turn it into a ShardWriter dict.

    Raises:
        ValueError: naming the key and what is wrong.
    """
    check_key(sample.key)
    where = f"sample {sample.key}"
    width, height = _image_size(sample.image)
    ext, data = _encode_image_field(sample.image, image_format, quality)
    out: dict[str, Any] = {"__key__": sample.key, ext: data}
    meta = {"source": "unknown", "label": int(sample.label), **sample.meta}
    if sample.depth is not None:
        if np.shape(sample.depth) != (height, width):
            raise ValueError(f"{where}: depth is {list(np.shape(sample.depth))}, image is [{height}, {width}]")
        require(
            sample.depth_kind in DEPTH_KINDS,
            f"{where}: depth_kind",
            "'metric' or 'relative'",
            sample.depth_kind,
            ValueError,
        )
        scale = sample.depth_scale or depth_scale_for(sample.depth)
        out[DEPTH_SUFFIX] = encode_depth(sample.depth, scale)
        meta.update(depth_scale=scale, depth_kind=sample.depth_kind)
    if sample.mask is not None:
        if np.shape(sample.mask) != (height, width):
            raise ValueError(f"{where}: mask is {list(np.shape(sample.mask))}, image is [{height}, {width}]")
        out[MASK_SUFFIX] = encode_mask(sample.mask)
    _check_label(meta["label"], where)
    out[CLASS_FIELD] = str(int(sample.label)).encode()
    out[META_FIELD] = json.dumps(meta).encode()
    return out


def _check_label(label: Any, where: str) -> None:
    require(
        isinstance(label, int | np.integer) and not isinstance(label, bool) and label >= -1,
        f"{where}: label",
        "an integer >= -1 (-1 = unknown)",
        label,
        ValueError,
    )


# ============================================================================ writing shards
class ShardSink:
    """Writes samples into ``DIR/SPLIT-000000.tar``, ``DIR/SPLIT-000001.tar``, ... (WebDataset's ShardWriter).

    Args:
        out_dir: output folder (created).
        split: shard name prefix, e.g. ``train`` or ``val`` (no dots).
        samples_per_shard: start a new shard after this many samples.
        max_shard_bytes: ... or when a shard reaches this size.
        image_format: how arrays are encoded: ``png`` (lossless, default for renders), ``jpg`` or ``webp``.
        quality: JPEG/WebP quality.
        overwrite: delete existing ``SPLIT-NNNNNN.tar`` shards first; otherwise refuse to mix with them.

    After :meth:`close` (or the ``with`` block), :attr:`shards` lists the files and :attr:`url` is a brace
    pattern for all of them, to paste into a config.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        split: str = "train",
        samples_per_shard: int = 100,
        max_shard_bytes: float = 1e9,
        image_format: str = "png",
        quality: int = 95,
        overwrite: bool = False,
    ) -> None:
        check_key(split)
        require(samples_per_shard >= 1, "samples_per_shard", ">= 1", samples_per_shard, ValueError)
        self.out_dir = Path(out_dir)
        self.split = split
        self.image_format = _image_ext(image_format)
        self.quality = quality
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob(f"{split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if existing and not overwrite:
            raise FileExistsError(
                f"{self.out_dir} already holds {len(existing)} '{split}' shards ({existing[0].name}, ...); "
                "choose another folder or overwrite them (--overwrite)"
            )
        for path in existing:
            path.unlink()
        self.count = 0
        self._keys: set[str] = set()
        # a fixed integer mtime: byte-identical shards for identical data, and plain ustar headers (a float
        # mtime makes tarfile add a pax header to every member, which doubles the cost of reading them)
        self._writer = wds.ShardWriter(
            str(self.out_dir / f"{split}-%06d.tar"),
            maxcount=samples_per_shard,
            maxsize=max_shard_bytes,
            verbose=0,
            mtime=0,
        )
        self._closed = False

    def write(self, sample: Scene | ImageSample | Mapping[str, Any]) -> None:
        """Validate, encode and write one sample (a ready ShardWriter dict is written as is)."""
        if isinstance(sample, Scene):
            record = encode_scene(sample, self.image_format, self.quality)
        elif isinstance(sample, ImageSample):
            record = encode_image_sample(sample, self.image_format, self.quality)
        else:
            record = dict(sample)
            check_key(record.get("__key__", ""))
        if record["__key__"] in self._keys:
            # WebDataset groups members by key: a repeated key would merge two samples into one
            raise ValueError(f"duplicate sample key {record['__key__']!r} in {self.out_dir} ({self.split})")
        self._keys.add(record["__key__"])
        self._writer.write(record)
        self.count += 1

    def close(self) -> None:
        """Finish the last shard (and remove the empty one ShardWriter opened when nothing was written)."""
        if not self._closed:
            self._writer.close()
            self._closed = True
            if self.count == 0:
                for path in self.shards:
                    Path(path).unlink()

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def shards(self) -> list[str]:
        """Paths of the shards written so far, in order."""
        return [str(p) for p in sorted(self.out_dir.glob(f"{self.split}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))]

    @property
    def url(self) -> str:
        """A brace pattern naming every shard written (``DIR/train-{000000..000003}.tar``)."""
        return shard_pattern(self.out_dir, self.split, len(self.shards))


def shard_pattern(out_dir: str | os.PathLike[str], split: str, num_shards: int) -> str:
    """Brace pattern of ``num_shards`` shards written by :class:`ShardSink`."""
    if num_shards <= 1:
        return str(Path(out_dir) / f"{split}-000000.tar")
    return str(Path(out_dir) / f"{split}-{{000000..{num_shards - 1:06d}}}.tar")


# ============================================================================ reading
@dataclass
class Cameras:
    """Parsed ``cameras.json``: ``K`` ``[N, 3, 3]`` and ``c2w`` ``[N, 4, 4]`` (float64)."""

    width: int
    height: int
    depth_scale: float | None
    K: np.ndarray
    c2w: np.ndarray

    @property
    def num_views(self) -> int:
        return len(self.K)


def sample_where(sample: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """``(shard url, key)`` of a raw WebDataset sample, for messages."""
    return sample.get("__url__"), sample.get("__key__")


def is_multiview(sample: Mapping[str, Any]) -> bool:
    """Whether a raw sample is a multi-view scene (it has ``cameras.json`` or numbered views)."""
    return CAMERAS_FIELD in sample or any(_VIEW_RE.match(k) for k in sample)


def _load_json(sample: Mapping[str, Any], name: str) -> Any:
    url, key = sample_where(sample)
    if name not in sample:
        raise SampleError(url, key, name, "missing")
    raw = sample[name]
    if isinstance(raw, dict | list):
        return raw
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise SampleError(url, key, name, f"not valid JSON ({err})") from None


def parse_cameras(sample: Mapping[str, Any]) -> Cameras:
    """Read and validate ``cameras.json`` of a raw multi-view sample.

    Raises:
        SampleError: missing or malformed, naming shard, key and the exact entry.
    """
    url, key = sample_where(sample)
    data = _load_json(sample, CAMERAS_FIELD)

    def bad(problem: str) -> SampleError:
        return SampleError(url, key, CAMERAS_FIELD, problem)

    if not isinstance(data, dict):
        raise bad(f"must be a JSON object, got {type(data).__name__}")
    for name in ("width", "height", "views"):
        if name not in data:
            raise bad(f"missing '{name}'")
    width, height = data["width"], data["height"]
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise bad(f"'width' and 'height' must be positive integers, got {width!r}, {height!r}")
    scale = data.get("depth_scale")
    if scale is not None and not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise bad(f"'depth_scale' must be a positive number or null, got {scale!r}")
    views = data["views"]
    if not isinstance(views, list) or not views:
        raise bad("'views' must be a non-empty list")
    Ks, c2ws = [], []
    for i, view in enumerate(views):
        if not isinstance(view, dict) or "K" not in view or "c2w" not in view:
            raise bad(f"views[{i}] must be an object with 'K' and 'c2w'")
        try:
            K = np.asarray(view["K"], dtype=np.float64)
            c2w = np.asarray(view["c2w"], dtype=np.float64)
        except (TypeError, ValueError):
            raise bad(f"views[{i}]: 'K' and 'c2w' must be numeric matrices") from None
        try:
            check_camera(K, c2w, f"views[{i}]")
        except ValueError as err:
            raise bad(str(err)) from None
        Ks.append(K)
        c2ws.append(c2w)
    return Cameras(width, height, float(scale) if scale is not None else None, np.stack(Ks), np.stack(c2ws))


def image_field(sample: Mapping[str, Any], view: int | None = None) -> str:
    """Name of the image field of view ``view`` (multi-view) or of a single-view sample (``view=None``).

    Raises:
        SampleError: no image for that view.
    """
    prefix = "" if view is None else f"{view:03d}."
    for ext in IMAGE_EXTENSIONS:
        if prefix + ext in sample:
            return prefix + ext
    url, key = sample_where(sample)
    what = f"{prefix}{{{','.join(IMAGE_EXTENSIONS)}}}"
    raise SampleError(url, key, what, "missing" + ("" if view is None else f" (view {view})"))


def view_indices(sample: Mapping[str, Any]) -> list[int]:
    """Indices of the views present as images in a raw multi-view sample, sorted."""
    return sorted({int(m.group(1)) for k in sample if (m := _VIEW_RE.match(k))})


def check_views(sample: Mapping[str, Any], cameras: Cameras) -> None:
    """Raise :class:`SampleError` unless the sample has exactly one image per camera, numbered from 0."""
    found = view_indices(sample)
    if found != list(range(cameras.num_views)):
        url, key = sample_where(sample)
        missing = sorted(set(range(cameras.num_views)) - set(found))
        extra = sorted(set(found) - set(range(cameras.num_views)))
        problem = f"cameras.json lists {cameras.num_views} views"
        if missing:
            problem += f"; no image for view(s) {missing[:8]}"
        if extra:
            problem += f"; image(s) without a camera: {extra[:8]}"
        raise SampleError(url, key, CAMERAS_FIELD, problem)


def check_numbered_views(sample: Mapping[str, Any]) -> list[int]:
    """The views of an unposed scene, ``0 .. N-1`` (raise :class:`SampleError` when there are none or one is
    missing)."""
    found = view_indices(sample)
    if not found or found != list(range(len(found))):
        missing = sorted(set(range(max(found, default=-1) + 1)) - set(found))
        problem = "no views" if not found else f"views are numbered from 0 without gaps; missing {missing[:8]}"
        raise SampleError(*sample_where(sample), None, problem)
    return found


@dataclass
class SceneLayout:
    """What a multi-view scene holds, from its JSON and image headers (no image decoded): ``num_views``, the
    views' ``(width, height)``, its :class:`Cameras` (``None`` for an unposed scene), its depth scale (``None``
    without depth) and ``depth_kind``, and ``meta.json``."""

    num_views: int
    size: tuple[int, int]
    cameras: Cameras | None
    depth_scale: float | None
    depth_kind: str
    meta: dict[str, Any]


def _header_size(sample: Mapping[str, Any], name: str) -> tuple[int, int]:
    try:
        with Image.open(io.BytesIO(sample[name])) as image:
            return image.size
    except Exception as err:
        raise SampleError(*sample_where(sample), name, f"cannot decode image ({type(err).__name__}: {err})") from None


def parse_scene(sample: Mapping[str, Any]) -> SceneLayout:
    """Read a raw multi-view sample's layout: ``cameras.json`` when present (validated, one image per camera),
    otherwise the numbered views of an unposed scene (their size from the first image's header); the depth
    scale from ``cameras.json``, or from ``meta.json`` for an unposed scene.

    Raises:
        SampleError: a malformed ``cameras.json`` or ``meta.json``, missing views, no positive depth scale where
            the scene has depth.
    """
    meta = parse_meta(sample)
    kind = meta.get("depth_kind", "metric")
    if kind not in DEPTH_KINDS:
        raise SampleError(*sample_where(sample), META_FIELD, f"'depth_kind' must be one of {DEPTH_KINDS}, got {kind!r}")
    if CAMERAS_FIELD in sample:
        cameras = parse_cameras(sample)
        check_views(sample, cameras)
        size = (cameras.width, cameras.height)
        return SceneLayout(cameras.num_views, size, cameras, cameras.depth_scale, kind, meta)
    views = check_numbered_views(sample)
    scale = None
    if "depth_scale" in meta:
        scale = single_depth_scale(sample, meta)
    return SceneLayout(len(views), _header_size(sample, image_field(sample, 0)), None, scale, kind, meta)


def parse_sparse_depth(sample: Mapping[str, Any], num_views: int) -> np.ndarray | None:
    """``sparse_depth.npy`` as float32 ``[M, 4]`` rows ``(view, u, v, z)``, or ``None`` when absent.

    Raises:
        SampleError: not a float ``[M, 4]`` array, views out of range or ``z <= 0``.
    """
    if SPARSE_DEPTH_FIELD not in sample:
        return None
    try:
        rows = np.load(io.BytesIO(sample[SPARSE_DEPTH_FIELD]), allow_pickle=False)
        if rows.ndim != 2 or rows.shape[1] != 4:
            raise ValueError(f"shape {list(rows.shape)}, expected [M, 4]")
        encode_sparse_depth(rows, num_views)
    except ValueError as err:
        raise SampleError(*sample_where(sample), SPARSE_DEPTH_FIELD, str(err).removeprefix("scene: ")) from None
    return rows.astype(np.float32)


def _open_image(sample: Mapping[str, Any], name: str) -> Image.Image:
    url, key = sample_where(sample)
    if name not in sample:
        raise SampleError(url, key, name, "missing")
    try:
        image = Image.open(io.BytesIO(sample[name]))
        image.load()
    except Exception as err:  # PIL raises many types for corrupt data
        raise SampleError(url, key, name, f"cannot decode image ({type(err).__name__}: {err})") from None
    return image


def decode_rgb(sample: Mapping[str, Any], name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image field, as stored, to an 8-bit RGB PIL image (:func:`eight_bit`: 16-bit greyscale is scaled,
    not clipped); ``size`` = expected ``(width, height)``. A view of a scene is read so: its ``cameras.json``
    describes the stored pixels (an EXIF orientation tag is not applied). See :func:`decode_upright_rgb`.

    Raises:
        SampleError: missing, undecodable, of a mode with no known range, or of the wrong size.
    """
    return _rgb(sample, name, _open_image(sample, name), size)


def decode_upright_rgb(sample: Mapping[str, Any], name: str) -> tuple[Image.Image, int]:
    """Decode a single-view image (no camera describes its pixels) as :func:`decode_rgb` does, turned upright by its
    EXIF orientation as the image converter and image viewers do; returns it and that orientation (1: none), by
    which the sample's depth and mask are turned too (:func:`turn`), so they stay aligned."""
    image = _open_image(sample, name)
    how = orientation(image)
    return _rgb(sample, name, turn(image, how), None), how


def _rgb(sample: Mapping[str, Any], name: str, image: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    url, key = sample_where(sample)
    if size is not None and image.size != tuple(size):
        turned = " (as stored; its EXIF orientation tag, not applied to views of scenes, says it is turned)"
        raise SampleError(
            url,
            key,
            name,
            f"image is {image.size[0]}x{image.size[1]}, expected {size[0]}x{size[1]}"
            + (turned if orientation(image) != 1 else ""),
        )
    if image.mode == "RGBA" or (image.mode == "P" and "transparency" in image.info):
        raise SampleError(url, key, name, "has an alpha channel; writers composite it (see converters)")
    try:
        image = eight_bit(image)
    except ValueError as err:
        raise SampleError(url, key, name, str(err)) from None
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_depth(sample: Mapping[str, Any], name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode a 16-bit depth PNG to a PIL image of mode ``I;16`` (multiply by the depth scale for metres).

    Raises:
        SampleError: missing, undecodable, not 16-bit or of the wrong size.
    """
    image = _open_image(sample, name)
    url, key = sample_where(sample)
    if image.mode not in ("I;16", "I;16B", "I;16L"):
        raise SampleError(url, key, name, f"depth must be a 16-bit grayscale PNG, got mode {image.mode}")
    if size is not None and image.size != tuple(size):
        raise SampleError(url, key, name, f"depth is {image.size[0]}x{image.size[1]}, expected {size[0]}x{size[1]}")
    return image


def decode_mask(sample: Mapping[str, Any], name: str, size: tuple[int, int] | None = None) -> Image.Image:
    """Decode a mask PNG to a PIL image of mode ``L`` (non-zero = foreground).

    Raises:
        SampleError: missing, undecodable or of the wrong size.
    """
    image = _open_image(sample, name)
    if size is not None and image.size != tuple(size):
        url, key = sample_where(sample)
        raise SampleError(url, key, name, f"mask is {image.size[0]}x{image.size[1]}, expected {size[0]}x{size[1]}")
    return image if image.mode == "L" else image.convert("L")


def depth_to_array(image: Image.Image, scale: float) -> np.ndarray:
    """A decoded depth image to float32 z-depth ``[H, W]`` (0 = none)."""
    return np.asarray(image, dtype=np.uint16).astype(np.float32) * np.float32(scale)


def parse_meta(sample: Mapping[str, Any], required: bool = True) -> dict[str, Any]:
    """``meta.json`` as a dict (empty when absent and not ``required``), with ``label`` checked.

    For single-view samples a ``cls`` field, when present, is the label.

    Raises:
        SampleError: malformed JSON, a non-object, or a label that is not an integer >= -1.
    """
    url, key = sample_where(sample)
    if META_FIELD in sample:
        meta = _load_json(sample, META_FIELD)
        if not isinstance(meta, dict):
            raise SampleError(url, key, META_FIELD, f"must be a JSON object, got {type(meta).__name__}")
    elif required:
        raise SampleError(url, key, META_FIELD, "missing")
    else:
        meta = {}
    if CLASS_FIELD in sample:
        try:
            meta["label"] = int(bytes(sample[CLASS_FIELD]).decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise SampleError(url, key, CLASS_FIELD, f"not an integer: {sample[CLASS_FIELD][:20]!r}") from None
    label = meta.setdefault("label", -1)
    try:
        _check_label(label, "")
    except ValueError:
        raise SampleError(url, key, META_FIELD, f"'label' must be an integer >= -1, got {label!r}") from None
    return meta


def single_depth_scale(sample: Mapping[str, Any], meta: Mapping[str, Any]) -> float:
    """The depth scale of a single-view sample (``meta.json`` ``depth_scale``).

    Raises:
        SampleError: a depth image without a positive ``depth_scale``.
    """
    scale = meta.get("depth_scale")
    if not (isinstance(scale, int | float) and math.isfinite(scale) and scale > 0):
        raise SampleError(*sample_where(sample), META_FIELD, f"'depth_scale' must be a positive number, got {scale!r}")
    return float(scale)
