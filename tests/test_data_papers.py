"""The papers' data sets (RealEstate10K chunks, LVSM/RayZer JSON, DL3DV, CO3Dv2): scenes written in each source's
own convention from known cameras (640x360, off-centre principal point, a world that is no camera's) convert
through the CLI back to the same K and poses (up to one rigid motion of the world), CO3D's float16 depth comes
back and reprojects between views; bad input is listed as skipped in one line."""

from __future__ import annotations

import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from papers import (
    DETAIL,
    HEIGHT,
    WIDTH,
    check_cameras,
    distorted_texture,
    intrinsics,
    re10k_scene,
    read_shards,
    shard_cameras,
    shard_depth,
    texture,
    write_co3d,
    write_dl3dv,
    write_lvsm,
    write_re10k,
)
from PIL import Image

from selfsup3d.cli import main


def _convert(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["data", "convert", *argv, "--workers", "1", "--no-progress"]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------- RealEstate10K (pixelSplat chunks)
def test_re10k_chunks_convert_to_the_same_cameras_and_the_same_jpegs(tmp_path, capsys):
    truth = write_re10k(tmp_path / "re10k" / "test")
    printed = _convert(capsys, "re10k", str(tmp_path / "re10k"), "--out", str(tmp_path / "out"), "--split", "test")
    assert "wrote 3 scenes (18 views)" in printed
    assert "broken00000000" in printed and "missing field(s) cameras" in printed
    scenes = read_shards(tmp_path / "out")
    assert sorted(scenes) == sorted(truth)
    for key, (Ks, c2w, images) in truth.items():
        sample = scenes[key]
        check_cameras(sample, Ks, c2w)
        assert sample["cameras"]["width"] == WIDTH and sample["cameras"]["height"] == HEIGHT
        # capture order, and the JPEG bytes copied unchanged
        assert [sample["fields"][f"{i:03d}.jpg"] for i in range(len(images))] == images
        assert sample["meta"]["source"] == "re10k" and sample["meta"]["timestamps"][1] == 33_366


def test_re10k_parts_together_hold_every_scene_and_a_rerun_changes_nothing(tmp_path, capsys):
    truth = write_re10k(tmp_path / "re10k")
    out = tmp_path / "out"
    for part in ("1/2", "2/2"):
        _convert(capsys, "re10k", str(tmp_path / "re10k"), "--out", str(out), "--part", part)
    assert sorted(read_shards(out)) == sorted(truth)
    assert {p.name for p in out.glob("*.tar")} == {"train-part1of2-000000.tar", "train-part2of2-000000.tar"}
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    printed = _convert(capsys, "re10k", str(tmp_path / "re10k"), "--out", str(out), "--part", "2/2")
    assert "wrote 2 scenes" in printed and before == {p.name: p.read_bytes() for p in out.glob("*.tar")}


def test_re10k_bad_chunks_are_listed_in_one_line(tmp_path, capsys):
    folder = tmp_path / "re10k"
    scene, *_ = re10k_scene("aaaa", 3, 0)
    folder.mkdir()
    torch.save([dict(scene, cameras=scene["cameras"][:, :17])], folder / "000000.torch")
    torch.save({"not": "a list"}, folder / "000001.torch")
    (folder / "000002.torch").write_bytes(b"not a torch file")
    torch.save([dict(scene, key="bbbb")], folder / "000003.torch")
    printed = _convert(capsys, "re10k", str(folder), "--out", str(tmp_path / "out"))
    assert "wrote 1 scenes" in printed
    assert "aaaa: cameras must be [N, 18], got [3, 17]" in printed
    assert "000001.torch: a chunk must hold a list of scene dicts, got dict" in printed
    assert "000002.torch: unreadable chunk" in printed


# ---------------------------------------------------------------------------- LVSM / RayZer per-scene JSON
@pytest.mark.parametrize("source", ["full_list.txt", "metadata"])
def test_lvsm_and_rayzer_json_convert_to_the_same_cameras(tmp_path, capsys, source):
    truth = write_lvsm(tmp_path / "lvsm")
    printed = _convert(capsys, "lvsm", str(tmp_path / "lvsm" / source), "--out", str(tmp_path / "out"))
    assert "wrote 2 scenes (10 views)" in printed
    assert "odd.json: unknown schema: a frame needs image_path, fxfycxcy, w2c (LVSM)" in printed
    scenes = read_shards(tmp_path / "out")
    assert sorted(scenes) == sorted(truth)
    for name, (Ks, c2w) in truth.items():
        check_cameras(scenes[name], Ks, c2w)
        assert scenes[name]["meta"]["schema"] == name.split("_")[1]


def test_lvsm_frames_with_bad_cameras_are_listed(tmp_path, capsys):
    truth = write_lvsm(tmp_path / "lvsm")
    path = tmp_path / "lvsm" / "metadata" / "scene_lvsm.json"
    body = json.loads(path.read_text())
    body["frames"][1]["w2c"] = np.diag([2.0, 1, 1, 1]).tolist()
    body["frames"][2]["fxfycxcy"] = [500, 500, 300]
    path.write_text(json.dumps(body))
    printed = _convert(capsys, "lvsm", str(path), "--out", str(tmp_path / "out"))
    assert "scene_lvsm/1: ValueError: w2c is not a rigid transform" in printed
    assert "scene_lvsm/2: ValueError: fxfycxcy must hold 4 numbers, got shape [3]" in printed
    (sample,) = read_shards(tmp_path / "out").values()
    Ks, c2w = truth["scene_lvsm"]
    check_cameras(sample, Ks[[0, 3, 4]], c2w[[0, 3, 4]])


# ---------------------------------------------------------------------------- DL3DV (nerfstudio transforms.json)
def test_dl3dv_scenes_convert_to_the_same_cameras_undistorted(tmp_path, capsys):
    truth = write_dl3dv(tmp_path / "dl3dv")
    printed = _convert(capsys, "dl3dv", str(tmp_path / "dl3dv"), "--out", str(tmp_path / "out"),
                       "--images", "images_4", "--image-format", "png")  # fmt: skip
    assert "wrote 2 scenes (8 views)" in printed
    assert "scene_sheared: ValueError: applied_transform is not a rigid transform" in printed
    scenes = read_shards(tmp_path / "out")
    assert sorted(scenes) == ["scene_dl3dv", "scene_nerfstudio"]
    for name, sample in scenes.items():
        Ks, c2w = truth[name]
        check_cameras(sample, Ks, c2w)
        assert sample["meta"]["applied_transform"] == name.split("_")[1]
        # applied_transform undone: the poses are in the world the cameras were made in, not merely up to a motion
        assert np.allclose(shard_cameras(sample)[1], c2w, atol=1e-6)
    # distortion undone: the views are the pinhole pictures (borders aside), which the distorted files are not
    sample = scenes["scene_dl3dv"]
    for i in range(4):
        with Image.open(io.BytesIO(sample["fields"][f"{i:03d}.png"])) as im:
            got = np.asarray(im).astype(float)[20:-20, 20:-20]
        want = texture(seed=i, frequency=DETAIL).astype(float)[20:-20, 20:-20]
        raw = distorted_texture(intrinsics(0), i).astype(float)[20:-20, 20:-20]
        assert np.abs(got - want).mean() < 0.5, np.abs(got - want).mean()
        assert np.abs(raw - want).mean() > 8.0  # what the distortion does where it is not undone


# ---------------------------------------------------------------------------- CO3Dv2 (PyTorch3D cameras)
def _unproject(depth: np.ndarray, K: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    v, u = np.nonzero(depth > 0)
    rays = np.linalg.inv(K) @ np.stack([u + 0.5, v + 0.5, np.ones(u.size)])
    return (c2w[:3, :3] @ (rays * depth[v, u]) + c2w[:3, 3:]).T


def _bilinear(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    x, y = u - 0.5, v - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    top = image[y0, x0] * (1 - fx) + image[y0, x0 + 1] * fx
    bottom = image[y0 + 1, x0] * (1 - fx) + image[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def test_co3d_sequences_convert_to_the_same_cameras_and_float16_depth_that_reprojects(tmp_path, capsys):
    truth = write_co3d(tmp_path / "co3d")
    printed = _convert(capsys, "co3d", str(tmp_path / "co3d"), "--out", str(tmp_path / "out"), "--min-quality", "0.5")
    assert "wrote 2 scenes (8 views)" in printed
    assert "teddybear/103_3_3: viewpoint_quality_score 0.100 < 0.5" in printed
    scenes = read_shards(tmp_path / "out")
    assert sorted(scenes) == ["teddybear-101_1_1", "teddybear-102_2_2"]
    for key, sample in scenes.items():
        Ks, c2w, depths = truth[key.replace("-", "/", 1)]
        check_cameras(sample, Ks, c2w)
        K_got, c2w_got = shard_cameras(sample)
        got = [shard_depth(sample, i) for i in range(4)]
        for want, have in zip(depths, got):
            assert np.array_equal(have > 0, want > 0)  # the depth masks' holes are holes
            # float16 (11 significant bits) then the shard's 16-bit quantisation (half a step)
            tol = want * 2.0**-11 + sample["cameras"]["depth_scale"]
            assert np.all(np.abs(have - want) <= tol)
        # view 0's depth, unprojected and projected into view 1, lands on view 1's depth
        points = _unproject(got[0], K_got[0], c2w_got[0])
        cam = (np.linalg.inv(c2w_got[1]) @ np.c_[points, np.ones(len(points))].T)[:3]
        uv = (K_got[1] @ cam)[:2] / cam[2]
        inside = (uv[0] > 61) & (uv[0] < WIDTH - 1) & (uv[1] > 41) & (uv[1] < HEIGHT - 1)
        assert inside.mean() > 0.5
        there = _bilinear(got[1], uv[0, inside], uv[1, inside])
        assert np.abs(there - cam[2, inside]).max() / cam[2, inside].min() < 2e-3


def test_co3d_set_lists_choose_the_frames(tmp_path, capsys):
    truth = write_co3d(tmp_path / "co3d")
    category = tmp_path / "co3d" / "teddybear"
    printed = _convert(capsys, "co3d", str(category), "--out", str(tmp_path / "out"),
                       "--set-list", "fewview_dev", "--split", "train")  # fmt: skip
    assert "wrote 1 scenes (3 views)" in printed
    (sample,) = read_shards(tmp_path / "out").values()
    Ks, c2w, _ = truth["teddybear/101_1_1"]
    check_cameras(sample, Ks[[0, 2, 3]], c2w[[0, 2, 3]])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["data", "convert", "co3d", str(category), "--out", str(tmp_path / "o2"), "--set-list", "manyview"])
    assert exit_.value.code == 2
    assert "set_lists_manyview.json does not exist" in capsys.readouterr().err


def test_the_readme_converts_re10k_with_the_commands_it_shows(tmp_path, capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("### The papers' data sets") : text.index("## The encoder")]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("selfsup3d data convert re10k")]
    assert len(commands) == 2
    for split in ("train", "test"):
        write_re10k(tmp_path / "re10k" / split)
    for command in commands:
        args = [a.replace("path/to/re10k", str(tmp_path / "re10k")).replace("data/re10k", str(tmp_path / "out"))
                for a in command[1:]]  # fmt: skip
        _convert(capsys, *args[2:])
    assert {p.name for p in (tmp_path / "out").glob("*.tar")} == {"train-000000.tar", "test-000000.tar"}


def test_co3d_max_size_scales_intrinsics_and_depth_with_the_images(tmp_path, capsys):
    truth = write_co3d(tmp_path / "co3d")
    _convert(capsys, "co3d", str(tmp_path / "co3d"), "--out", str(tmp_path / "out"), "--max-size", "320",
             "--min-quality", "0.5")  # fmt: skip
    sample = read_shards(tmp_path / "out")["teddybear-102_2_2"]
    Ks, c2w, depths = truth["teddybear/102_2_2"]
    half = np.diag([0.5, 0.5, 1.0])
    check_cameras(sample, half @ Ks, c2w)
    depth = shard_depth(sample, 1)
    assert depth.shape == (HEIGHT // 2, WIDTH // 2)
    # nearest neighbour: every stored depth is one of the full-size map's (within the float16 tolerance)
    sampled = depths[1][1::2, 1::2]
    assert np.all(np.abs(depth - sampled) <= sampled * 2.0**-11 + sample["cameras"]["depth_scale"])
