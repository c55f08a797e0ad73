"""Unposed captures: ``selfsup3d data convert video|frames`` on videos made here (several codecs and containers,
a shot change, a still stretch, a truncated file), resumed after a kill and split into parts; the unposed
scenes train masked-view prediction from the README's commands, and an objective that needs cameras refuses
them at start-up."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from videos import scene_frames, video_folder, write_video

from selfsup3d.cli import main
from selfsup3d.datamodules import MultiViewShards
from selfsup3d.datamodules.prepare.clips import ClipOptions
from selfsup3d.datamodules.prepare.journal import Part
from selfsup3d.datamodules.prepare.sequences import convert_frames
from selfsup3d.datamodules.prepare.video import convert_video
from selfsup3d.errors import ConfigError

pytest.importorskip("av")
ROOT = Path(__file__).resolve().parents[1]


def _readme_commands(word: str) -> list[list[str]]:
    """The README's command lines (Data section) that contain ``word``, split like a shell."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Data") : text.index("## The encoder")]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#") and word in line:
                lines.append(shlex.split(line))
    return lines


def _replace(args: list[str], mapping: dict[str, str]) -> list[str]:
    out = []
    for a in args:
        for old, new in mapping.items():
            a = a.replace(old, new)
        out.append(a)
    return out


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


def test_videos_nobody_recorded_convert_train_and_validate_from_the_readme(tmp_path, capsys, monkeypatch):
    """A new user's folder (H.264 MP4, VP9 WebM with a shot change, MPEG-4 AVI that stops moving, a truncated MP4, a
    text file) -> the README's convert command -> masked-view fit and validate on the unposed clips."""
    video_folder(tmp_path / "videos", seconds=4.0)
    write_video(tmp_path / "held_out" / "other.mkv", scene_frames(120, 96, 64, seed=21))
    monkeypatch.chdir(tmp_path)
    converts = _readme_commands("convert video")
    assert len(converts) >= 2, "the README shows how to convert training and validation videos"
    small = ["--clip-frames", "16", "--size", "32", "--no-progress", "--workers", "1"]
    for command, src in zip(converts[:2], ("videos", "held_out")):
        args = _replace(command[1:], {"path/to/videos": src, "path/to/more_videos": src})
        assert main(args + small) == 0
    out = capsys.readouterr().out
    assert "broken.mp4: unreadable video" in out  # the truncated file is named ...
    assert "notes.txt: .txt file is not a video type" in out
    train = tmp_path / "data" / "video"
    info = json.loads((train / "info.json").read_text())["splits"]
    assert info["train"]["written"] >= 4 and info["val"]["written"] >= 1  # ... and the others converted
    assert info["train"]["dropped"].get("still clip", 0) >= 1
    assert info["train"]["dropped"].get("frames before a shot change", 0) >= 1
    dm = MultiViewShards(str(train / "train-*.tar"), None, num_views=4, image_size=32, num_workers=0)
    dm.setup("fit")
    assert not dm.data_spec().has_cameras
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape[1:] == (4, 3, 32, 32) and "c2w" not in batch and "K" not in batch
    assert {k.rsplit("_", 1)[0] for k in batch["key"]} <= {"walk-mp4", "trip-cut-webm", "still-avi"}

    fits = [c for c in _readme_commands("fit --config configs/demo/masked_view.yaml") if "data/video" in " ".join(c)]
    validates = [c for c in _readme_commands("validate") if "data/video" in " ".join(c)]
    assert fits and validates, "the README shows masked-view training and validation on the converted video"
    config = str(ROOT / "configs" / "demo" / "masked_view.yaml")
    quick = ["--trainer.max_steps", "3", "--data.init_args.batches_per_epoch", "3", "--data.init_args.batch_size",
             "2", "--data.init_args.num_workers", "0", "--trainer.check_val_every_n_epoch", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "r")]  # fmt: skip
    main(_replace(fits[0][1:], {"configs/demo/masked_view.yaml": config}) + quick)
    capsys.readouterr()
    main(_replace(validates[0][1:], {"configs/demo/masked_view.yaml": config}) + quick[6:])
    printed = capsys.readouterr().out
    assert "Masked-view prediction on the validation scenes' novel views" in printed
    assert re.search(r"\d+\.\d+\s+\d\.\d+\s+model", printed)  # the render figures
    assert "Pose figures need cameras" in printed and "rotation error" not in printed


def _convert_command(src: Path, out: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "selfsup3d.cli", "data", "convert", "video", str(src), "--out", str(out),
            "--clip-frames", "6", "--size", "48", "--fps", "15", "--shard-size", "2", "--workers", str(workers),
            "--no-progress"]  # fmt: skip


def _many_videos(root: Path, n: int = 8) -> Path:
    for i in range(n):
        write_video(root / f"clip_{i}.mp4", scene_frames(60, 160, 96, seed=40 + i, speed=1.0))
    return root


def test_a_conversion_killed_part_way_resumes_to_the_same_shards(tmp_path):
    src = _many_videos(tmp_path / "src")
    whole = tmp_path / "whole"
    subprocess.run(_convert_command(src, whole, workers=2), check=True, capture_output=True)
    expected = _shards(whole)
    assert len(expected) >= 4

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_convert_command(src, killed, workers=1), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    journal = killed / "train.journal.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not journal.exists():
        time.sleep(0.01)
    assert proc.poll() is None, "the conversion finished before it could be killed: give it more work"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads(journal.read_text())
    assert not state["complete"] and 1 <= state["position"]["shards"] < len(expected)
    assert len(list(killed.glob("*.tar"))) < len(expected)

    rerun = subprocess.run(_convert_command(src, killed, workers=1), check=True, capture_output=True, text=True)
    assert f"wrote {json.loads((whole / 'info.json').read_text())['splits']['train']['written']} scenes" in rerun.stdout
    assert _shards(killed) == expected  # same samples, same bytes
    assert not list(killed.glob("*.partial"))
    stamps = {p.name: p.stat().st_mtime_ns for p in killed.iterdir()}
    again = subprocess.run(_convert_command(src, killed, workers=1), check=True, capture_output=True, text=True)
    assert again.stdout == rerun.stdout  # a re-run on finished output prints the summary again ...
    assert {p.name: p.stat().st_mtime_ns for p in killed.iterdir()} == stamps  # ... and changes nothing


def test_parts_together_hold_the_whole_conversion_and_other_options_are_refused(tmp_path):
    src = _many_videos(tmp_path / "src", n=5)
    options = dict(clips=ClipOptions(6, (32, 32)), fps=15, scenes_per_shard=3, workers=1, progress=False)
    whole = convert_video(src, tmp_path / "whole", **options)
    parts = [convert_video(src, tmp_path / "parts", part=f"{i}/2", **options) for i in (1, 2)]
    assert sum(p.written for p in parts) == whole.written and all(p.written for p in parts)
    names = sorted(p.name for p in (tmp_path / "parts").glob("*.tar"))
    assert names and all(n.startswith(("train-part1of2-", "train-part2of2-")) for n in names)
    info = json.loads((tmp_path / "parts" / "info.json").read_text())["splits"]
    assert set(info) == {"train-part1of2", "train-part2of2"}

    def keys(folder: Path) -> list[str]:
        dm = MultiViewShards(str(folder / "*.tar"), str(folder / "*.tar"), num_views=2, image_size=32,
                             num_workers=0, batch_size=64)  # fmt: skip
        dm.setup("validate")
        return sorted(k for batch in dm.val_dataloader() for k in batch["key"])

    assert keys(tmp_path / "parts") == keys(tmp_path / "whole")
    with pytest.raises(FileExistsError, match=r"other options: clip_frames 6 -> 8"):
        convert_video(src, tmp_path / "whole", **{**options, "clips": ClipOptions(8, (32, 32))})
    assert Part.parse("3/8") == Part(3, 8) and Part.parse(None) == Part()
    with pytest.raises(ValueError, match="--part must be i/n"):
        Part.parse("0/4")


def test_frame_folders_become_clips_in_natural_order(tmp_path):
    frames = scene_frames(30, 64, 48, seed=7)
    for seq in ("a", "b"):
        (tmp_path / "seqs" / seq).mkdir(parents=True)
        for i, rgb in enumerate(frames):
            Image.fromarray(rgb).save(tmp_path / "seqs" / seq / f"frame_{i}.jpg")
    (tmp_path / "seqs" / "b" / "frame_12.jpg").write_bytes(b"not a jpeg")
    report = convert_frames(tmp_path / "seqs", tmp_path / "out", clips=ClipOptions(8, (32, 32)), workers=1,
                            progress=False)  # fmt: skip
    # a: frames 0-23 in 3 clips; b: 0-7, then the broken frame 12 ends the clip of 8-11, then 13-20 and 21-28
    assert report.written == 6, report.summary()
    assert [what for what, _ in report.skipped] == ["b/frame_12.jpg"] and "unreadable" in report.skipped[0][1]
    assert report.dropped["frames beside an unreadable one"] == 4
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        metas = {m.name: json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith("meta.json")}
    assert metas["a_0001.meta.json"]["frames"] == list(range(8, 16))  # natural order: frame_9 before frame_10
    assert metas["b_0001.meta.json"]["frames"] == list(range(13, 21))
    assert metas["a_0000.meta.json"]["source"] == "frames"
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        first = np.asarray(Image.open(tar.extractfile("a_0001.000.jpg")))
    expected = np.asarray(Image.fromarray(frames[8]).resize((43, 32), Image.Resampling.BILINEAR))[:, 5:37]
    assert np.abs(first.astype(float) - expected).mean() < 8  # frame 8, resized to cover 32x32 and centre-cropped


def test_an_objective_that_needs_cameras_refuses_unposed_scenes_in_one_line(tmp_path, capsys):
    write_video(tmp_path / "v.mp4", scene_frames(60, 64, 64, seed=3))
    report = convert_video(tmp_path / "v.mp4", tmp_path / "out", clips=ClipOptions(6, (64, 64)), workers=1,
                           progress=False)  # fmt: skip
    assert report.written
    config = str(ROOT / "configs" / "demo" / "consensus.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", config, "--data.init_args.train_urls", report.url, "--data.init_args.val_urls",
              "null", "--data.init_args.num_workers", "0"])  # fmt: skip
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "needs the data's cameras" in x)
    assert "FeatureConsensus" in line and "model.init_args.cameras=data" in line
    assert "data.init_args.train_urls" in line
    dm = MultiViewShards(report.url, None, num_views=4, image_size=32, num_workers=0, with_cameras=True)
    with pytest.raises(ConfigError, match=r"with_cameras=true but the scenes of data.init_args.train_urls"):
        dm.setup("fit")
    assert "none with cameras (unposed)" in dm.inventories["train"].summary("training")


def test_clip_selection_drops_still_and_duplicate_clips(tmp_path):
    still = scene_frames(30, 64, 48, seed=2, speed=0.0)
    moving = scene_frames(30, 64, 48, seed=2)
    write_video(tmp_path / "loop.mp4", moving + moving)  # a loop: the second pass repeats the first
    write_video(tmp_path / "still.mp4", still)
    report = convert_video(tmp_path, tmp_path / "out", fps=None, clips=ClipOptions(10, (32, 32)), workers=1,
                           progress=False)  # fmt: skip
    assert report.dropped.get("still clip") == 3
    assert report.dropped.get("near-duplicate clip") == 3
    assert report.written == 3
