"""Test videos made with PyAV (``from videos import ...``): synthetic moving scenes nobody recorded, in several
codecs and containers, with shot changes, still stretches and truncated files.

A scene is a smooth random texture (seeded) seen through a window that pans across it, with a bright square
moving over it: consecutive frames differ a little, different seeds differ a lot.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

CODECS = {".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9", ".avi": "mpeg4", ".mov": "mpeg4"}


def texture(seed: int, size: int = 256) -> np.ndarray:
    """A smooth random RGB texture ``[size, size, 3]`` uint8 (upsampled noise)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(8, 8, 3)).astype(np.float32)
    fine = np.kron(coarse, np.ones((size // 8, size // 8, 1), np.float32))
    blur = sum(np.roll(np.roll(fine, dy, 0), dx, 1) for dy in range(-8, 9, 4) for dx in range(-8, 9, 4)) / 25
    return np.clip(blur + rng.normal(0, 6, fine.shape), 0, 255).astype(np.uint8)


def scene_frames(num_frames: int, width: int, height: int, seed: int = 0, speed: float = 1.5) -> list[np.ndarray]:
    """``num_frames`` frames ``[height, width, 3]`` of a pan across texture ``seed`` (``speed`` pixels a frame;
    0: a still scene)."""
    tex = texture(seed, max(256, 2 * max(width, height)))
    frames = []
    for t in range(num_frames):
        x = int(round(t * speed)) % (tex.shape[1] - width)
        frame = tex[20 : 20 + height, x : x + width].copy()
        side = max(4, height // 6)
        sx = int((t * 2 * speed) % max(1, width - side)) if speed else width // 3
        frame[height // 3 : height // 3 + side, sx : sx + side] = (255, 240, 40)
        frames.append(frame)
    return frames


def write_video(path: Path, frames: list[np.ndarray], fps: int = 30, codec: str | None = None) -> Path:
    """Write ``frames`` as a video (codec by the file type, see :data:`CODECS`); returns ``path``."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec or CODECS[path.suffix], rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, fps)
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    """Cut ``path`` to ``fraction`` of its bytes (a download or copy that stopped)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def video_folder(root: Path, size: tuple[int, int] = (96, 64), seconds: float = 3.0) -> dict[str, Path]:
    """A folder as a user might have it: an MP4 (H.264), a WebM (VP9) with a shot change, an AVI (MPEG-4 part 2)
    whose second half is still, a truncated MP4 and a text file. Returns the paths by role."""
    w, h = size
    n = int(seconds * 30)
    paths = {
        "mp4": write_video(root / "walk.mp4", scene_frames(n, w, h, seed=1)),
        "webm": write_video(root / "trip" / "cut.webm", scene_frames(n // 2, w, h, 2) + scene_frames(n // 2, w, h, 3)),
        "avi": write_video(root / "still.avi", scene_frames(n // 2, w, h, 4) + scene_frames(n // 2, w, h, 5, 0.0)),
        "truncated": truncate(write_video(root / "broken.mp4", scene_frames(n, w, h, seed=6))),
    }
    (root / "notes.txt").write_text("filmed on a phone\n")
    paths["notes"] = root / "notes.txt"
    return paths
