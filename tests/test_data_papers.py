"""The papers' data sets (RealEstate10K chunks, LVSM/RayZer JSON, DL3DV, CO3Dv2): scenes written in each source's
own convention from known cameras (640x360, off-centre principal point, a world that is no camera's) convert
through the CLI back to the same K and poses (up to one rigid motion of the world), CO3D's float16 depth comes
back and reprojects between views; bad input is listed as skipped in one line."""

from __future__ import annotations

import gzip
import json
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
