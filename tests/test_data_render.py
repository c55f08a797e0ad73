"""The embedded renderer: camera conventions, multi-view consistency, determinism, splits by asset, CLI."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pybullet as p
import pytest
import torch
from shards import render_scenes, reprojection_error, write_multiview_shards

from selfsup3d.cli import main
from selfsup3d.datamodules import MultiViewShards
from selfsup3d.datamodules.multiview import eval_view_order
from selfsup3d.datamodules.prepare.render import (
    ASSET_FAMILIES,
    CLASS_NAMES,
    ORBIT_JITTER_DEG,
    RenderSettings,
    assets_for,
    buffer_to_depth,
    camera_path,
    connect,
    gl_view_matrix,
    look_at_c2w,
    render_dataset,
    render_scene,
    renderer_projection,
)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def test_unprojected_ground_plane_is_flat():
    """Every pixel of a rendered ground plane, unprojected with K, c2w and the converted depth, lies on z = 0.
    This pins the pixel-centre convention, the OpenGL -> OpenCV axes and the depth-buffer conversion; an
    error of half a pixel in the principal point already shows as millimetres here."""
    client = connect()
    p.loadURDF("plane.urdf", physicsClientId=client)
    size, f, near, far = 96, 80.0, 0.1, 6.0
    K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1.0]])
    c2w = look_at_c2w(np.array([1.2, 0.4, 0.9]), np.zeros(3))
    roll = 0.5  # rotate about the optical axis so both image axes see the slope
    c2w[:3, :3] = c2w[:3, :3] @ np.array([[np.cos(roll), -np.sin(roll), 0], [np.sin(roll), np.cos(roll), 0], [0, 0, 1]])
    _, _, _, buffer, seg = p.getCameraImage(
        size, size, gl_view_matrix(c2w), renderer_projection(K, size, size, near, far),
        renderer=p.ER_TINY_RENDERER, physicsClientId=client,
    )  # fmt: skip
    p.disconnect(client)
    depth = buffer_to_depth(np.asarray(buffer, np.float64).reshape(size, size), near, far)
    hit = np.asarray(seg).reshape(size, size) >= 0
    assert hit.mean() > 0.5
    rows, cols = np.mgrid[0:size, 0:size] + 0.5
    cam = np.stack([(cols - K[0, 2]) / f * depth, (rows - K[1, 2]) / f * depth, depth], -1)[hit]
    world = cam @ c2w[:3, :3].T + c2w[:3, 3]
    assert np.abs(world[:, 2]).max() < 2e-4
    # the same check fails clearly with the principal point off by half a pixel
    cam[:, 0] += 0.5 / f * cam[:, 2]
    assert np.abs((cam @ c2w[:3, :3].T + c2w[:3, 3])[:, 2]).mean() > 1e-3


def _pair_errors(images, depths, Ks, c2ws, wrong: bool = False) -> np.ndarray:
    v = len(images)
    out = []
    for i in range(v):
        for j in range(v):
            if i == j:
                continue
            cam_j = c2ws[(j + 1) % v if (j + 1) % v != i else (j + 2) % v] if wrong else c2ws[j]
            out.append(reprojection_error(images[i], depths[i], Ks[i], c2ws[i], images[j], depths[j], Ks[j], cam_j))
    return np.array(out)


def test_rendered_shards_reproject_consistently(tmp_path):
    """Read rendered shards with the datamodule; warp every view into every other through depth and
    cameras: the colours agree where both views see the surface, and they do not with wrong cameras."""
    url = write_multiview_shards(tmp_path, num_scenes=6, num_views=4, size=32, num_shards=2, split="val")
    dm = MultiViewShards(url, url, batch_size=6, num_workers=0, image_size=32, num_views=4, with_depth=True)
    dm.setup("validate")
    (batch,) = [dm.prepare_batch(b, train=False) for b in dm.val_dataloader()]
    good, wrong = [], []
    for s in range(6):
        views = (batch["images"][s], batch["depth"][s], batch["K"][s], batch["c2w"][s])
        good.append(_pair_errors(*views))
        wrong.append(_pair_errors(*views, wrong=True))
    good, wrong = np.concatenate(good), np.concatenate(wrong)
    assert np.median(good[:, 0]) < 0.03, good
    assert np.median(good[:, 1]) > 0.15  # views overlap
    assert np.median(wrong[:, 0]) > 5 * np.median(good[:, 0])
    assert np.median(wrong[:, 1]) < 0.5 * np.median(good[:, 1])


def test_masks_and_depth_agree():
    for scene in render_scenes(num_scenes=4, num_views=2, size=32):
        for depth, mask in zip(scene.depth, scene.masks):
            assert mask.any() and np.all(depth[mask] > 0)
            if scene.meta["background"] == "solid":
                assert np.all(depth[~mask] == 0)  # nothing but the object has geometry


def test_room_scenes_have_depth_everywhere_and_leave_other_scenes_as_they_were():
    """``room_probability``: the object in a textured room (ground and four walls), so every pixel has geometry;
    at the default 0 the scenes are byte-identical to before (the random stream is not touched)."""
    client = connect()
    try:
        settings = RenderSettings(num_views=3, size=32, seed=0, room_probability=1.0, trajectory="orbit")
        rooms = [render_scene(client, "val", i, settings) for i in range(2)]
        plain = render_scene(client, "val", 0, RenderSettings(num_views=3, size=32, seed=0, trajectory="orbit"))
        again = render_scene(
            client, "val", 0, RenderSettings(num_views=3, size=32, seed=0, trajectory="orbit", room_probability=0.0)
        )
    finally:
        p.disconnect(client)
    for scene in rooms:
        assert scene.meta["background"] == "room"
        assert all(np.all(depth > 0) for depth in scene.depth)  # walls and floor behind everything
        assert np.std(np.stack(scene.images).astype(float)) > 10  # textured, not a flat colour
    assert plain.meta["background"] != "room"
    assert all(np.array_equal(a, b) for a, b in zip(plain.images, again.images))


def test_objects_are_centred_and_fill_the_frame():
    fills, offsets = [], []
    for scene in render_scenes(num_scenes=12, num_views=3, size=32):
        for mask in scene.masks:
            rows, cols = np.nonzero(mask)
            fills.append(max(np.ptp(rows), np.ptp(cols)) / 32)
            offsets.append(np.hypot(rows.mean() - 15.5, cols.mean() - 15.5) / 32)
    assert np.median(fills) > 0.45
    assert np.median(offsets) < 0.12


def test_render_is_deterministic_and_splits_by_asset(tmp_path):
    settings = RenderSettings(num_views=2, size=16, seed=5)
    a = render_dataset(tmp_path / "a", 6, 4, settings, scenes_per_shard=4, workers=2, progress=False)
    b = render_dataset(tmp_path / "b", 6, 4, settings, scenes_per_shard=4, workers=1, progress=False)
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert {k: v["scenes"] for k, v in a["splits"].items()} == {k: v["scenes"] for k, v in b["splits"].items()}
    assert a["splits"]["train"]["scenes"] == 6 and a["splits"]["val"]["url"].endswith("val-000000.tar")
    assert a["class_names"] == CLASS_NAMES == json.loads((tmp_path / "a" / "info.json").read_text())["class_names"]
    c = render_dataset(tmp_path / "c", 6, 0, RenderSettings(num_views=2, size=16, seed=6), workers=1, progress=False)
    assert c["splits"]["train"]["scenes"] == 6
    assert (tmp_path / "c" / "train-000000.tar").read_bytes() != (tmp_path / "a" / "train-000000.tar").read_bytes()
    # validation assets never appear in training
    train_assets = {x for assets in assets_for("train").values() for x in assets}
    val_assets = {x for assets in assets_for("val").values() for x in assets}
    assert not train_assets & val_assets and len(val_assets) >= 100
    for split, allowed in (("train", train_assets), ("val", val_assets)):
        with tarfile.open(tmp_path / "a" / f"{split}-000000.tar") as tar:
            metas = [json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith("meta.json")]
        for meta in metas:
            assert meta["asset"] in allowed
            assert CLASS_NAMES[meta["label"]] == meta["class_name"]
            assert meta["asset"] in ASSET_FAMILIES[meta["class_name"]][0 if split == "train" else 1]


def test_render_command(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["data", "render", "--out", str(out), "--train-scenes", "3", "--val-scenes", "2", "--views", "3",
            "--size", "16", "--shard-size", "2", "--workers", "1", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "rendered 5 scenes" in text and "train: 3 scenes in 2 shard(s)" in text
    assert sorted(x.name for x in out.iterdir()) == [
        "info.json",
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]
    # the printed URL pattern feeds the datamodule
    info = json.loads((out / "info.json").read_text())
    dm = MultiViewShards(info["splits"]["train"]["url"], info["splits"]["val"]["url"], batch_size=1, num_workers=0,
                         image_size=16, num_views=3)  # fmt: skip
    dm.setup("fit")
    assert len(list(dm.val_dataloader())) == 2
    with pytest.raises(SystemExit) as err:
        main(args)  # refuses to mix with existing shards
    assert err.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


def test_eval_order_matches_round_trip_of_rendered_cameras(tmp_path):
    scenes = render_scenes(num_scenes=1, num_views=6, size=16)
    url = write_multiview_shards(tmp_path, num_scenes=1, num_views=6, size=16, num_shards=1)
    dm = MultiViewShards(url, url, batch_size=1, num_workers=0, image_size=16, num_views=3, num_context_views=1)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    order = eval_view_order(6, 3, 1)
    assert order == [0, 2, 4]
    assert torch.allclose(batch["c2w"][0], _t(scenes[0].c2w[order]).float(), atol=1e-6)


def test_numpy_look_at_matches_the_geometry_module():
    import torch

    from selfsup3d.geometry.cameras import look_at

    rng = np.random.default_rng(0)
    for eye in [*rng.normal(size=(5, 3)), np.array([0.0, 0.0, 2.0])]:  # the last looks straight down +z
        target = np.zeros(3) if eye[0] == 0 else rng.normal(size=3)
        ours = look_at_c2w(eye, target)
        theirs = look_at(torch.from_numpy(eye)[None], torch.from_numpy(target)[None])[0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-12)


@pytest.mark.parametrize("arc", [120.0, 360.0])
def test_orbit_writes_views_in_trajectory_order(arc):
    views = 9
    settings = RenderSettings(num_views=views, size=16, trajectory="orbit", arc_deg=arc)
    rng = np.random.default_rng(0)
    path = camera_path(rng, settings, (10.0, 60.0), 0.3)
    azimuth, elevation, scale = (np.array(x) for x in zip(*path))
    step = np.degrees(np.diff(azimuth))
    expected = arc / views if arc == 360.0 else arc / (views - 1)
    assert np.all(step > 0) and np.allclose(step, expected, atol=2 * ORBIT_JITTER_DEG + 1e-9)
    assert np.ptp(np.degrees(elevation)) <= 2 * ORBIT_JITTER_DEG and np.ptp(scale) < 0.1
    # the rendered cameras follow it: each looks at the object and neighbours are closest to each other
    client = connect()
    scene = render_scene(client, "train", 1, settings)
    centres = scene.c2w[:, :3, 3]
    gaps = np.linalg.norm(np.diff(centres, axis=0), axis=-1)
    spread = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
    assert gaps.max() < np.sort(spread[0])[2] * 1.8 and np.all(gaps > 0)


def test_sphere_is_the_default_and_bad_trajectories_are_refused():
    assert RenderSettings().trajectory == "sphere"
    with pytest.raises(ValueError, match="trajectory"):
        RenderSettings(trajectory="spiral")
    with pytest.raises(ValueError, match="arc_deg"):
        RenderSettings(trajectory="orbit", arc_deg=0.0)
