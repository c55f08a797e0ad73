"""The papers' data sets (RealEstate10K chunks, LVSM/RayZer JSON, DL3DV, CO3Dv2): scenes written in each source's
own convention from known cameras (640x360, off-centre principal point, a world that is no camera's) convert
through the CLI back to the same K and poses (up to one rigid motion of the world), CO3D's float16 depth comes
back and reprojects between views; bad input is listed as skipped in one line."""

from __future__ import annotations

import gzip
import io
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from papers import (
    HEIGHT,
    WIDTH,
    cameras,
    check_cameras,
    intrinsics,
    jpeg,
    plane_depth,
    read_shards,
    shard_cameras,
    shard_depth,
    texture,
)
from PIL import Image

from selfsup3d.cli import main

GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def _convert(capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["data", "convert", *argv, "--workers", "1", "--no-progress"]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------- RealEstate10K (pixelSplat chunks)
def _re10k_scene(key: str, n: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray, list[bytes]]:
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


def write_re10k(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[bytes]]]:
    """Two chunks (three good scenes, one without cameras), as pixelSplat's converter saves them."""
    folder.mkdir(parents=True)
    truth = {}
    chunks: list[list[dict]] = [[], []]
    for i, (key, n) in enumerate((("5aca87f95a9412c6", 6), ("0a1b2c3d4e5f6789", 5), ("ffee001122334455", 7))):
        scene, Ks, c2w, images = _re10k_scene(key, n, i)
        chunks[min(i, 1)].append(scene)
        truth[key] = (Ks, c2w, images)
    broken = dict(chunks[1][0], key="broken00000000")
    del broken["cameras"]
    chunks[1].append(broken)
    for i, chunk in enumerate(chunks):
        torch.save(chunk, folder / f"{i:06d}.torch")
    return truth


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
    scene, *_ = _re10k_scene("aaaa", 3, 0)
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
def _save(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=90)


def write_lvsm(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """LVSM's layout (metadata/*.json beside images/, full_list.txt): one scene per schema, one of neither."""
    truth = {}
    entries = []
    for s, (name, schema) in enumerate((("scene_lvsm", "lvsm"), ("scene_rayzer", "rayzer"))):
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
    (root / "metadata" / "odd.json").write_text(json.dumps({"frames": [{"path": "x.jpg", "K": [1, 2, 3, 4]}]}))
    entries.append("metadata/odd.json")
    (root / "full_list.txt").write_text("\n".join(entries) + "\n")
    return truth


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
DL3DV_APPLIED = np.array([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, -1, 0]])  # DL3DV's (older nerfstudio)
NERFSTUDIO_APPLIED = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, -1, 0, 0]])  # what nerfstudio writes today
DISTORTION = np.array([-0.06, 0.015, 0.0012, -0.0008])  # k1 k2 p1 p2


def distorted_texture(K: np.ndarray, seed: int) -> np.ndarray:
    """The image a camera with :data:`DISTORTION` takes of :func:`texture`'s pinhole picture: each distorted pixel
    shows the pinhole image at its undistorted position (kornia's iterative inverse)."""
    from kornia.geometry.calibration import undistort_points

    v, u = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    points = torch.from_numpy(np.stack([u.ravel(), v.ravel()], -1))[None]
    pinhole = undistort_points(points, torch.from_numpy(K)[None], torch.from_numpy(DISTORTION)[None], num_iters=20)
    pu, pv = pinhole[0, :, 0].numpy(), pinhole[0, :, 1].numpy()
    phase = seed * 0.7
    channels = [np.sin(pu / 37 + phase) * np.cos(pv / 29), np.cos(pu / 53 - pv / 41 + phase), np.sin((pu + pv) / 61)]
    return (127.5 + 100 * np.stack(channels, -1)).round().astype(np.uint8).reshape(HEIGHT, WIDTH, 3)


def write_dl3dv(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Three scenes as DL3DV ships them (nerfstudio/transforms.json at 4x the size of images_4/, OpenGL cameras
    in a world moved by applied_transform): DL3DV's and today's nerfstudio's applied_transform, one not rigid."""
    truth = {}
    K = intrinsics(0)
    for s, (name, applied) in enumerate(
        (("scene_dl3dv", DL3DV_APPLIED), ("scene_nerfstudio", NERFSTUDIO_APPLIED), ("scene_sheared", None))
    ):
        n = 4
        c2w = cameras(n, seed=20 + s)
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
        want = texture(seed=i).astype(float)[20:-20, 20:-20]
        raw = distorted_texture(intrinsics(0), i).astype(float)[20:-20, 20:-20]
        assert np.abs(got - want).mean() < 1.5, np.abs(got - want).mean()
        assert np.abs(raw - want).mean() > 10 * np.abs(got - want).mean()


# ---------------------------------------------------------------------------- CO3Dv2 (PyTorch3D cameras)
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


def write_co3d(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray, list[np.ndarray]]]:
    """One category, three sequences (one per NDC format, one of low quality), depth with masks, a set list."""
    category = root / "teddybear"
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
            base = f"teddybear/{sequence}"
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
        truth[f"teddybear/{sequence}"] = (Ks, c2w, depths)
    frames.reverse()  # annotations in any order: frame_number gives the capture order
    for name, body in (("frame_annotations.jgz", frames), ("sequence_annotations.jgz", sequences)):
        with gzip.open(category / name, "wt") as f:
            json.dump(body, f)
    (category / "set_lists").mkdir()
    lists = {"train": [["101_1_1", 1, "x"], ["101_1_1", 21, "x"], ["101_1_1", 31, "x"]], "val": [], "test": []}
    (category / "set_lists" / "set_lists_fewview_dev.json").write_text(json.dumps(lists))
    return truth


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
