"""Known cameras for the papers' data sets' round trips (tests/test_data_papers.py): 640x360 views with an
off-centre principal point, seen from a world frame that is none of the cameras', a tilted plane for depth,
the writers of each source's files in its own convention (``write_re10k``, ``write_lvsm``, ``write_dl3dv``,
``write_co3d``; ``bench/convert.py`` times the converters on them too), and a reader of converted shards."""

from __future__ import annotations

import functools
import gzip
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfsup3d.datamodules.format import depth_to_array

WIDTH, HEIGHT = 640, 360
PLANE = (np.array([0.1, -0.2, 1.0]) / np.linalg.norm([0.1, -0.2, 1.0]), 2.5)
"""A plane ``n . X = d`` in the cameras' look-at frame (before the world motion), in front of every camera."""


def intrinsics(view: int = 0) -> np.ndarray:
    """Pixel intrinsics of 640x360 views: fx != fy, the principal point well off the centre, varying per view."""
    return np.array([[512.0 + 3 * view, 0, 337.25], [0, 498.5 + 2 * view, 171.75], [0, 0, 1]])


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


WORLD = np.eye(4)
WORLD[:3, :3] = _rotation(np.array([0.3, -1.0, 0.4]), 1.1)
WORLD[:3, 3] = [4.0, -2.5, 7.0]
"""The motion from the look-at frame to the world the source writes (no camera's frame)."""


def cameras(n: int, seed: int = 0) -> np.ndarray:
    """``[n, 4, 4]`` OpenCV camera-to-world matrices: cameras on an arc looking at the plane, in :data:`WORLD`."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        angle = -0.4 + 0.8 * i / max(1, n - 1) + 0.05 * rng.normal()
        position = np.array([2.0 * np.sin(angle), 0.3 * rng.normal(), -1.0 + 2.0 * (1 - np.cos(angle))])
        forward = np.array([0.0, 0.0, 2.5]) - position
        forward /= np.linalg.norm(forward)
        right = np.cross([0.0, 1.0, 0.0], forward)  # y down: right = down x forward
        right /= np.linalg.norm(right)
        down = np.cross(forward, right)
        c2w = np.eye(4)
        c2w[:3, :3] = np.column_stack([right, down, forward])
        c2w[:3, 3] = position
        out.append(WORLD @ c2w)
    return np.stack(out)


def plane_depth(K: np.ndarray, c2w: np.ndarray, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """Z-depth ``[H, W]`` of :data:`PLANE` (moved into :data:`WORLD`) at the pixel centres of camera ``K, c2w``."""
    normal = WORLD[:3, :3] @ PLANE[0]
    offset = PLANE[1] + normal @ WORLD[:3, 3]
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    rays = np.linalg.inv(K) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])  # z = 1
    dirs = c2w[:3, :3] @ rays
    t = (offset - normal @ c2w[:3, 3]) / (normal @ dirs)
    return t.reshape(height, width)


def texture_at(u: np.ndarray, v: np.ndarray, seed: int = 0, frequency: float = 1.0) -> np.ndarray:
    """A smooth RGB picture (uint8 ``[..., 3]``) at pixel positions ``(u, v)``, different per ``seed``, its detail
    ``frequency`` times finer."""
    u, v = u * frequency, v * frequency
    phase = seed * 0.7
    channels = [np.sin(u / 37 + phase) * np.cos(v / 29), np.cos(u / 53 - v / 41 + phase), np.sin((u + v) / 61)]
    return (127.5 + 100 * np.stack(channels, -1)).round().astype(np.uint8)


def texture(width: int = WIDTH, height: int = HEIGHT, seed: int = 0, frequency: float = 1.0) -> np.ndarray:
    """:func:`texture_at` at the pixel centres of a ``width x height`` image."""
    v, u = np.mgrid[0:height, 0:width] + 0.5
    return texture_at(u, v, seed, frequency)


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=90)
    return out.getvalue()


def read_shards(folder: Path, pattern: str = "*.tar") -> dict[str, dict]:
    """``{key: {"fields": {field: bytes}, "cameras": dict | None, "meta": dict}}`` of every sample in the shards."""
    samples: dict[str, dict] = defaultdict(lambda: {"fields": {}})
    for shard in sorted(folder.glob(pattern)):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, _, field = member.name.partition(".")
                samples[key]["fields"][field] = tar.extractfile(member).read()
    for sample in samples.values():
        fields = sample["fields"]
        sample["cameras"] = json.loads(fields["cameras.json"]) if "cameras.json" in fields else None
        sample["meta"] = json.loads(fields["meta.json"])
    return dict(samples)


def shard_cameras(sample: dict) -> tuple[np.ndarray, np.ndarray]:
    """``(K [V, 3, 3], c2w [V, 4, 4])`` of a sample from :func:`read_shards`."""
    views = sample["cameras"]["views"]
    return np.array([v["K"] for v in views]), np.array([v["c2w"] for v in views])


def shard_depth(sample: dict, view: int) -> np.ndarray:
    """Metric depth ``[H, W]`` of one view of a sample from :func:`read_shards`."""
    with Image.open(io.BytesIO(sample["fields"][f"{view:03d}.depth.png"])) as im:
        return depth_to_array(im, sample["cameras"]["depth_scale"])


def relative_error(got: np.ndarray, truth: np.ndarray) -> float:
    return float(np.abs(got - truth).max() / np.abs(truth).max())


def check_cameras(sample: dict, K: np.ndarray, c2w: np.ndarray, tol: float = 1e-4) -> None:
    """The shard's intrinsics equal ``K`` and its poses equal ``c2w`` up to one rigid motion of the world, both to
    relative error ``tol``."""
    got_K, got_c2w = shard_cameras(sample)
    assert got_K.shape == K.shape and got_c2w.shape == c2w.shape
    assert relative_error(got_K, K) <= tol, (got_K, K)
    motion = c2w[0] @ np.linalg.inv(got_c2w[0])  # the world's rigid motion, from the first view
    assert np.allclose(motion[:3, :3] @ motion[:3, :3].T, np.eye(3), atol=1e-6)
    moved = motion @ got_c2w
    assert relative_error(moved, c2w) <= tol, np.abs(moved - c2w).max()


GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def re10k_scene(key: str, n: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray, list[bytes]]:
    """A pixelSplat scene dict: 18 numbers per camera (normalised fx fy cx cy, 2 unused, 3x4 w2c), JPEG bytes."""
    c2w = cameras(n, seed)
    Ks = np.stack([intrinsics(i) for i in range(n)])
    rows = []
    for K, pose in zip(Ks, c2w):
        w2c = np.linalg.inv(pose)[:3]
        normalised = [K[0, 0] / WIDTH, K[1, 1] / HEIGHT, K[0, 2] / WIDTH, K[1, 2] / HEIGHT]
        rows.append([*normalised, 0.0, 0.0, *w2c.ravel()])
    images = [jpeg(texture(seed=seed * 10 + i)) for i in range(n)]
    scene = {
        "url": f"https://www.youtube.com/watch?v={key}",
        "timestamps": torch.arange(n, dtype=torch.int64) * 33_366,
        "cameras": torch.tensor(rows, dtype=torch.float32),
        "images": [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images],
        "key": key,
    }
    return scene, Ks, c2w, images


def write_re10k(folder: Path, tag: str = "") -> dict[str, tuple[np.ndarray, np.ndarray, list[bytes]]]:
    """Two chunks (three good scenes, one without cameras), as pixelSplat's converter saves them (``tag`` is
    appended to the scene keys, so that several calls make different scenes)."""
    folder.mkdir(parents=True)
    truth = {}
    chunks: list[list[dict]] = [[], []]
    for i, (key, n) in enumerate((("5aca87f95a9412c6", 6), ("0a1b2c3d4e5f6789", 5), ("ffee001122334455", 7))):
        key += tag
        scene, Ks, c2w, images = re10k_scene(key, n, i)
        chunks[min(i, 1)].append(scene)
        truth[key] = (Ks, c2w, images)
    broken = dict(chunks[1][0], key=f"broken00000000{tag}")
    del broken["cameras"]
    chunks[1].append(broken)
    for i, chunk in enumerate(chunks):
        torch.save(chunk, folder / f"{i:06d}.torch")
    return truth


def _save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=90)


def write_lvsm(root: Path, tag: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """LVSM's layout (metadata/*.json beside images/, full_list.txt): one scene per schema, one of neither
    (``tag`` appended to the scene names)."""
    truth = {}
    entries = []
    for s, (name, schema) in enumerate((("scene_lvsm", "lvsm"), ("scene_rayzer", "rayzer"))):
        name += tag
        n = 5
        c2w = cameras(n, seed=10 + s)
        Ks = np.stack([intrinsics(i) for i in range(n)])
        frames = []
        for i in range(n):
            relative = f"images/{name}/{i:05d}.jpg"
            _save(root / relative, texture(seed=s * 10 + i))
            w2c = np.linalg.inv(c2w[i]).tolist()
            fx, fy, cx, cy = Ks[i, 0, 0], Ks[i, 1, 1], Ks[i, 0, 2], Ks[i, 1, 2]
            if schema == "lvsm":  # pixels of the image file, absolute paths as LVSM writes them
                frames.append({"image_path": str(root / relative), "fxfycxcy": [fx, fy, cx, cy], "w2c": w2c})
            else:  # pixels of a w x h image (here twice the file's size), paths relative to the JSON's parent
                frames.append({"file_path": relative, "w": 2 * WIDTH, "h": 2 * HEIGHT, "fx": 2 * fx, "fy": 2 * fy,
                               "cx": 2 * cx, "cy": 2 * cy, "w2c": w2c})  # fmt: skip
        body = {"scene_name": name, "frames": frames} if schema == "lvsm" else {"frames": frames}
        path = root / "metadata" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body))
        entries.append(f"metadata/{name}.json")
        truth[name] = (Ks, c2w)
    (root / "metadata" / f"odd{tag}.json").write_text(json.dumps({"frames": [{"path": "x.jpg", "K": [1, 2, 3, 4]}]}))
    entries.append(f"metadata/odd{tag}.json")
    (root / "full_list.txt").write_text("\n".join(entries) + "\n")
    return truth


DL3DV_APPLIED = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]])  # DL3DV's (older nerfstudio)
NERFSTUDIO_APPLIED = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0]])  # what nerfstudio writes today
DISTORTION = np.array([-0.06, 0.015, 0.0012, -0.0008])  # k1 k2 p1 p2
DETAIL = 4.0
"""The DL3DV pictures' detail (:func:`texture_at`'s ``frequency``): fine enough that an image left distorted (up
to 10 pixels off at the corners) differs clearly."""


@functools.cache
def _pinhole_positions(K: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Where the pixel centres of a camera ``K`` (as bytes) with :data:`DISTORTION` lie in its pinhole image
    (kornia's iterative inverse of the distortion)."""
    from kornia.geometry.calibration import undistort_points

    v, u = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    points = torch.from_numpy(np.stack([u.ravel(), v.ravel()], -1))[None]
    K_matrix = torch.from_numpy(np.frombuffer(K).reshape(3, 3).copy())[None]
    pinhole = undistort_points(points, K_matrix, torch.from_numpy(DISTORTION)[None], num_iters=20)[0].numpy()
    return pinhole[:, 0].reshape(HEIGHT, WIDTH), pinhole[:, 1].reshape(HEIGHT, WIDTH)


def distorted_texture(K: np.ndarray, seed: int) -> np.ndarray:
    """The image a camera with :data:`DISTORTION` takes of :func:`texture`'s pinhole picture: each distorted pixel
    shows the pinhole picture (:func:`texture` with ``frequency`` :data:`DETAIL`) at its undistorted position."""
    return texture_at(*_pinhole_positions(np.asarray(K, dtype=np.float64).tobytes()), seed, DETAIL)


def write_dl3dv(root: Path, tag: str = "") -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three scenes as DL3DV ships them (nerfstudio/transforms.json at 4x the size of images_4/, OpenGL cameras
    in a world moved by applied_transform): DL3DV's and today's nerfstudio's applied_transform, one not rigid
    (``tag`` appended to the scene names)."""
    truth = {}
    K = intrinsics(0)
    for s, (name, applied) in enumerate(
        (("scene_dl3dv", DL3DV_APPLIED), ("scene_nerfstudio", NERFSTUDIO_APPLIED), ("scene_sheared", None))
    ):
        n = 4
        c2w = cameras(n, seed=20 + s)
        name += tag
        folder = root / name / "nerfstudio"
        A = np.eye(4)
        A[:3] = applied if applied is not None else [[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]
        frames = []
        for i in range(n):
            # the file names' natural order is the capture order; transforms.json lists them shuffled
            _save(folder / "images_4" / f"frame_{i + 1:05d}.png", distorted_texture(K, s * 10 + i))
            frames.append({"file_path": f"images/frame_{i + 1:05d}.png",
                           "transform_matrix": (A @ c2w[i] @ GL_TO_CV).tolist()})  # fmt: skip
        frames = [frames[i] for i in (2, 0, 3, 1)]
        spec = {"w": 4 * WIDTH, "h": 4 * HEIGHT, "fl_x": 4 * K[0, 0], "fl_y": 4 * K[1, 1], "cx": 4 * K[0, 2],
                "cy": 4 * K[1, 2], "k1": DISTORTION[0], "k2": DISTORTION[1], "p1": DISTORTION[2],
                "p2": DISTORTION[3], "camera_model": "OPENCV", "frames": frames,
                "applied_transform": A[:3].tolist()}  # fmt: skip
        (folder / "transforms.json").write_text(json.dumps(spec))
        truth[name] = (np.stack([K] * n), c2w)
    return truth


P3D = np.diag([-1.0, -1.0, 1.0])  # OpenCV camera axes -> PyTorch3D's (x left, y up)


def pytorch3d_viewpoint(K: np.ndarray, c2w: np.ndarray, fmt: str) -> dict:
    """CO3D's ``viewpoint`` of an OpenCV camera, written from PyTorch3D's definitions, and checked here by
    projecting a point the PyTorch3D way (row vectors, NDC, then screen) against the OpenCV projection."""
    w2c = np.linalg.inv(c2w)
    R = (P3D @ w2c[:3, :3]).T  # X_cam = X_world @ R + T
    T = P3D @ w2c[:3, 3]
    half = np.array([WIDTH, HEIGHT]) / 2
    scale = half if fmt == "ndc_norm_image_bounds" else np.full(2, half.min())
    focal = np.array([K[0, 0], K[1, 1]]) / scale
    principal = (half - K[:2, 2]) / scale
    point = c2w[:3, :3] @ [0.2, -0.1, 3.0] + c2w[:3, 3]
    cam = point @ R + T
    screen = half - (focal * cam[:2] / cam[2] + principal) * scale  # PyTorch3D's NDC (x left, y up) to pixels
    cv = K @ (w2c[:3, :3] @ point + w2c[:3, 3])
    assert np.allclose(screen, cv[:2] / cv[2], atol=1e-9)
    return {"R": R.tolist(), "T": T.tolist(), "focal_length": focal.tolist(), "principal_point": principal.tolist(),
            "intrinsics_format": fmt}  # fmt: skip


def _float16_png(path: Path, depth: np.ndarray) -> None:
    """A depth PNG as CO3D stores it: 16-bit values that are float16 bit patterns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(depth.astype(np.float16).view(np.uint16)).save(path)


def write_co3d(root: Path, tag: str = "") -> dict[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
    """One category (``teddybear`` + ``tag``), three sequences (one per NDC format, one of low quality), depth
    with masks, a set list."""
    category = root / f"teddybear{tag}"
    category.mkdir(parents=True)
    frames, sequences, truth = [], [], {}
    specs = (("101_1_1", "ndc_norm_image_bounds", 0.9), ("102_2_2", "ndc_isotropic", 0.7), ("103_3_3", None, 0.1))
    for s, (sequence, fmt, quality) in enumerate(specs):
        n = 4
        c2w = cameras(n, seed=30 + s)
        Ks = np.stack([intrinsics(i) for i in range(n)])
        depths = []
        for i in range(n):
            number = 10 * i + 1
            base = f"{category.name}/{sequence}"
            _save(root / base / "images" / f"frame{number:06d}.jpg", texture(seed=s * 10 + i))
            depth = plane_depth(Ks[i], c2w[i])
            scale = 0.8 + 0.1 * i  # scale_adjustment: the PNG holds depth / scale
            _float16_png(root / base / "depths" / f"frame{number:06d}.jpg.geometric.png", depth / scale)
            mask = np.full((HEIGHT, WIDTH), 255, np.uint8)
            mask[:40, :60] = 0
            Image.fromarray(mask).save(root / base / "depths" / f"mask{number:06d}.png")
            depths.append(np.where(mask > 0, depth, 0))
            frames.append({
                "sequence_name": sequence, "frame_number": number, "frame_timestamp": i / 30,
                "image": {"path": f"{base}/images/frame{number:06d}.jpg", "size": [HEIGHT, WIDTH]},
                "depth": {"path": f"{base}/depths/frame{number:06d}.jpg.geometric.png", "scale_adjustment": scale,
                          "mask_path": f"{base}/depths/mask{number:06d}.png"},
                "viewpoint": pytorch3d_viewpoint(Ks[i], c2w[i], fmt or "ndc_isotropic"),
                "meta": {},
            })  # fmt: skip
        sequences.append({"sequence_name": sequence, "category": "teddybear", "viewpoint_quality_score": quality})
        truth[f"{category.name}/{sequence}"] = (Ks, c2w, depths)
    frames.reverse()  # annotations in any order: frame_number gives the capture order
    for name, body in (("frame_annotations.jgz", frames), ("sequence_annotations.jgz", sequences)):
        with gzip.open(category / name, "wt") as f:
            json.dump(body, f)
    (category / "set_lists").mkdir()
    lists = {"train": [["101_1_1", 1, "x"], ["101_1_1", 21, "x"], ["101_1_1", 31, "x"]], "val": [], "test": []}
    (category / "set_lists" / "set_lists_fewview_dev.json").write_text(json.dumps(lists))
    return truth
