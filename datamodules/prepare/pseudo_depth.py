"""Annotate shards (single-view samples and multi-view scenes) or an image folder with monocular pseudo depth
(``selfsup3d data pseudo-depth``).

::

    selfsup3d data pseudo-depth 'shards/train-{000000..000009}.tar' --out shards_depth \\
        --model depth-anything/Depth-Anything-V2-Small-hf
    selfsup3d data pseudo-depth photos/ --out shards_depth --model /models/dpt-hybrid-midas --batch-size 16

``SRC`` is either shards (a brace pattern, a glob, or a folder holding ``.tar`` files) of single-view samples
and multi-view scenes (posed or unposed, e.g. converted COLMAP captures and videos), or a folder of images
(searched recursively; the first-level sub-folder names are the classes, sorted, as ``label``). The model is
any Hugging Face depth-estimation model (Depth Anything, DPT, ZoeDepth, GLPN, ...) given by hub id or local
folder, run through ``AutoModelForDepthEstimation`` and its image processor in batches, with a progress bar.
The output is shards of the same kinds written with the shard format module (``docs/shard-format.md``). A
single-view sample's image passes through unchanged, the depth is stored as
``depth_kind: "relative"``, labels, masks and metadata are kept; samples that already have depth keep it
unless ``--replace``.

What is stored is *depth-like* (larger = farther), whatever the model predicts:

* models that predict relative inverse depth (DPT/MiDaS, Depth Anything's relative checkpoints) give a
  disparity of unknown scale and shift. Its 2nd and 98th percentiles (per image) are mapped to inverse
  depths ``1/R`` and ``1`` (``R`` = ``--disparity-range``, default 10), values beyond are clamped, and the
  inverse is stored: relative depth in ``[1, R]``.
* models that predict depth (ZoeDepth, GLPN, Depth Anything's metric checkpoints) are stored as predicted.

A multi-view scene gets depth for each of its views (the model runs on every view), in one of two ways:

* **scaled to the source's sparse points** where the scene has cameras and ``sparse_depth.npy`` (a converted
  COLMAP capture): each view's map is fitted to the z-depth of the points it observes (an affine fit in inverse
  depth for disparity models, a median ratio for depth models; at least ``MIN_POINTS`` points), so the depth is
  in the cameras' world units and fuses with them (``depth_kind: "metric"``); a view with too few points gets no
  depth (0, said in the report);
* otherwise **normalised per scene**: all views divided by the median of the scene's depth (so it is 1), and
  marked ``depth_kind: "relative"`` in ``meta.json`` (it does not fuse with true cameras; it suits predicted
  ones).

The scene's other fields pass through unchanged; the depth scale goes to ``cameras.json`` (or ``meta.json`` for
an unposed scene), the model and the alignment to ``meta.json``'s ``pseudo_depth``.

Training maps this relative depth into the renderer's ``[near, far]`` per image with another robust
percentile map (``TriplaneReconstruction(depth_normalization="percentile")``, see
:func:`selfsup3d.geometry.volume.normalize_depth`), so only the ordering and the proportions matter.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from selfsup3d.datamodules.format import (
    CAMERAS_FIELD,
    DEPTH_SUFFIX,
    IMAGE_EXTENSIONS,
    MASK_SUFFIX,
    META_FIELD,
    EncodedImage,
    ImageSample,
    SampleKeys,
    ShardSink,
    decode_depth,
    decode_mask,
    decode_rgb,
    decode_upright_rgb,
    depth_scale_for,
    depth_to_array,
    eight_bit,
    encode_depth,
    image_field,
    is_multiview,
    parse_meta,
    parse_scene,
    parse_sparse_depth,
    png_bit_depth,
    single_depth_scale,
    turn,
    upright,
    view_field,
)
from selfsup3d.datamodules.pipeline import expand_urls
from selfsup3d.hub import fetch_pretrained

MIN_POINTS = 8
"""Sparse points a view needs for its depth to be scaled to them."""
DISPARITY_MODELS = ("dpt", "depth_anything")
"""Model types whose relative checkpoints predict inverse depth (disparity)."""

_SPLIT_RE = re.compile(r"^([A-Za-z0-9_]+?)-\d+\.tar$")


# ---------------------------------------------------------------------------- conversion
def disparity_to_depth(
    disparity: Tensor, depth_range: float = 10.0, quantiles: tuple[float, float] = (0.02, 0.98)
) -> Tensor:
    """Relative inverse depth ``[H, W]`` to depth-like values in ``[1, depth_range]`` (see the module docstring).

    Args:
        disparity: model output, larger = closer, unknown scale and shift.
        depth_range: ratio of the farthest to the nearest depth stored.
        quantiles: the robust low/high quantiles mapped to the far and near ends.

    Returns:
        ``[H, W]`` float32 depth, 1 at the near end, ``depth_range`` at the far end.
    """
    d = disparity.float()
    q = torch.quantile(d.flatten(), torch.tensor(quantiles, dtype=d.dtype, device=d.device))
    unit = ((d - q[0]) / (q[1] - q[0]).clamp(min=1e-8)).clamp(0.0, 1.0)
    inverse = 1.0 / depth_range + unit * (1.0 - 1.0 / depth_range)
    return 1.0 / inverse


def output_kind(model: Any, requested: str = "auto") -> str:
    """``disparity`` or ``depth``: what the model's ``predicted_depth`` holds."""
    if requested != "auto":
        return requested
    config = model.config
    if config.model_type in DISPARITY_MODELS and getattr(config, "depth_estimation_type", "relative") == "relative":
        return "disparity"
    return "depth"


# ---------------------------------------------------------------------------- sources
class Item:
    """One sample to annotate: key, image (as it will be written), decoded RGB, and what it keeps."""

    def __init__(
        self,
        key: str,
        split: str,
        image: EncodedImage | np.ndarray,
        rgb: Image.Image,
        label: int,
        meta: dict[str, Any],
        mask: np.ndarray | None = None,
        depth: np.ndarray | None = None,
        depth_scale: float | None = None,
        depth_kind: str = "relative",
    ) -> None:
        self.key, self.split, self.image, self.rgb, self.label, self.meta = key, split, image, rgb, label, meta
        self.mask, self.depth, self.depth_scale, self.depth_kind = mask, depth, depth_scale, depth_kind


def _is_shard_source(src: str) -> bool:
    path = Path(src)
    if path.is_dir():
        return any(path.glob("*.tar"))
    return ".tar" in src or src.startswith(("pipe:", "http://", "https://", "s3://", "gs://"))


def _shard_urls(src: str) -> list[str]:
    path = Path(src)
    if path.is_dir():
        return [str(p) for p in sorted(path.glob("*.tar"))]
    return expand_urls(src, "SRC")


def _split_of(url: str, default: str) -> str:
    match = _SPLIT_RE.match(Path(url).name)
    return match.group(1) if match else default


class SceneItem:
    """One multi-view scene to annotate: its raw fields (written back with depth added) and output split."""

    def __init__(self, raw: dict[str, Any], split: str) -> None:
        self.raw, self.split = raw, split


def iter_shards(src: str, default_split: str) -> Iterator[Item | SceneItem]:
    """Single-view samples and multi-view scenes of shards (raw, not augmented), in order."""
    import webdataset as wds

    for url in _shard_urls(src):
        split = _split_of(url, default_split)
        for sample in wds.WebDataset(url, shardshuffle=False, empty_check=False):
            if is_multiview(sample):
                yield SceneItem(sample, split)
                continue
            name = image_field(sample)
            rgb, how = decode_upright_rgb(sample, name)  # its depth and mask turned with it
            meta = parse_meta(sample, required=False)
            label = int(meta.pop("label", -1))
            mask = np.asarray(turn(decode_mask(sample, MASK_SUFFIX), how)) if MASK_SUFFIX in sample else None
            depth = scale = None
            kind = "relative"
            if DEPTH_SUFFIX in sample:
                scale = single_depth_scale(sample, meta)
                depth = depth_to_array(turn(decode_depth(sample, DEPTH_SUFFIX), how), scale)
                kind = str(meta.get("depth_kind", "metric"))
            for field_name in ("depth_scale", "depth_kind"):
                meta.pop(field_name, None)
            ext = name.rsplit(".", 1)[-1]
            # the stored bytes when they read as they are (upright, 8-bit), else the image as read
            stored = how == 1 and png_bit_depth(sample[name]) in (None, 8)
            image = EncodedImage(sample[name], ext) if stored else np.asarray(rgb)
            yield Item(sample["__key__"], split, image, rgb, label, meta, mask, depth, scale, kind)


def iter_folder(src: str, split: str) -> tuple[int, Iterator[Item]]:
    """Images of a folder (recursively) and how many; first-level sub-folders are the classes."""
    root = Path(src)
    exts = {f".{e}" for e in IMAGE_EXTENSIONS} | {".bmp", ".tif", ".tiff"}
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(exts))}) under {src}")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {name: i for i, name in enumerate(classes)}

    def items() -> Iterator[Item]:
        keys = SampleKeys()
        for path in files:
            rel = path.relative_to(root)
            cls = rel.parts[0] if len(rel.parts) > 1 else None
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                turned = upright(im)
                rgb = eight_bit(turned).convert("RGB")
                passthrough = (
                    turned is im and im.mode == "RGB" and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                ) and png_bit_depth(data) in (None, 8)
            image: EncodedImage | np.ndarray = (
                EncodedImage(data, path.suffix.lower().lstrip(".")) if passthrough else np.asarray(rgb)
            )
            meta: dict[str, Any] = {"source": "images", "path": str(rel)}
            if cls is not None:
                meta["class_name"] = cls
            key = keys.key(str(rel.with_suffix("")).replace("/", "_"))
            yield Item(key, split, image, rgb, index[cls] if cls is not None else -1, meta)

    return len(files), items()


# ---------------------------------------------------------------------------- model
class DepthModel:
    """A Hugging Face depth-estimation model and its image processor, run in batches.

    Args:
        model: hub id or local folder.
        device: ``cpu``, ``cuda``, ... (``auto``: CUDA when available).
        dtype: ``float32``, ``float16`` or ``bfloat16``.
        kind: ``auto``, ``disparity`` or ``depth`` (what the model predicts, see :func:`output_kind`).
        depth_range: ``R`` of :func:`disparity_to_depth`.
    """

    def __init__(
        self, model: str, device: str = "auto", dtype: str = "float32", kind: str = "auto", depth_range: float = 10.0
    ) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)

        def load() -> tuple[Any, Any]:
            return AutoImageProcessor.from_pretrained(model), AutoModelForDepthEstimation.from_pretrained(model)

        if Path(model).is_dir():
            processor, network = load()
        else:  # a hub id: downloaded, or read from the cache when the hub cannot be reached
            advice = (
                f"Download it where there is network (`hf download {model} --local-dir DIR`), copy DIR here "
                "and pass --model DIR."
            )
            processor, network = fetch_pretrained(load, f"the files of depth model {model}", advice)
        self.processor = processor
        self.model = network.to(self.device, self.dtype).eval()
        self.kind = output_kind(self.model, kind)
        self.depth_range = depth_range

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[np.ndarray]:
        """Depth-like maps (larger = farther), float32 ``[H, W]`` at each image's own size.

        Each image is prepared by the processor alone, then the model runs once per size the processor gave (a
        processor that keeps the aspect ratio, as Depth Anything's, gives photos of other shapes other sizes,
        which one batch cannot stack)."""
        pixels = [self.processor(images=[image], return_tensors="pt")["pixel_values"][0] for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape), []).append(i)
        out: list[np.ndarray] = [np.empty(0, np.float32)] * len(images)
        for indices in groups.values():
            batch = [images[i] for i in indices]
            maps = self._predict(torch.stack([pixels[i] for i in indices]), [(im.height, im.width) for im in batch])
            for i, depth in zip(indices, maps):
                out[i] = depth
        return out

    def _predict(self, pixel_values: Tensor, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        """The depth-like maps of a batch of processed images of one size, at ``sizes`` (``(height, width)``)."""
        outputs = self.model(pixel_values=pixel_values.to(self.device, self.dtype))
        post = getattr(self.processor, "post_process_depth_estimation", None)
        if callable(post):
            maps = [d["predicted_depth"] for d in post(outputs, target_sizes=sizes)]
        else:
            pred = outputs.predicted_depth
            maps = [
                F.interpolate(p[None, None].float(), size=s, mode="bicubic", align_corners=False)[0, 0]
                for p, s in zip(pred, sizes)
            ]
        out = []
        for m in maps:
            m = m.float()
            depth = disparity_to_depth(m, self.depth_range) if self.kind == "disparity" else m.clamp(min=1e-6)
            out.append(depth.cpu().numpy().astype(np.float32))
        return out


# ---------------------------------------------------------------------------- scenes
def _sample_at(depth: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """``depth`` at pixel positions ``uv`` ``[N, 2]`` (pixel centres at +0.5: the pixel ``floor(u), floor(v)``);
    0 outside the image."""
    h, w = depth.shape
    cols, rows = np.floor(uv[:, 0]).astype(int), np.floor(uv[:, 1]).astype(int)
    inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
    out = np.zeros(len(uv), dtype=np.float64)
    out[inside] = depth[rows[inside], cols[inside]]
    return out


def fit_to_points(depth: np.ndarray, uvz: np.ndarray, kind: str, min_points: int = MIN_POINTS) -> np.ndarray | None:
    """``depth`` (depth-like, larger = farther) scaled to the z-depth of sparse points ``uvz`` ``[N, 3]`` seen in
    the view, or ``None`` with fewer than ``min_points`` usable points.

    ``kind`` ``disparity``: an affine map in inverse depth (``1/z = a/d + b``, least squares; the map the model's
    unknown scale and shift allow), kept when it is positive over the view; otherwise, and for ``depth`` models, the
    median ratio ``z / d`` (scale only)."""
    predicted = _sample_at(depth, uvz[:, :2])
    ok = (predicted > 0) & (uvz[:, 2] > 0)
    if ok.sum() < min_points:
        return None
    d, z = predicted[ok], uvz[ok, 2]
    if kind == "disparity":
        a, b = np.linalg.lstsq(np.column_stack([1.0 / d, np.ones_like(d)]), 1.0 / z, rcond=None)[0]
        inverse = a / np.maximum(depth, 1e-6) + b
        if a > 0 and inverse.min() > 0:
            return (1.0 / inverse).astype(np.float32)
    return (depth * float(np.median(z / d))).astype(np.float32)


def annotate_scene(
    raw: dict[str, Any], model: DepthModel, batch_size: int, model_name: str
) -> tuple[dict[str, Any], str, str | None]:
    """A multi-view scene with pseudo depth for every view (see the module docstring): the record to write, how
    its depth was aligned (``sparse points`` or ``per scene``) and a note (views left without depth), or ``None``."""
    scene = parse_scene(raw)
    images = [decode_rgb(raw, image_field(raw, v), scene.size) for v in range(scene.num_views)]
    depths: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        depths.extend(model(images[start : start + batch_size]))
    sparse = parse_sparse_depth(raw, scene.num_views) if scene.cameras is not None else None
    note = None
    if sparse is not None:
        fitted = [fit_to_points(d, sparse[sparse[:, 0] == v, 1:], model.kind) for v, d in enumerate(depths)]
        missing = [v for v, d in enumerate(fitted) if d is None]
    if sparse is not None and len(missing) < len(depths):
        depths = [np.zeros_like(depths[v]) if d is None else d for v, d in enumerate(fitted)]
        alignment, depth_kind = "sparse points", "metric"
        if missing:
            note = f"view(s) {missing[:8]} see fewer than {MIN_POINTS} sparse points: left without depth"
    else:
        valid = np.concatenate([d[d > 0] for d in depths])
        scale = float(np.median(valid)) if valid.size else 1.0
        depths = [(d / scale).astype(np.float32) for d in depths]
        alignment, depth_kind = "per scene", "relative"
        if sparse is not None:
            note = f"no view sees {MIN_POINTS} sparse points: depth normalised per scene (relative)"
    record = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
    record = {k: v for k, v in record.items() if not k.endswith(DEPTH_SUFFIX)}
    depth_scale = depth_scale_for(depths)
    for v, d in enumerate(depths):
        record[view_field(v, DEPTH_SUFFIX)] = encode_depth(d, depth_scale)
    meta = dict(scene.meta, depth_kind=depth_kind)
    meta["pseudo_depth"] = {"model": model_name, "kind": model.kind, "aligned": alignment}
    if scene.cameras is not None:
        cameras = json.loads(raw[CAMERAS_FIELD])
        cameras["depth_scale"] = depth_scale
        record[CAMERAS_FIELD] = json.dumps(cameras).encode()
        meta.pop("depth_scale", None)
    else:
        meta["depth_scale"] = depth_scale
    record[META_FIELD] = json.dumps(meta).encode()
    return record, alignment, note


# ---------------------------------------------------------------------------- annotation
@dataclass
class PseudoDepthReport:
    """What :func:`annotate_pseudo_depth` wrote: samples in all, how many got new depth, what the model predicts
    (``disparity`` or ``depth``), per split ``(samples, shards, url)``, the multi-view scenes by alignment
    (``sparse points``, ``per scene``) and notes ``(key, note)``."""

    written: int
    annotated: int
    kind: str
    splits: dict[str, tuple[int, int, str]]
    scenes: dict[str, int] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)

    def summary(self, model: str, out: str) -> str:
        lines = [f"{self.written} samples written ({self.annotated} annotated with {model}, kind {self.kind}) to {out}"]
        if self.scenes:
            aligned = ", ".join(f"{n} {how}" for how, n in sorted(self.scenes.items()))
            lines.append(f"  scenes' depth scaled to: {aligned}".replace("to: ", "to ", 1))
        lines += [
            f"  {split}: {n} samples in {shards} shard(s): {url}" for split, (n, shards, url) in self.splits.items()
        ]
        lines += [f"  note: {key}: {note}" for key, note in self.notes[:20]]
        return "\n".join(lines)


def _sink(sinks: dict[str, ShardSink], split: str, out: str | Path, shard_size: int, image_format: str,
          overwrite: bool) -> ShardSink:  # fmt: skip
    if split not in sinks:
        sinks[split] = ShardSink(out, split, shard_size, image_format=image_format, overwrite=overwrite)
    return sinks[split]


def _flush(batch: list[Item], model: DepthModel, sinks: dict[str, ShardSink], out: str | Path, model_name: str,
           replace: bool, shard_size: int, image_format: str, overwrite: bool) -> None:  # fmt: skip
    todo = [it for it in batch if it.depth is None or replace]
    for item, depth in zip(todo, model([it.rgb for it in todo]) if todo else []):
        item.depth, item.depth_scale, item.depth_kind = depth, None, "relative"
        item.meta["pseudo_depth"] = {"model": model_name, "kind": model.kind}
    for item in batch:
        _sink(sinks, item.split, out, shard_size, image_format, overwrite).write(
            ImageSample(
                key=item.key,
                image=item.image,
                depth=item.depth,
                mask=item.mask,
                label=item.label,
                meta=item.meta,
                depth_scale=item.depth_scale,
                depth_kind=item.depth_kind,
            )
        )


def annotate_pseudo_depth(
    src: str,
    out: str | Path,
    model: str,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "float32",
    output_kind: str = "auto",
    disparity_range: float = 10.0,
    split: str = "train",
    shard_size: int = 1000,
    image_format: str = "jpg",
    replace: bool = False,
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> PseudoDepthReport:
    """Annotate ``src`` (shards or an image folder) with the pseudo depth of ``model`` into ``out``.

    Args:
        src: shards of single-view samples and multi-view scenes (brace pattern, glob, or a folder of ``.tar``
            files) or a folder of images.
        out: output folder for the annotated shards.
        model: Hugging Face depth-estimation model: hub id or local folder (Depth Anything, DPT, ...).
        batch_size: images per batch (one model call per input size the processor gives them).
        device: ``cpu``, ``cuda``, ``cuda:1``, ... (``auto``: CUDA when available).
        dtype: model precision (``float32``, ``float16``, ``bfloat16``).
        output_kind: what the model predicts (``auto``, ``disparity``, ``depth``; see :func:`output_kind`).
        disparity_range: far/near ratio of the depth stored for disparity models.
        split: output shard prefix for image folders and for shards whose names carry none.
        shard_size: samples per output shard.
        image_format: encoding of images that cannot pass through unchanged.
        replace: re-annotate samples (and scenes) that already have depth.
        limit: annotate at most this many samples (a scene counts once).
        overwrite: replace existing output shards of the same split.
        progress: show a progress bar.
    """
    if _is_shard_source(src):
        total: int | None = None
        items: Iterator[Item | SceneItem] = iter_shards(src, split)
    else:
        if not Path(src).is_dir():
            raise FileNotFoundError(f"SRC {src} is neither shards nor a folder of images")
        total, items = iter_folder(src, split)  # type: ignore[assignment]
    if limit is not None and total is not None:
        total = min(total, limit)
    depth_model = DepthModel(model, device, dtype, output_kind, disparity_range)
    sinks: dict[str, ShardSink] = {}
    batch: list[Item] = []
    count = annotated = 0
    report = PseudoDepthReport(0, 0, depth_model.kind, {})
    options = dict(out=out, model_name=model, replace=replace, shard_size=shard_size, image_format=image_format,
                   overwrite=overwrite)  # fmt: skip
    with tqdm(total=total, unit="sample", desc="pseudo depth", disable=not progress) as bar:
        for item in items:
            if limit is not None and count >= limit:
                break
            count += 1
            if isinstance(item, SceneItem):
                if batch:  # the samples before it are written before it: the order stays
                    _flush(batch, depth_model, sinks, **options)
                    bar.update(len(batch))
                    batch = []
                sink = _sink(sinks, item.split, out, shard_size, image_format, overwrite)
                has_depth = any(k.endswith(DEPTH_SUFFIX) for k in item.raw)
                if has_depth and not replace:
                    sink.write({k: v for k, v in item.raw.items() if not k.startswith("__") or k == "__key__"})
                else:
                    record, alignment, note = annotate_scene(item.raw, depth_model, batch_size, model)
                    sink.write(record)
                    annotated += 1
                    report.scenes[alignment] = report.scenes.get(alignment, 0) + 1
                    if note:
                        report.notes.append((record["__key__"], note))
                bar.update(1)
                continue
            annotated += int(item.depth is None or replace)
            batch.append(item)
            if len(batch) == batch_size:
                _flush(batch, depth_model, sinks, **options)
                bar.update(len(batch))
                batch = []
        if batch:
            _flush(batch, depth_model, sinks, **options)
            bar.update(len(batch))
    for sink in sinks.values():
        sink.close()
    report.written, report.annotated = count, annotated
    report.splits = {name: (sink.count, len(sink.shards), sink.url) for name, sink in sinks.items()}
    return report
