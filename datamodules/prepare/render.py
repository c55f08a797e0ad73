"""The embedded data set: multi-view scenes rendered on the CPU from the assets pybullet ships.

``selfsup3d data render --out DIR`` writes ``DIR/train-*.tar`` and ``DIR/val-*.tar`` in the shard format
(``docs/shard-format.md``) and ``DIR/info.json`` (counts, URL patterns, the class-name table). Nothing is
downloaded: the meshes come with the ``pybullet`` wheel (``pybullet_data``).

Each scene is one asset (a random URDF blob, a duck, a teddy, a mug, a robot, ...) seen from ``V``
cameras around its bounding box, looking at the box centre, framed so the object fills a good part of the
image. Two trajectories (``RenderSettings.trajectory``): ``sphere`` (the default) spreads the cameras over
the full circle of azimuths with a random elevation and distance each; ``orbit`` moves them in order along
an arc of ``arc_deg`` degrees at one elevation and distance per scene (small jitter), as a video circling
the object would, so that consecutive views overlap and a data loader can pick windows of neighbouring
views (the view-overlap curriculum of :class:`~selfsup3d.datamodules.MultiViewShards`).

Per scene: a random field of view, a random light direction and colour, and a background that is the same in
every view: either a solid random colour or a ground plane under the object with a random colour (and a random
sky colour beyond it). Depth is pybullet's depth buffer converted to metric z-depth (0 where there is no
geometry); the mask is the object's segmentation.

Splits are by asset and independent of the seed: validation assets never appear in training (random
URDFs 900-999 and one member of each family that has several, see :data:`ASSET_FAMILIES`). A scene is a
pure function of ``(seed, split, index)``, so the output is deterministic whatever the number of workers.

The class label is the asset family's index in :data:`CLASS_NAMES` (also written to ``info.json``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from selfsup3d.datamodules.format import Scene, ShardSink, encode_scene, make_key
from selfsup3d.errors import require

# family -> (train assets, val assets), paths relative to pybullet_data.getDataPath()
_BLOBS = [f"random_urdfs/{i:03d}/{i:03d}.urdf" for i in range(1000)]
ASSET_FAMILIES: dict[str, tuple[list[str], list[str]]] = {
    "blob": (_BLOBS[:900], _BLOBS[900:]),
    "duck": (["duck_vhacd.urdf"], []),
    "teddy": (["teddy_vhacd.urdf"], []),
    "r2d2": (["r2d2.urdf"], []),
    "mug": (["objects/mug.urdf"], []),
    "lego": (["lego/lego.urdf"], []),
    "table": (["table/table.urdf"], ["table_square/table_square.urdf"]),
    "ball": (["soccerball.urdf", "sphere2.urdf"], ["sphere2red.urdf"]),
    "block": (["jenga/jenga.urdf", "domino/domino.urdf"], ["block.urdf"]),
    "cube": (["cube.urdf"], ["cube_small.urdf"]),
    "tray": (["tray/tray.urdf"], ["tray/tray_textured2.urdf"]),
    "arm": (["kuka_iiwa/model.urdf", "franka_panda/panda.urdf"], ["xarm/xarm6_robot.urdf"]),
    "vehicle": (["husky/husky.urdf"], ["racecar/racecar.urdf"]),
    "legged": (["laikago/laikago.urdf", "a1/a1.urdf", "aliengo/aliengo.urdf"], ["quadruped/minitaur.urdf"]),
    "bike": (["bicycle/bike.urdf"], []),
}
CLASS_NAMES: list[str] = list(ASSET_FAMILIES)
BLOB_PROBABILITY = 0.5
"""Share of scenes showing a random URDF blob; the other families share the rest equally."""

SPLITS = ("train", "val")
TRAJECTORIES = ("sphere", "orbit")
ORBIT_JITTER_DEG = 2.0
"""On an orbit, each view's azimuth and elevation move by up to this many degrees around the trajectory."""
ORBIT_DISTANCE_JITTER = 0.03
"""On an orbit, each view's distance moves by up to this share around the scene's distance."""


@dataclass(frozen=True)
class RenderSettings:
    """What every scene of a run shares.

    Args:
        num_views: views per scene.
        size: image width and height in pixels.
        seed: global seed; scene ``i`` of split ``s`` depends only on ``(seed, s, i)``.
        fov_range: vertical field of view range in degrees, drawn per scene.
        plane_probability: share of scenes with a ground plane (the others have a solid background).
        room_probability: share of scenes placed in a textured room instead: a ground plane and four walls, each
            with its own procedural texture (smooth colour noise at several scales), so that every part of every
            view has texture and depth, as in the scene-level captures RayZer-style models learn from. Drawn
            before ``plane_probability``; 0 (the default) leaves every other scene as it was.
        distance_range: camera distance as a multiple of the tightest framing distance (per view on the
            sphere, per scene on an orbit).
        trajectory: ``sphere`` (stratified azimuths over the full circle, random elevation per view) or
            ``orbit`` (views in trajectory order along an arc of ``arc_deg``).
        arc_deg: the orbit's arc in degrees (360: a closed loop, views ``360 / V`` apart); ignored on the
            sphere.
    """

    num_views: int = 8
    size: int = 64
    seed: int = 0
    fov_range: tuple[float, float] = (30.0, 50.0)
    plane_probability: float = 0.5
    room_probability: float = 0.0
    distance_range: tuple[float, float] = (0.85, 1.2)
    trajectory: str = "sphere"
    arc_deg: float = 360.0

    def __post_init__(self) -> None:
        require(self.trajectory in TRAJECTORIES, "trajectory", f"one of {TRAJECTORIES}", self.trajectory, ValueError)
        require(0.0 < self.arc_deg <= 360.0, "arc_deg", "in (0, 360]", self.arc_deg, ValueError)


def assets_for(split: str) -> dict[str, list[str]]:
    """The assets of ``split`` by family (families without assets in that split are left out)."""
    require(split in SPLITS, "split", f"one of {SPLITS}", split, ValueError)
    index = SPLITS.index(split)
    return {family: pair[index] for family, pair in ASSET_FAMILIES.items() if pair[index]}


def choose_asset(rng: np.random.Generator, split: str) -> tuple[str, str]:
    """``(family, asset path)`` for one scene of ``split``."""
    families = assets_for(split)
    others = [f for f in families if f != "blob"]
    if "blob" in families and (not others or rng.random() < BLOB_PROBABILITY):
        family = "blob"
    else:
        family = others[int(rng.integers(len(others)))]
    assets = families[family]
    return family, assets[int(rng.integers(len(assets)))]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one scene: a pure function of ``(seed, split, index)``."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


# ============================================================================ camera conventions
GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])
"""OpenGL camera axes (x right, y up, z backward) <-> OpenCV axes (x right, y down, z forward)."""


def look_at_c2w(eye: np.ndarray, target: np.ndarray, up: np.ndarray | None = None) -> np.ndarray:
    """OpenCV camera-to-world ``[4, 4]`` of a camera at ``eye`` looking at ``target`` (image y points away
    from ``up``, default +z). The numpy twin of :func:`selfsup3d.geometry.cameras.look_at` (a test holds them
    equal), so that the renderer stays free of torch."""
    up = np.array([0.0, 0.0, 1.0]) if up is None else np.asarray(up, dtype=np.float64)
    z = target - eye
    z = z / np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-8:
        x = np.cross(z, [0.0, 1.0, 0.0])
    x = x / np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, 0], c2w[:3, 1], c2w[:3, 2], c2w[:3, 3] = x, y, z, eye
    return c2w


def gl_view_matrix(c2w: np.ndarray) -> list[float]:
    """pybullet view matrix (world to OpenGL camera, column-major 16 floats) of an OpenCV ``c2w``."""
    view = np.linalg.inv(c2w @ GL_TO_CV)
    return view.T.reshape(-1).tolist()


def gl_projection_matrix(K: np.ndarray, width: int, height: int, near: float, far: float) -> list[float]:
    """pybullet projection matrix (column-major) that renders exactly the pinhole camera ``K``.

    With pixel centres at ``j + 0.5`` the image spans ``u`` in ``[0, W]``, which NDC ``[-1, 1]`` maps to;
    image row 0 is the top (NDC y = +1)."""
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    proj = np.array(
        [
            [2 * fx / width, 0.0, 1 - 2 * cx / width, 0.0],
            [0.0, 2 * fy / height, 2 * cy / height - 1, 0.0],
            [0.0, 0.0, -(far + near) / (far - near), -2 * far * near / (far - near)],
            [0.0, 0.0, -1.0, 0.0],
        ]
    )
    return proj.T.reshape(-1).tolist()


TINY_RENDERER_SAMPLE_OFFSET = (-0.5, 0.5)
"""Where pybullet's TinyRenderer samples pixel ``(row i, column j)`` relative to the centre ``(j + 0.5,
i + 0.5)`` of the pinhole camera its projection matrix describes: at ``(j, i + 1)``. Measured by rendering a
ground plane and checking that every unprojected pixel lies on it (``tests/test_data_render.py``). The
renderer therefore gets a projection whose principal point is shifted by this offset, so that the images
match the ``K`` written to the shard exactly."""


def renderer_projection(K: np.ndarray, width: int, height: int, near: float, far: float) -> list[float]:
    """The projection matrix to hand TinyRenderer so that its images are those of the pinhole camera ``K``."""
    shifted = np.array(K, dtype=np.float64)
    shifted[0, 2] += TINY_RENDERER_SAMPLE_OFFSET[0]
    shifted[1, 2] += TINY_RENDERER_SAMPLE_OFFSET[1]
    return gl_projection_matrix(shifted, width, height, near, far)


def buffer_to_depth(buffer: np.ndarray, near: float, far: float) -> np.ndarray:
    """pybullet's non-linear depth buffer (``[0, 1]``) to metric z-depth along the optical axis."""
    return far * near / (far - (far - near) * buffer.astype(np.float64))


def _framing_distance(corners: np.ndarray, direction: np.ndarray, fov: float, margin: float = 0.95) -> float:
    """Smallest distance from the box centre along ``direction`` at which a camera looking at the centre
    sees every box corner (``[8, 3]``, relative to the centre) within ``margin`` of the half field of view."""
    c2w = look_at_c2w(direction, np.zeros(3))  # axes do not depend on the distance
    x, y = corners @ c2w[:3, 0], corners @ c2w[:3, 1]
    along = corners @ direction  # camera z of a corner is distance - along
    half = margin * math.tan(fov / 2)
    return float(np.max(along + np.maximum(np.abs(x), np.abs(y)) / half))


# ============================================================================ one scene
def camera_path(
    rng: np.random.Generator, settings: RenderSettings, elevation_range: tuple[float, float], azimuth0: float
) -> list[tuple[float, float, float]]:
    """``(azimuth, elevation, distance factor)`` of every view (radians; the factor multiplies the framing
    distance), in the order the views are written.

    On the sphere, azimuths are stratified over the full circle (``2π (v + U(-0.35, 0.35)) / V``), elevation
    and distance free per view. On an orbit, azimuths advance evenly over ``arc_deg`` from ``azimuth0`` (the
    last view ends the arc; on a closed 360° loop the views are ``360 / V`` apart) at one elevation and
    distance per scene, each view jittered by :data:`ORBIT_JITTER_DEG` and :data:`ORBIT_DISTANCE_JITTER`.
    """
    n = settings.num_views
    if settings.trajectory == "sphere":
        return [
            (
                azimuth0 + 2 * math.pi * (v + rng.uniform(-0.35, 0.35)) / n,
                math.radians(rng.uniform(*elevation_range)),
                float(rng.uniform(*settings.distance_range)),
            )
            for v in range(n)
        ]
    arc = math.radians(settings.arc_deg)
    step = arc / n if settings.arc_deg >= 360.0 else arc / max(n - 1, 1)
    lo, hi = elevation_range
    elevation = rng.uniform(lo + ORBIT_JITTER_DEG, hi - ORBIT_JITTER_DEG)
    scale = float(rng.uniform(*settings.distance_range))
    jitter = math.radians(ORBIT_JITTER_DEG)
    return [
        (
            azimuth0 + v * step + rng.uniform(-jitter, jitter),
            math.radians(elevation) + rng.uniform(-jitter, jitter),
            scale * (1.0 + rng.uniform(-ORBIT_DISTANCE_JITTER, ORBIT_DISTANCE_JITTER)),
        )
        for v in range(n)
    ]


_LIBC = ctypes.CDLL(None)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence pybullet's C-level prints (build banner, URDF warnings) on file descriptors 1 and 2.

    Python exceptions are unaffected: they propagate and are printed by whoever catches them."""
    streams = []
    for stream in (sys.stdout, sys.stderr):
        try:
            streams.append((stream, stream.fileno()))
        except (AttributeError, OSError, ValueError):
            continue
    saved = []
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream, fd in streams:
            stream.flush()
            saved.append((fd, os.dup(fd)))
            os.dup2(devnull, fd)
        yield
    finally:
        _LIBC.fflush(None)  # C-level buffered output must land in /dev/null, not after the restore
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def connect() -> int:
    """A pybullet client with the CPU renderer (``DIRECT``), searching ``pybullet_data``."""
    with _quiet_stdout():
        import pybullet as p
        import pybullet_data

        client = p.connect(p.DIRECT)
        p.setAdditionalSearchPath(pybullet_data.getDataPath(), physicsClientId=client)
    return client


def _aabb(p: Any, body: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    boxes = [p.getAABB(body, -1, physicsClientId=client)]
    boxes += [p.getAABB(body, j, physicsClientId=client) for j in range(p.getNumJoints(body, physicsClientId=client))]
    lo = np.min([b[0] for b in boxes], axis=0)
    hi = np.max([b[1] for b in boxes], axis=0)
    return lo, hi


ROOM_SIZE = 8.0
"""Half-width of the textured room in object radii (cameras frame the object from at most about 4.5 radii)."""


def procedural_texture(rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """A ``[size, size, 3]`` uint8 texture: smooth random colour noise summed over several scales."""
    out = np.zeros((size, size, 3))
    for cells in (3, 6, 12, 24):
        noise = rng.uniform(0.0, 1.0, (cells, cells, 3))
        # bilinear upsampling of the noise grid (separable; no image library needed)
        x = np.linspace(0, cells - 1, size)
        i0 = np.clip(np.floor(x).astype(int), 0, cells - 2) if cells > 1 else np.zeros(size, int)
        f = (x - i0)[:, None]
        rows = noise[i0] * (1 - f[..., None]) + noise[np.minimum(i0 + 1, cells - 1)] * f[..., None]
        grid = rows[:, i0] * (1 - f.T[..., None]) + rows[:, np.minimum(i0 + 1, cells - 1)] * f.T[..., None]
        out += grid / cells**0.3
    out = (out - out.min()) / max(float(out.max() - out.min()), 1e-9)
    return (out * 255).astype(np.uint8)


def _build_room(p: Any, client: int, plane: int, centre: np.ndarray, radius: float, rng: np.random.Generator) -> None:
    """Texture the ground ``plane`` and put four textured walls around ``centre`` (``ROOM_SIZE`` radii away)."""
    import tempfile

    from PIL import Image

    half = ROOM_SIZE * radius
    with tempfile.TemporaryDirectory() as folder:

        def texture() -> int:
            path = os.path.join(folder, f"{len(os.listdir(folder))}.png")
            Image.fromarray(procedural_texture(rng)).save(path)
            return p.loadTexture(path, physicsClientId=client)

        p.changeVisualShape(plane, -1, textureUniqueId=texture(), rgbaColor=[1, 1, 1, 1], physicsClientId=client)
        for k in range(4):
            angle = k * math.pi / 2
            shape = p.createVisualShape(p.GEOM_BOX, halfExtents=[0.02 * half, half, half], physicsClientId=client)
            position = [centre[0] + half * math.cos(angle), centre[1] + half * math.sin(angle), half]
            wall = p.createMultiBody(
                0, -1, shape, position, p.getQuaternionFromEuler([0, 0, angle]), physicsClientId=client
            )
            p.changeVisualShape(wall, -1, textureUniqueId=texture(), rgbaColor=[1, 1, 1, 1], physicsClientId=client)


def render_scene(client: int, split: str, index: int, settings: RenderSettings) -> Scene:
    """Render scene ``index`` of ``split`` (deterministic) with the pybullet ``client``."""
    import pybullet as p

    rng = scene_rng(settings.seed, split, index)
    family, asset = choose_asset(rng, split)
    size = settings.size
    with _quiet_stdout():
        p.resetSimulation(physicsClientId=client)
        yaw = float(rng.uniform(0, 2 * math.pi))
        orientation = p.getQuaternionFromEuler([0, 0, yaw])
        body = p.loadURDF(asset, [0, 0, 0], orientation, useFixedBase=True, physicsClientId=client)
        lo, hi = _aabb(p, body, client)
        use_room = settings.room_probability > 0 and bool(rng.random() < settings.room_probability)
        use_plane = use_room or bool(rng.random() < settings.plane_probability)
        if use_plane:  # rest the object on the ground plane z = 0
            p.resetBasePositionAndOrientation(body, [0, 0, -lo[2]], orientation, physicsClientId=client)
            lo, hi = lo - [0, 0, lo[2]], hi - [0, 0, lo[2]]
            plane = p.loadURDF("plane.urdf", physicsClientId=client)
            plane_colour = [*rng.uniform(0.15, 1.0, 3).tolist(), 1.0]
            p.changeVisualShape(plane, -1, rgbaColor=plane_colour, physicsClientId=client)
    centre = (lo + hi) / 2
    if use_room:
        _build_room(p, client, plane, centre, max(float(np.linalg.norm(hi - lo)) / 2, 1e-3), rng)
    radius = max(float(np.linalg.norm(hi - lo)) / 2, 1e-3)
    fov = math.radians(rng.uniform(*settings.fov_range))
    focal = 0.5 * size / math.tan(fov / 2)
    K = np.array([[focal, 0, size / 2], [0, focal, size / 2], [0, 0, 1]])
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]) - centre
    background = rng.integers(0, 256, 3).astype(np.uint8)
    light_dir = rng.normal(size=3)
    light_dir[2] = abs(light_dir[2]) + 0.3
    light = {
        "lightDirection": (light_dir / np.linalg.norm(light_dir)).tolist(),
        "lightColor": rng.uniform(0.8, 1.0, 3).tolist(),
        "lightAmbientCoeff": float(rng.uniform(0.35, 0.65)),
        "lightDiffuseCoeff": float(rng.uniform(0.35, 0.7)),
        "lightSpecularCoeff": float(rng.uniform(0.0, 0.15)),
        "shadow": int(use_plane),
    }
    elevation_range = (10.0, 60.0) if use_plane else (-25.0, 65.0)
    azimuth0 = rng.uniform(0, 2 * math.pi)
    images, depths, masks, c2ws = [], [], [], []
    for azimuth, elevation, scale in camera_path(rng, settings, elevation_range, azimuth0):
        direction = np.array(
            [math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)]
        )
        distance = _framing_distance(corners, direction, fov) * scale
        c2w = look_at_c2w(centre + distance * direction, centre)
        near = max(distance - 1.5 * radius, distance * 0.05)
        far = distance + (ROOM_SIZE * 3 if use_room else 8.0 if use_plane else 1.5) * radius
        with _quiet_stdout():
            _, _, rgba, buffer, seg = p.getCameraImage(
                size,
                size,
                gl_view_matrix(c2w),
                renderer_projection(K, size, size, near, far),
                renderer=p.ER_TINY_RENDERER,
                physicsClientId=client,
                **light,
            )
        rgb = np.asarray(rgba, dtype=np.uint8).reshape(size, size, 4)[..., :3].copy()
        seg = np.asarray(seg).reshape(size, size)
        buffer = np.asarray(buffer, dtype=np.float32).reshape(size, size)
        empty = seg < 0
        rgb[empty] = background
        depth = buffer_to_depth(buffer, near, far).astype(np.float32)
        depth[empty] = 0.0
        images.append(rgb)
        depths.append(depth)
        masks.append(seg == body)
        c2ws.append(c2w)
    key = make_key(split, f"{index:06d}")
    meta = {
        "source": "pybullet",
        "scene_id": key,
        "label": CLASS_NAMES.index(family),
        "class_name": family,
        "asset": asset,
        "background": "room" if use_room else "plane" if use_plane else "solid",
    }
    return Scene(
        key=key,
        images=images,
        K=np.repeat(K[None], len(images), 0),
        c2w=np.stack(c2ws),
        depth=depths,
        masks=masks,
        meta=meta,
    )


# ============================================================================ many scenes, many processes
_CLIENT: int | None = None


def _job(args: tuple[str, int, RenderSettings]) -> dict[str, Any]:
    """Worker: render and encode one scene (encoding in the worker keeps the parent free to write)."""
    global _CLIENT
    if _CLIENT is None:
        _CLIENT = connect()
    split, index, settings = args
    return encode_scene(render_scene(_CLIENT, split, index, settings), "png")


def _pool_context() -> mp.context.BaseContext:
    # fork starts in milliseconds; spawn would re-import torch and Lightning in every worker
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def render_dataset(
    out: str | os.PathLike[str],
    train_scenes: int = 512,
    val_scenes: int = 64,
    settings: RenderSettings | None = None,
    scenes_per_shard: int = 128,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Render the embedded data set into ``out`` and write ``out/info.json``; returns that summary.

    Args:
        out: output folder.
        train_scenes: number of training scenes.
        val_scenes: number of validation scenes (from validation assets only).
        settings: views, size, seed, ... (:class:`RenderSettings`).
        scenes_per_shard: scenes per tar shard.
        workers: processes (one pybullet client each); all cores when ``None``, in-process when 1.
        overwrite: replace existing shards of the same splits.
        progress: show a tqdm progress bar.
    """
    settings = settings or RenderSettings()
    require(settings.num_views >= 1, "num_views", ">= 1", settings.num_views, ValueError)
    require(settings.size >= 8, "size", ">= 8", settings.size, ValueError)
    workers = len(os.sched_getaffinity(0)) if workers is None else max(1, workers)
    jobs = [(split, i, settings) for split, n in (("train", train_scenes), ("val", val_scenes)) for i in range(n)]
    out = Path(out)
    sinks = {
        split: ShardSink(out, split, samples_per_shard=scenes_per_shard, overwrite=overwrite)
        for split, n in (("train", train_scenes), ("val", val_scenes))
        if n > 0
    }
    start = time.perf_counter()
    bar = tqdm(total=len(jobs), unit="scene", desc=f"render {out}", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1 or len(jobs) <= 1:
            for job in jobs:
                sinks[job[0]].write(_job(job))
                bar.update()
        else:
            with _pool_context().Pool(workers) as pool:
                for job, record in zip(jobs, pool.imap(_job, jobs, chunksize=4)):
                    sinks[job[0]].write(record)
                    bar.update()
    finally:
        bar.close()
        for sink in sinks.values():
            sink.close()
    seconds = time.perf_counter() - start
    info = {
        "format": "selfsup3d multi-view shards, see docs/shard-format.md",
        "source": "pybullet",
        "settings": asdict(settings),
        "class_names": CLASS_NAMES,
        "splits": {
            split: {"scenes": sink.count, "shards": len(sink.shards), "url": sink.url} for split, sink in sinks.items()
        },
        "val_assets": {f: a for f, a in assets_for("val").items()},
        "seconds": round(seconds, 2),
        "scenes_per_second": round(len(jobs) / max(seconds, 1e-9), 2),
    }
    (out / "info.json").write_text(json.dumps(info, indent=2))
    return info
