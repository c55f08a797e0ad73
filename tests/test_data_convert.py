"""Converters: Blender/NeRF and COLMAP scenes written from known cameras convert back to the same cameras and
reproject consistently; image folders become labelled single-view shards; summaries say what was skipped."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shards import render_scenes, reprojection_error, rotation_to_quaternion, write_colmap

from selfsup3d.cli import main
from selfsup3d.datamodules import BadSampleWarning, MultiViewShards, SingleViewShards
from selfsup3d.datamodules.format import Scene
from selfsup3d.datamodules.multiview import eval_view_order
from selfsup3d.datamodules.prepare.blender import convert_blender
from selfsup3d.datamodules.prepare.colmap import convert_colmap, parse_colmap_images, quaternion_to_rotation
from selfsup3d.datamodules.prepare.frames import capture_order_key
from selfsup3d.datamodules.prepare.images import convert_images

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def test_quaternions_round_trip():
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.normal(size=4)
        q /= np.linalg.norm(q)
        rot = quaternion_to_rotation(q)
        assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-12) and np.linalg.det(rot) > 0
        assert np.allclose(quaternion_to_rotation(rotation_to_quaternion(rot)), rot, atol=1e-10)


def _read_scenes(url: str, num_views: int, size: int = 32) -> dict[str, dict]:
    dm = MultiViewShards(url, url, batch_size=8, num_workers=0, image_size=size, num_views=num_views,
                         num_context_views=1, with_masks=False)  # fmt: skip
    dm.setup("validate")
    out = {}
    for batch in dm.val_dataloader():
        batch = dm.prepare_batch(batch, train=False)
        for i, key in enumerate(batch["key"]):
            out[key] = {k: batch[k][i] for k in ("images", "K", "c2w")}
    return out


def _check_against(scene: Scene, got: dict, num_views: int) -> None:
    """Converted cameras equal the originals, and the converted images reproject through the original depth."""
    order = eval_view_order(len(scene.images), num_views, 1)
    assert torch.allclose(got["K"], torch.from_numpy(scene.K[order]).float(), atol=1e-4)
    assert torch.allclose(got["c2w"], torch.from_numpy(scene.c2w[order]).float(), atol=1e-5)
    depths = [torch.from_numpy(scene.depth[v])[None] for v in order]
    errors = []
    for a in range(num_views):
        for b in range(num_views):
            if a != b:
                err, frac = reprojection_error(got["images"][a], depths[a], got["K"][a], got["c2w"][a],
                                               got["images"][b], depths[b], got["K"][b], got["c2w"][b])  # fmt: skip
                errors.append(err)
    assert np.median(errors) < 0.05


# ---------------------------------------------------------------------------- Blender / NeRF
def _write_blender(folder: Path, scene: Scene, style: str) -> None:
    """NeRF-synthetic style (camera_angle_x, RGBA PNGs, file_path without extension, train/test files) or
    instant-ngp style (fl_x/fl_y/cx/cy, RGB PNGs, one transforms.json)."""
    folder.mkdir(parents=True)
    h, w = scene.images[0].shape[:2]
    frames = []
    for v, (image, mask) in enumerate(zip(scene.images, scene.masks)):
        gl = (scene.c2w[v] @ GL_TO_CV).tolist()
        if style == "nerf":
            (folder / "train").mkdir(exist_ok=True)
            rgba = np.concatenate([image, np.where(mask, 255, 0).astype(np.uint8)[..., None]], -1)
            Image.fromarray(rgba, "RGBA").save(folder / "train" / f"r_{v}.png")
            frames.append({"file_path": f"./train/r_{v}", "transform_matrix": gl})
        else:
            Image.fromarray(image).save(folder / f"frame_{v:02d}.png")
            frames.append({"file_path": f"frame_{v:02d}.png", "transform_matrix": gl})
    fx = scene.K[0][0, 0]
    if style == "nerf":
        angle = 2 * math.atan(w / (2 * fx))
        half = len(frames) // 2
        (folder / "transforms_train.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames[:half]}))
        (folder / "transforms_test.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames[half:]}))
    else:
        cam = {"fl_x": fx, "fl_y": scene.K[0][1, 1], "cx": scene.K[0][0, 2], "cy": scene.K[0][1, 2], "w": w, "h": h}
        (folder / "transforms.json").write_text(json.dumps({**cam, "frames": frames}))


def test_blender_scenes_convert_to_the_same_cameras(tmp_path):
    nerf, ngp = render_scenes(num_scenes=2, num_views=4, size=32, start=10)
    _write_blender(tmp_path / "src" / "nerf", nerf, "nerf")
    _write_blender(tmp_path / "src" / "ngp", ngp, "ngp")
    report = convert_blender(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    assert report.written == 2 and report.views == 8 and not report.skipped, report.summary()
    got = _read_scenes(report.url, 4)
    # RGBA: composited over white, alpha becomes the mask
    _check_against(ngp, got["ngp"], 4)
    nerf_white = [np.where(m[..., None], im, 255).astype(np.uint8) for im, m in zip(nerf.images, nerf.masks)]
    _check_against(Scene(nerf.key, nerf_white, nerf.K, nerf.c2w, nerf.depth, nerf.masks), got["nerf"], 4)
    order = eval_view_order(4, 4, 1)
    expected = torch.from_numpy(np.stack([nerf_white[v] for v in order])).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(got["nerf"]["images"], expected)
    dm = MultiViewShards(report.url, report.url, batch_size=2, num_workers=0, image_size=32, num_views=4,
                         num_context_views=1, with_masks=True)  # fmt: skip
    dm.setup("validate")
    with pytest.warns(BadSampleWarning, match=r"sample ngp, field 000\.mask\.png: missing"):
        (batch,) = list(dm.val_dataloader())  # ngp had no alpha, so it has no masks: skipped
    assert batch["key"] == ["nerf"]
    assert torch.equal(batch["mask"][0, :, 0].bool(), torch.from_numpy(np.stack([nerf.masks[v] for v in order])))


def test_blender_skips_and_reports_bad_frames(tmp_path):
    (scene,) = render_scenes(num_scenes=1, num_views=4, size=16)
    _write_blender(tmp_path / "s", scene, "ngp")
    spec = json.loads((tmp_path / "s" / "transforms.json").read_text())
    spec["frames"].append({"file_path": "missing.png", "transform_matrix": spec["frames"][0]["transform_matrix"]})
    spec["frames"].append({"file_path": "frame_00.png", "transform_matrix": (2 * np.eye(4)).tolist()})
    spec["frames"].append({"file_path": "frame_01.png"})
    (tmp_path / "s" / "transforms.json").write_text(json.dumps(spec))
    report = convert_blender(tmp_path / "s", tmp_path / "out", max_size=8, workers=1, progress=False)
    assert report.written == 1 and report.views == 4
    reasons = dict(report.skipped)
    assert reasons["s/missing.png"] == "image not found"
    assert "not a rigid transform" in reasons["s/frame_00.png"]
    assert "bad transform_matrix" in reasons["s/frame_01.png"]
    summary = report.summary()
    assert "wrote 1 scenes (4 views)" in summary and "skipped: 3" in summary and "image not found" in summary
    got = _read_scenes(report.url, 4, size=8)["s"]
    assert got["images"].shape[-2:] == (8, 8)
    assert torch.allclose(got["K"][0, :2], torch.from_numpy(scene.K[0][:2] / 2).float(), atol=1e-5)  # max_size


# ---------------------------------------------------------------------------- COLMAP
@pytest.mark.parametrize("model", ["PINHOLE", "SIMPLE_PINHOLE", "OPENCV"])
def test_colmap_model_converts_to_the_same_cameras(tmp_path, model):
    (scene,) = render_scenes(num_scenes=1, num_views=5, size=32, start=7)
    write_colmap(tmp_path / "scene", scene, model)
    report = convert_colmap(tmp_path / "scene", tmp_path / "out", workers=1, progress=False)
    assert report.written == 1 and report.views == 5 and not report.skipped, report.summary()
    (got,) = _read_scenes(report.url, 5).values()
    _check_against(scene, got, 5)


def test_converters_keep_capture_order():
    names = ["frame_10.png", "Frame_2.png", "frame_1.png", "frame_100.png", "frame_9b.png", "frame_9.png"]
    assert sorted(names, key=capture_order_key) == [
        "frame_1.png", "Frame_2.png", "frame_9.png", "frame_9b.png", "frame_10.png", "frame_100.png"
    ]  # fmt: skip


def test_colmap_video_frames_keep_their_order(tmp_path):
    (scene,) = render_scenes(num_scenes=1, num_views=11, size=32, start=3)
    write_colmap(tmp_path / "scene", scene, name="frame_{}.png")  # frame_10 sorts before frame_2 as text
    report = convert_colmap(tmp_path / "scene", tmp_path / "out", workers=1, progress=False)
    (got,) = _read_scenes(report.url, 11).values()
    order = eval_view_order(11, 11, 1)  # all views: the shard's view v is frame_v
    assert torch.allclose(got["c2w"], torch.from_numpy(scene.c2w[order]).float(), atol=1e-5)


def test_colmap_distortion_is_ignored_with_a_note_or_refused(tmp_path):
    (scene,) = render_scenes(num_scenes=1, num_views=3, size=16)
    write_colmap(tmp_path / "scenes" / "a", scene, "SIMPLE_RADIAL")
    write_colmap(tmp_path / "scenes" / "b", scene, "PINHOLE")
    (tmp_path / "scenes" / "c" / "sparse" / "0").mkdir(parents=True)
    (tmp_path / "scenes" / "c" / "sparse" / "0" / "cameras.bin").write_bytes(b"\0" * 8)
    report = convert_colmap(tmp_path / "scenes", tmp_path / "out", workers=1, progress=False)
    assert report.written == 2
    assert any("distortion ignored" in note for _, note in report.notes)
    assert dict(report.skipped)["c"].startswith("binary COLMAP model only")
    strict = convert_colmap(tmp_path / "scenes", tmp_path / "out2", refuse_distortion=True, workers=1, progress=False)
    assert strict.written == 1  # scene a has no undistorted view left
    reasons = [why for what, why in strict.skipped if what.startswith("a")]
    assert sum("refused" in why for why in reasons) == 3 and "scene skipped: no usable views" in reasons


def test_colmap_images_txt_parsing_handles_empty_point_lines():
    text = "# comment\n1 1 0 0 0 0 0 0 1 a.png\n\n2 1 0 0 0 1 2 3 1 my image.png\n1.0 2.0 -1\n"
    parsed = parse_colmap_images(text)
    assert [(r[0], r[3], r[4]) for r in parsed] == [(1, 1, "a.png"), (2, 1, "my image.png")]
    assert np.allclose(parsed[1][2], [1, 2, 3])


# ---------------------------------------------------------------------------- image folders
def _image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, n in (("cat", 3), ("dog", 2)):
        (root / cls / "sub").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / cls / f"{i}.jpg")
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[2:8, 2:8] = [255, 0, 0, 255]
    Image.fromarray(rgba, "RGBA").save(root / "dog" / "sub" / "alpha.png")
    (root / "cat" / "broken.jpg").write_bytes(b"not an image")
    (root / "README.txt").write_text("top-level file")


def test_image_folder_becomes_labelled_single_view_shards(tmp_path):
    _image_folder(tmp_path / "src")
    report = convert_images(tmp_path / "src", tmp_path / "out", samples_per_shard=2, workers=1, progress=False)
    assert report.class_names == ["cat", "dog"]
    assert report.written == 6 and report.shards == 3
    reasons = dict(report.skipped)
    assert "unreadable image" in reasons["cat/broken.jpg"] and reasons["README.txt"] == "not in a class folder"
    dm = SingleViewShards(report.url, report.url, batch_size=8, num_workers=0, image_size=16, with_depth=False)
    dm.setup("validate")
    (batch,) = [dm.prepare_batch(b, train=False) for b in dm.val_dataloader()]
    labels = dict(zip(batch["key"], batch["label"].tolist()))
    assert labels == {"cat-0": 0, "cat-1": 0, "cat-2": 0, "dog-0": 1, "dog-1": 1, "dog-sub-alpha": 1}
    # the transparent PNG was composited over white
    alpha = batch["image"][batch["key"].index("dog-sub-alpha")]
    assert torch.allclose(alpha[:, 8, 8], torch.tensor([1.0, 0, 0]), atol=0.03)  # re-encoded as JPEG
    assert torch.allclose(alpha[:, 0, 0], torch.ones(3), atol=0.03)
    # JPEGs that need no change are copied byte for byte
    import tarfile

    with tarfile.open(report.url.replace("{000000..000002}", "000000")) as tar:
        names = tar.getnames()
        jpgs = [n for n in names if n.endswith(".jpg")]
        for name in jpgs:
            original = tmp_path / "src" / name.split(".")[0].replace("-", "/", 1)
            assert tar.extractfile(name).read() == original.with_suffix(".jpg").read_bytes()


def test_convert_commands_print_summaries(tmp_path, capsys):
    _image_folder(tmp_path / "src")
    args = ["data", "convert", "images", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--workers", "1",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "wrote 6 samples to 1 shard(s)" in text and "2 classes: cat, dog" in text and "broken.jpg" in text
    (scene,) = render_scenes(num_scenes=1, num_views=3, size=16)
    write_colmap(tmp_path / "colmap", scene)
    assert main(["data", "convert", "colmap", str(tmp_path / "colmap"), "--out", str(tmp_path / "c"), "--workers",
                 "1", "--no-progress"]) == 0  # fmt: skip
    assert "wrote 1 scenes (3 views)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["data", "convert", "blender", str(tmp_path / "nothing"), "--out", str(tmp_path / "b")])
    assert err.value.code == 2 and "is not a folder" in capsys.readouterr().err
    info = json.loads((tmp_path / "out" / "info.json").read_text())
    assert info["splits"]["train"]["class_names"] == ["cat", "dog"]


def test_image_folder_lists_the_files_it_does_not_convert(tmp_path):
    _image_folder(tmp_path / "src")
    Image.new("RGB", (8, 8)).save(tmp_path / "src" / "cat" / "anim.gif")
    (tmp_path / "src" / "dog" / "sub" / "notes.txt").write_text("not a picture")
    report = convert_images(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    reasons = dict(report.skipped)
    assert "cat/anim.gif" in reasons and ".gif" in reasons["cat/anim.gif"]
    assert "dog/sub/notes.txt" in reasons and ".txt" in reasons["dog/sub/notes.txt"]
    summary = report.summary()
    assert "cat/anim.gif" in summary and "dog/sub/notes.txt" in summary
    assert report.written == 6  # the readable images are still all written


# ---------------------------------------------------------------------------- names without ASCII letters
def _keys_and_paths(out: Path) -> dict[str, str]:
    """``{key: the source path recorded in its meta.json}`` of every sample in the shards under ``out``."""
    import tarfile

    found = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, field = member.name.partition(".")
                if field == "meta.json":
                    assert key not in found, key
                    found[key] = json.loads(tar.extractfile(member).read())["path"]
    return found


@pytest.mark.parametrize("classes", [True, False], ids=["class folders", "files at the top"])
def test_every_file_gets_a_distinct_key_whatever_its_name(tmp_path, capsys, classes):
    """Names with no ASCII letter (a class folder named in Chinese, such files at the top) stopped the whole
    conversion; accented names lost their letters (café, cafè -> caf, caf_2). Every file now has its own key,
    with the letters it has (accents dropped), none lost or merged."""
    names = ["咖啡.png", "紅茶.png", "café.png", "cafè.png", "a b.png", "a-b.png", "Ärger.png", "IMG_1.png"]
    src = tmp_path / "src"
    folder = src / "写真" if classes else src
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full((8, 8, 3), 10 * i, np.uint8)).save(folder / name)
    if classes:
        (src / "cats").mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "cats" / "咖啡.png")
    out = tmp_path / "out"
    assert main(["data", "convert", "images", str(src), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert f"wrote {len(names) + classes} samples" in capsys.readouterr().out
    keys = _keys_and_paths(out)
    assert len(keys) == len(names) + classes  # distinct keys: none lost, none merged
    expected = {str(Path("写真" if classes else "") / n) for n in names} | ({"cats/咖啡.png"} if classes else set())
    assert set(keys.values()) == expected
    by_path = {Path(path).name if Path(path).parent.name != "cats" else path: key for key, path in keys.items()}
    assert {by_path["café.png"], by_path["cafè.png"]} == {"cafe", "cafe_2"}  # the letters are kept
    assert {by_path["a b.png"], by_path["a-b.png"]} == {"a-b", "a-b_2"} and by_path["Ärger.png"] == "Arger"
    assert by_path["IMG_1.png"] == "IMG_1"
    assert re.fullmatch(r"u[0-9a-f]{8}", by_path["咖啡.png"]) and by_path["咖啡.png"] != by_path["紅茶.png"]


def test_scenes_named_without_ascii_letters_or_alike_convert_each(tmp_path):
    scenes = render_scenes(num_scenes=3, num_views=3, size=16, start=20)
    for name, scene in zip(("客厅", "a b", "a-b"), scenes):
        _write_blender(tmp_path / "src" / name, scene, "ngp")
    report = convert_blender(tmp_path / "src", tmp_path / "out", workers=1, progress=False)
    assert report.written == 3 and not report.skipped, report.summary()
    assert set(_read_scenes(report.url, 3)) >= {"a-b", "a-b_2"}
