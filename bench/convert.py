"""Frames per second of ``selfsup3d data convert video`` against a plain PyAV decode-and-encode loop, and scenes per
second of ``convert re10k``, ``lvsm``, ``dl3dv`` and ``co3d``.

Both read the same videos (made here with PyAV: H.264 MP4, 640x360 at 30 fps, moving scenes), take frames at the
same rate, resize them (FFmpeg's area scaler) to cover the same size, centre-crop and JPEG-encode them (Pillow,
same quality), one process and one decoding thread each, so the ratio is per core. The converter does the rest
of its work besides (thumbnails for the shot, still and duplicate tests, tar shards, the journal), which is what
the ratio measures; goal: at least 0.8.

The papers' converters run on the sources the round-trip tests write (``tests/papers.py``: 640x360 views, 4-7 per
scene, ``--copies`` times each test's scenes): RE10K chunks of JPEG bytes (copied into the shards), LVSM/RayZer
JSON with JPEG files, DL3DV PNGs undistorted with kornia (the costly part), CO3D JPEGs with float16 depth PNGs and
masks. One process (``--workers 1``), the time of the conversion alone (CPU seconds and wall seconds). Runs on the
CPU (no GPU needed)::

    python bench/convert.py [--videos 4 --seconds 8 --size 256 --fps 10 --repeats 3 --copies 4]
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np


def make_videos(folder: Path, count: int, seconds: float, width: int = 640, height: int = 360) -> list[Path]:
    """``count`` H.264 videos of a pan over a random smooth texture with a moving square."""
    import av

    paths = []
    for i in range(count):
        rng = np.random.default_rng(i)
        texture = np.kron(rng.integers(0, 256, (24, 48, 3)), np.ones((32, 32, 1))).astype(np.uint8)
        path = folder / f"video_{i}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.time_base = Fraction(1, 30)
            for t in range(int(seconds * 30)):
                frame = texture[100 : 100 + height, 2 * t : 2 * t + width].copy()
                frame[150:200, (5 * t) % (width - 50) :][:, :50] = (250, 240, 30)
                out = av.VideoFrame.from_ndarray(frame, format="rgb24")
                out.pts = t
                container.mux(stream.encode(out))
            container.mux(stream.encode(None))
        paths.append(path)
    return paths


def plain_loop(paths: list[Path], fps: float, size: int, quality: int) -> int:
    """Decode every video with PyAV, keep one frame per ``1/fps`` seconds, resize, crop, JPEG-encode; frames kept."""
    import av
    from PIL import Image

    kept = 0
    for path in paths:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            due = None
            for frame in container.decode(stream):
                if due is not None and frame.time < due - 1e-6:
                    continue
                due = (frame.time if due is None else due) + 1 / fps
                scale = size / min(frame.width, frame.height)
                w, h = round(frame.width * scale), round(frame.height * scale)
                rgb = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
                x0, y0 = (w - size) // 2, (h - size) // 2
                Image.fromarray(np.ascontiguousarray(rgb[y0 : y0 + size, x0 : x0 + size])).save(
                    io.BytesIO(), format="JPEG", quality=quality
                )
                kept += 1
    return kept


def converter(paths: list[Path], out: Path, fps: float, size: int, quality: int) -> int:
    """``convert_video`` on the same videos (one worker); frames written as views."""
    from selfsup3d.datamodules.prepare.clips import ClipOptions
    from selfsup3d.datamodules.prepare.video import convert_video

    shutil.rmtree(out, ignore_errors=True)
    clips = ClipOptions(clip_frames=8, size=(size, size), quality=quality)
    report = convert_video(paths[0].parent, out, fps=fps, clips=clips, workers=1, progress=False)
    dropped = sum(n for reason, n in report.dropped.items() if reason.startswith("frames"))
    return report.views + dropped + 8 * sum(n for reason, n in report.dropped.items() if reason.endswith("clip"))


def paper_converters(folder: Path, copies: int) -> None:
    """Scenes per second of ``convert re10k|lvsm|dl3dv|co3d`` on ``copies`` times the round-trip tests' sources."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import papers

    from selfsup3d.datamodules.prepare.co3d import convert_co3d
    from selfsup3d.datamodules.prepare.dl3dv import convert_dl3dv
    from selfsup3d.datamodules.prepare.journal import RunOptions
    from selfsup3d.datamodules.prepare.lvsm import convert_lvsm
    from selfsup3d.datamodules.prepare.re10k import convert_re10k

    sources = {
        "re10k": (lambda root, tag: papers.write_re10k(root / tag, tag), convert_re10k, {}),
        "lvsm": (papers.write_lvsm, convert_lvsm, {}),
        "dl3dv": (papers.write_dl3dv, convert_dl3dv, {"images": "images_4"}),
        "co3d": (papers.write_co3d, convert_co3d, {}),
    }
    print(f"papers' converters, {copies} copies of the round-trip tests' scenes (640x360); 1 process:")
    for name, (write, convert, options) in sources.items():
        root = folder / name
        for copy in range(copies):
            write(root, f"x{copy}")
        start, wall = time.process_time(), time.perf_counter()
        report = convert(root, folder / f"{name}_out", run=RunOptions(workers=1, progress=False), **options)
        seconds, wall = time.process_time() - start, time.perf_counter() - wall
        rates = f"{report.written / seconds:7.1f} scenes/s, {report.views / seconds:7.1f} views/s"
        print(f"  convert {name:6s} {report.written:4d} scenes ({report.views:4d} views) in {seconds:6.2f} CPU s "
              f"({wall:6.2f} s): {rates}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--videos", type=int, default=4, help="videos (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each video (default %(default)s)")
    parser.add_argument("--size", type=int, default=256, help="view size (default %(default)s)")
    parser.add_argument("--fps", type=float, default=10.0, help="target frame rate (default %(default)s)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, best kept (default %(default)s)")
    parser.add_argument("--copies", type=int, default=4, help="copies of each papers' source (default %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        paths = make_videos(folder, args.videos, args.seconds)
        decoded = args.videos * int(args.seconds * 30)
        what = f"{args.videos} H.264 videos of {args.seconds:g} s, 640x360 at 30 fps ({decoded} frames decoded)"
        print(f"{what}, kept at {args.fps:g} fps, {args.size}x{args.size} JPEG q{args.quality}; 1 process, 1 thread")
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeats):  # interleaved, so both see the same load
            for name, run in (
                ("plain PyAV loop", lambda: plain_loop(paths, args.fps, args.size, args.quality)),
                ("convert video", lambda: converter(paths, Path(tmp) / "out", args.fps, args.size, args.quality)),
            ):
                start = time.process_time()
                frames = run()
                seconds = time.process_time() - start
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, frames)
        for name, (seconds, frames) in best.items():
            print(f"  {name:16s} {frames:5d} frames kept in {seconds:6.2f} CPU s: {frames / seconds:7.1f} frames/s "
                  f"({decoded / seconds:7.1f} decoded frames/s)")  # fmt: skip
        plain = best["plain PyAV loop"][1] / best["plain PyAV loop"][0]
        ours = best["convert video"][1] / best["convert video"][0]
        print(f"convert video / plain loop, frames per CPU second: {ours / plain:.2f} (goal >= 0.8)")
        paper_converters(Path(tmp) / "papers", args.copies)
    return 0


if __name__ == "__main__":
    sys.exit(main())
