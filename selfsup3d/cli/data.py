"""``selfsup3d data ...``: build WebDataset shards in the selfsup3d format (``docs/shard-format.md``).

::

    selfsup3d data render --out DIR [--train-scenes N --val-scenes N --views V --size S --seed S]
                                    [--trajectory sphere|orbit --arc DEG]
    selfsup3d data convert blender SRC --out DIR     NeRF/Blender transforms*.json scenes
    selfsup3d data convert colmap SRC --out DIR      COLMAP text models with their images
    selfsup3d data convert images SRC --out DIR      an image folder (class = sub-folder), single-view
    selfsup3d data convert video SRC --out DIR       videos -> unposed clips (resumable, --part i/n)
    selfsup3d data convert frames SRC --out DIR      folders of ordered frames -> unposed clips (the same)
    selfsup3d data convert re10k SRC --out DIR       pixelSplat's RealEstate10K/ACID .torch chunks (resumable)
    selfsup3d data convert lvsm SRC --out DIR        LVSM's or RayZer's per-scene JSON (the same)
    selfsup3d data convert dl3dv SRC --out DIR       DL3DV nerfstudio transforms.json, undistorted (the same)
    selfsup3d data convert co3d SRC --out DIR        CO3Dv2 annotations with depth (the same)
    selfsup3d data pseudo-depth ...                  monocular depth for single-view shards and scenes

``selfsup3d.cli`` dispatches ``selfsup3d data ARGS`` to :func:`main` before LightningCLI parses anything.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from selfsup3d.datamodules.format import IMAGE_EXTENSIONS
from selfsup3d.datamodules.prepare import (
    blender,
    co3d,
    colmap,
    dl3dv,
    images,
    lvsm,
    pseudo_depth,
    re10k,
    sequences,
    video,
)
from selfsup3d.datamodules.prepare.clips import SHOT_DETECTORS, STORES, ClipOptions, parse_size
from selfsup3d.datamodules.prepare.journal import RunOptions, SceneOptions
from selfsup3d.datamodules.prepare.render import RenderSettings, render_dataset


def _add_output_arguments(parser: argparse.ArgumentParser, shard_size: int, image_format: str) -> None:
    parser.add_argument("--out", required=True, help="output folder for the .tar shards")
    parser.add_argument("--shard-size", type=int, default=shard_size, help="samples per shard (default %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing shards of the same split")
    parser.add_argument(
        "--image-format",
        choices=[e for e in IMAGE_EXTENSIONS if e != "jpeg"],
        default=image_format,
        help="encoding of re-encoded images (default %(default)s)",
    )
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _render(args: argparse.Namespace) -> int:
    settings = RenderSettings(
        num_views=args.views,
        size=args.size,
        seed=args.seed,
        trajectory=args.trajectory,
        arc_deg=args.arc,
        plane_probability=args.plane_probability,
        room_probability=args.room_probability,
    )
    info = render_dataset(
        args.out,
        train_scenes=args.train_scenes,
        val_scenes=args.val_scenes,
        settings=settings,
        scenes_per_shard=args.shard_size,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    total = sum(s["scenes"] for s in info["splits"].values())
    print(
        f"rendered {total} scenes in {info['seconds']} s ({info['scenes_per_second']} scenes/s); "
        f"{len(info['class_names'])} classes, see {args.out}/info.json"
    )
    for split, s in info["splits"].items():
        print(f"  {split}: {s['scenes']} scenes in {s['shards']} shard(s): {s['url']}")
    return 0


def _parse_background(text: str) -> tuple[int, int, int]:
    named = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128), "gray": (128, 128, 128)}
    if text.lower() in named:
        return named[text.lower()]
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f"expected white, black, grey or R,G,B in 0..255, got {text!r}")
    return values  # type: ignore[return-value]


_PAPER_CONVERTERS = {
    "re10k": re10k.convert_re10k,
    "lvsm": lvsm.convert_lvsm,
    "dl3dv": dl3dv.convert_dl3dv,
    "co3d": co3d.convert_co3d,
}


def _convert_paper(args: argparse.Namespace) -> int:
    """``convert re10k|lvsm|dl3dv|co3d``: posed scenes, resumable and by parts."""
    extra = {"dl3dv": ("images",), "co3d": ("set_list", "subset", "min_quality")}.get(args.source, ())
    scenes = SceneOptions(args.max_size, args.max_views, args.min_views, args.image_format, args.shard_size)
    run = RunOptions(args.part, args.workers, args.overwrite, not args.no_progress)
    kwargs = {name: getattr(args, name) for name in extra}
    report = _PAPER_CONVERTERS[args.source](args.src, args.out, args.split, scenes=scenes, run=run, **kwargs)
    print(report.summary())
    return 0 if report.written else 1


def _convert(args: argparse.Namespace) -> int:
    if args.source in _PAPER_CONVERTERS:
        return _convert_paper(args)
    if args.source in ("video", "frames"):
        clips = ClipOptions(
            args.clip_frames,
            args.size,
            args.max_clips,
            args.image_format,
            args.quality,
            args.shot_threshold,
            args.still_threshold,
            args.duplicate_threshold,
            args.store,
            args.crf,
            args.shot_detector,
        )
        clip_args = dict(
            split=args.split,
            clips=clips,
            scenes_per_shard=args.shard_size,
            part=args.part,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        if args.source == "video":
            report = video.convert_video(args.src, args.out, fps=args.fps, **clip_args)
        else:
            report = sequences.convert_frames(args.src, args.out, stride=args.stride, fps=args.fps, **clip_args)
        print(report.summary())
        return 0 if report.written else 1
    common = dict(
        split=args.split,
        max_size=args.max_size,
        image_format=args.image_format,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if args.source == "blender":
        report = blender.convert_blender(
            args.src,
            args.out,
            scenes_per_shard=args.shard_size,
            max_views=args.max_views,
            min_views=args.min_views,
            background=args.background,
            **common,
        )
    elif args.source == "colmap":
        report = colmap.convert_colmap(
            args.src,
            args.out,
            images=args.images,
            refuse_distortion=args.refuse_distortion,
            scenes_per_shard=args.shard_size,
            max_views=args.max_views,
            min_views=args.min_views,
            **common,
        )
    else:
        report = images.convert_images(
            args.src,
            args.out,
            samples_per_shard=args.shard_size,
            background=args.background,
            shuffle=not args.no_shuffle,
            seed=args.seed,
            **common,
        )
    print(report.summary())
    return 0 if report.written else 1


def _size(text: str) -> tuple[int, int]:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_clip_parsers(kinds: argparse._SubParsersAction) -> None:
    """``convert video`` and ``convert frames``: unposed clips, resumable and by parts
    (:mod:`~selfsup3d.datamodules.prepare.video`, :mod:`~selfsup3d.datamodules.prepare.sequences`)."""
    clips_help = (
        "Frames are resized to cover --size and centre-cropped, cut into clips of --clip-frames consecutive frames "
        "(one unposed scene each: no cameras.json); shot changes split clips, still and near-duplicate clips are "
        "dropped and counted. An interrupted run resumes where it stopped when run again (same shards, byte for "
        "byte); --part i/n converts one of n parts (e.g. a SLURM array job), each into its own shards."
    )
    video_parser = kinds.add_parser(
        "video",
        help="videos (a file, a folder, or a list file) as unposed clips of frames (PyAV)",
        description="SRC is a video, a folder of videos (searched recursively) or a .txt list of them. Frames are "
        "resampled to --fps by their timestamps. Unreadable, truncated or unsupported files are listed as skipped "
        "(or cut short, keeping what decoded). " + clips_help,
    )
    video_parser.add_argument("--fps", type=float, default=10.0, help="target frame rate (default %(default)s)")
    frames_parser = kinds.add_parser(
        "frames",
        help="folders of ordered frames (one per sequence, natural sort) as unposed clips",
        description="SRC is a folder of frames (one sequence) or a folder whose sub-folders are sequences. "
        + clips_help,
    )
    frames_parser.add_argument("--stride", type=int, default=1, help="keep every n-th frame (default %(default)s)")
    frames_parser.add_argument("--fps", type=float, default=None, help="frame rate of the kept frames, when known")
    for p in (video_parser, frames_parser):
        p.add_argument("src", help="source: see above")
        p.add_argument("--split", default="train", help="shard name prefix (default %(default)s)")
        p.add_argument("--clip-frames", type=int, default=24, help="frames (views) per clip (default %(default)s)")
        p.add_argument("--size", type=_size, default=(256, 256), help="view size, N or WxH (default 256)")
        p.add_argument("--max-clips", type=int, default=None, help="at most this many clips per input (the first)")
        p.add_argument("--quality", type=int, default=90, help="JPEG/WebP quality (default %(default)s)")
        p.add_argument(
            "--shot-detector",
            choices=list(SHOT_DETECTORS),
            default="difference",
            help="difference: the mean difference of consecutive frames' grey thumbnails (cheap); scenedetect: "
            "PySceneDetect's ContentDetector (hue, saturation, brightness; pip install 'selfsup3d[scenedetect]') "
            "(default %(default)s)",
        )
        p.add_argument(
            "--shot-threshold",
            type=float,
            default=None,
            help="a larger score of --shot-detector between consecutive frames is a shot change; 0: no shot test "
            "(default: 40 for difference, on 0-255; 27 for scenedetect, its own default)",
        )
        still = "drop clips whose frames all stay this close to the first; 0: keep them (default %(default)s)"
        p.add_argument("--still-threshold", type=float, default=1.5, help=still)
        duplicate = "drop clips this close to an earlier clip of the same input; 0: keep them (default %(default)s)"
        p.add_argument("--duplicate-threshold", type=float, default=2.0, help=duplicate)
        p.add_argument(
            "--store",
            choices=STORES,
            default="frames",
            help="frames: one --image-format image per view; mp4: each clip as one H.264 MP4 member, decoded "
            "by the loader into the same views (smaller shards, more CPU per sample; even --size) (default "
            "%(default)s)",
        )
        p.add_argument("--crf", type=int, default=18, help="x264 quality of --store mp4: 0 lossless .. 51 (default "
                       "%(default)s)")  # fmt: skip
        p.add_argument("--part", default=None, help="i/n: convert part i of n (1-based), into its own shards")
        _add_output_arguments(p, shard_size=64, image_format="jpg")
        p.set_defaults(func=_convert)


def _add_paper_parsers(kinds: argparse._SubParsersAction) -> None:
    """``convert re10k|lvsm|dl3dv|co3d``: the papers' data sets as posed scenes, resumable and by parts
    (:mod:`~selfsup3d.datamodules.prepare.re10k`, ``lvsm``, ``dl3dv``, ``co3d``)."""
    common = (
        " Views keep capture order (view i is frame i of the source unless --max-views subsamples). An interrupted "
        "run resumes where it stopped when run again; --part i/n converts one of n parts into its own shards."
    )
    parsers = {
        "re10k": kinds.add_parser(
            "re10k",
            help="RealEstate10K/ACID in pixelSplat's .torch chunks (JPEG bytes, 18-number cameras)",
            description="SRC is a .torch chunk or a folder of them (recursive): lists of scene dicts with key, "
            "cameras [N, 18] (fx fy cx cy normalised by the image size, 2 unused, 3x4 world-to-camera, OpenCV "
            "axes) and images (JPEG bytes, copied unchanged)." + common,
        ),
        "lvsm": kinds.add_parser(
            "lvsm",
            help="LVSM's or RayZer's per-scene JSON (full_list.txt, a folder, or one file)",
            description="SRC is full_list.txt, a folder of scene JSON files (recursive) or one. Frames are "
            "{image_path, fxfycxcy, w2c} (LVSM) or {file_path, w, h, fx, fy, cx, cy, w2c} (RayZer); w2c in OpenCV "
            "axes; image paths absolute or relative to the JSON's folder or its parent." + common,
        ),
        "dl3dv": kinds.add_parser(
            "dl3dv",
            help="DL3DV scenes: nerfstudio transforms.json (OpenGL, applied_transform, k1 k2 p1 p2)",
            description="SRC is a scene (transforms.json or nerfstudio/transforms.json) or a folder of them. "
            "applied_transform is read, checked and undone; lens distortion is undone (kornia); intrinsics are "
            "rescaled to the images read (--images images_4)." + common,
        ),
        "co3d": kinds.add_parser(
            "co3d",
            help="CO3Dv2: frame/sequence annotations (PyTorch3D cameras), images and float16 depth",
            description="SRC is the CO3D root or one category. PyTorch3D row-vector cameras with NDC intrinsics "
            "(ndc_norm_image_bounds or ndc_isotropic) become pixel K and OpenCV c2w; depth PNGs hold float16 bit "
            "patterns (times scale_adjustment, masked by the depth masks)." + common,
        ),
    }
    for p in parsers.values():
        p.add_argument("src", help="source: see above")
        p.add_argument("--split", default="train", help="shard name prefix (default %(default)s)")
        p.add_argument("--max-size", type=int, default=None, help="downscale so the longer side is at most this")
        p.add_argument("--max-views", type=int, default=None, help="at most this many views per scene, evenly spread")
        p.add_argument("--min-views", type=int, default=2, help="skip scenes with fewer views (default %(default)s)")
        p.add_argument("--part", default=None, help="i/n: convert part i of n (1-based), into its own shards")
        _add_output_arguments(p, shard_size=16, image_format="jpg")
        p.set_defaults(func=_convert)
    parsers["dl3dv"].add_argument(
        "--images", default=None, help="image folder read instead of file_path's first folder (e.g. images_4)"
    )
    co3d_parser = parsers["co3d"]
    co3d_parser.add_argument("--set-list", default=None, help="convert the frames of set_lists_NAME.json only")
    co3d_parser.add_argument("--subset", default=None, help="train, val or test of the set list (default: --split)")
    co3d_parser.add_argument(
        "--min-quality", type=float, default=None, help="skip sequences with a lower viewpoint_quality_score"
    )


def _add_pseudo_depth_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``selfsup3d data pseudo-depth``
    (:func:`~selfsup3d.datamodules.prepare.pseudo_depth.annotate_pseudo_depth`)."""
    parser.add_argument(
        "src", help="shards of images or scenes (brace pattern, glob, a folder of .tar files) or an image folder"
    )
    parser.add_argument("--out", required=True, help="output folder for the annotated shards")
    parser.add_argument(
        "--model",
        required=True,
        help="Hugging Face depth-estimation model: hub id or local folder (Depth Anything, DPT, ...)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="images per batch, run in one model call per input size the processor gives them, so photos of "
        "mixed aspect ratio work at any size (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="model precision (default %(default)s)",
    )
    parser.add_argument(
        "--output-kind",
        choices=["auto", "disparity", "depth"],
        default="auto",
        help="what the model predicts; auto: disparity for DPT and relative Depth Anything, depth otherwise",
    )
    parser.add_argument(
        "--disparity-range",
        type=float,
        default=10.0,
        help="far/near ratio of the depth stored for disparity models (default %(default)s)",
    )
    parser.add_argument(
        "--split",
        default="train",
        help="output shard prefix for image folders and for shards whose names carry none (default %(default)s)",
    )
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per output shard (default %(default)s)")
    parser.add_argument(
        "--image-format",
        choices=["png", "jpg", "webp"],
        default="jpg",
        help="encoding of images that cannot pass through unchanged (default %(default)s)",
    )
    parser.add_argument("--replace", action="store_true", help="re-annotate samples that already have depth")
    parser.add_argument("--limit", type=int, default=None, help="annotate at most this many samples")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output shards of the same split")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _pseudo_depth(args: argparse.Namespace) -> int:
    """Annotate ``args.src`` into ``args.out``; errors are one line and exit status 2."""
    if args.batch_size < 1 or args.shard_size < 1:
        print("selfsup3d data pseudo-depth: --batch-size and --shard-size must be >= 1", file=sys.stderr)
        return 2
    try:
        report = pseudo_depth.annotate_pseudo_depth(
            args.src,
            args.out,
            args.model,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            output_kind=args.output_kind,
            disparity_range=args.disparity_range,
            split=args.split,
            shard_size=args.shard_size,
            image_format=args.image_format,
            replace=args.replace,
            limit=args.limit,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (FileExistsError, FileNotFoundError, ValueError, OSError) as err:
        print(f"selfsup3d data pseudo-depth: error: {err}", file=sys.stderr)
        return 2
    print(report.summary(args.model, args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``selfsup3d data`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="selfsup3d data",
        description="Build WebDataset shards in the selfsup3d format (docs/shard-format.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{render,convert,pseudo-depth}")

    render = sub.add_parser(
        "render",
        help="render the embedded multi-view data set from pybullet's assets (CPU, no download)",
        description="Render multi-view scenes of pybullet's assets with its CPU renderer: train and val splits "
        "by asset, depth, masks, class labels. Deterministic for a seed.",
    )
    render.add_argument("--train-scenes", type=int, default=512, help="training scenes (default %(default)s)")
    render.add_argument("--val-scenes", type=int, default=64, help="validation scenes (default %(default)s)")
    render.add_argument("--views", type=int, default=8, help="views per scene (default %(default)s)")
    render.add_argument("--size", type=int, default=64, help="image width and height (default %(default)s)")
    render.add_argument("--seed", type=int, default=0, help="random seed (default %(default)s)")
    render.add_argument(
        "--trajectory",
        choices=["sphere", "orbit"],
        default="sphere",
        help="sphere: views spread over the full circle; orbit: views in order along an arc (default %(default)s)",
    )
    render.add_argument(
        "--arc", type=float, default=360.0, help="the orbit's arc in degrees, 360 = closed loop (default %(default)s)"
    )
    render.add_argument(
        "--plane-probability",
        type=float,
        default=0.5,
        help="share of scenes on a ground plane; the others on a solid background (default %(default)s)",
    )
    render.add_argument(
        "--room-probability",
        type=float,
        default=0.0,
        help="share of scenes in a room of procedurally textured ground and walls, drawn first (default %(default)s)",
    )
    _add_output_arguments(render, shard_size=128, image_format="png")
    render.set_defaults(func=_render)

    convert = sub.add_parser(
        "convert",
        help="convert Blender/NeRF scenes, COLMAP models or an image folder into shards",
        description="Convert data you have into selfsup3d shards; prints what was written and what was skipped.",
    )
    kinds = convert.add_subparsers(
        dest="source", required=True, metavar="{blender,colmap,images,video,frames,re10k,lvsm,dl3dv,co3d}"
    )
    blender = kinds.add_parser(
        "blender",
        help="NeRF/Blender scenes: transforms*.json (OpenGL c2w, camera_angle_x or fl_x/fl_y/cx/cy) + images",
        description="SRC is a scene folder with transforms*.json (train/val/test files are merged into one "
        "scene) or a folder of such scenes. RGBA images are composited over --background; alpha becomes the mask.",
    )
    colmap = kinds.add_parser(
        "colmap",
        help="COLMAP text models (cameras.txt, images.txt) with their images/ folder",
        description="SRC holds sparse/0/ (or sparse/, or the text files) and images/, or is a folder of such "
        "scenes. Camera models: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV. Lens distortion is "
        "ignored (the pinhole part is kept) and reported, unless --refuse-distortion skips those views.",
    )
    images = kinds.add_parser(
        "images",
        help="an image folder as single-view samples (class = sub-folder name, like ImageFolder)",
        description="SRC/<class>/**/*.jpg|png|... get the sorted class index as label; a SRC without "
        "sub-folders gives label -1.",
    )
    for p, shard_size, fmt in ((blender, 16, "png"), (colmap, 16, "jpg"), (images, 1000, "jpg")):
        p.add_argument("src", help="source folder")
        p.add_argument("--split", default="train", help="shard name prefix (default %(default)s)")
        p.add_argument("--max-size", type=int, default=None, help="downscale so the longer side is at most this")
        _add_output_arguments(p, shard_size=shard_size, image_format=fmt)
        p.set_defaults(func=_convert)
    _add_clip_parsers(kinds)
    _add_paper_parsers(kinds)
    for p in (blender, colmap):
        p.add_argument("--max-views", type=int, default=None, help="at most this many views per scene, evenly spread")
        p.add_argument("--min-views", type=int, default=2, help="skip scenes with fewer views (default %(default)s)")
    for p in (blender, images):
        p.add_argument(
            "--background",
            type=_parse_background,
            default=(255, 255, 255),
            help="colour under transparent pixels: white, black, grey or R,G,B (default white)",
        )
    colmap.add_argument("--images", default="images", help="image folder name in each scene (default %(default)s)")
    colmap.add_argument("--refuse-distortion", action="store_true", help="skip views with lens distortion")
    images.add_argument("--no-shuffle", action="store_true", help="keep the sorted order (default: shuffled)")
    images.add_argument("--seed", type=int, default=0, help="seed of the shuffled order (default %(default)s)")

    annotate = sub.add_parser(
        "pseudo-depth",
        help="monocular pseudo depth for single-view samples and multi-view scenes (COLMAP captures, video)",
        description=(pseudo_depth.__doc__ or "").strip().split("\n")[0],
    )
    _add_pseudo_depth_arguments(annotate)
    annotate.set_defaults(func=_pseudo_depth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``selfsup3d data``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileExistsError, FileNotFoundError, ValueError, ImportError) as err:
        parser.exit(2, f"selfsup3d data {args.command}: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
