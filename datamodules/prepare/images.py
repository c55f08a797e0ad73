"""An image folder into single-view shards (class = first-level sub-folder name, like torchvision's
ImageFolder; sorted names give the indices; images directly in a folder without sub-folders get label -1):
``selfsup3d data convert images``.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup3d.datamodules.format import ImageSample, SampleKeys, ShardSink, encode_image_sample, upright
from selfsup3d.datamodules.prepare.frames import IMAGE_SUFFIXES, fit_size, load_image, prepare_image
from selfsup3d.datamodules.prepare.writer import ConvertReport, Unit, converter_options, pool_map, write_units


def _image_unit(args: tuple[Path, str, int, str | None, dict[str, Any]]) -> Unit:
    path, key, label, class_name, opts = args
    unit = Unit(None)
    try:
        image, data = load_image(path)
        image = upright(image)
        prepared, mask = prepare_image(image, data, fit_size(image.size, opts["max_size"]), opts["background"])
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
    opts = converter_options(max_size, None, 1, background, image_format)
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
    keys = SampleKeys()
    jobs = [
        (path, keys.key(str(path.relative_to(src_path).with_suffix(""))), label, class_name, opts)
        for path, label, class_name in files
    ]
    sink = ShardSink(out, split, samples_per_shard=samples_per_shard, image_format=image_format, overwrite=overwrite)
    return write_units(pool_map(_image_unit, jobs, workers, "convert images", progress), report, sink)


class _RelativeTo:
    """``path -> str(path relative to root)``, picklable for worker processes."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)
