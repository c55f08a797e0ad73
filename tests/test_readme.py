"""The README's worked example (a new objective plugged in through the CLI) runs as written."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from shards import write_singleview_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from selfsup3d.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str, section: str) -> list[str]:
    text = README.read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 1)
    return re.findall(rf"```{lang}\n(.*?)```", text[start : end if end > 0 else None], flags=re.S)


@pytest.mark.parametrize("which", [0, 1], ids=["alone", "beside-triplane-in-a-multi-task-run"])
def test_plug_in_example_runs_from_the_cli(tmp_path, monkeypatch, which):
    (code,) = _blocks("python", "Plugging in a new objective")
    configs = _blocks("yaml", "Plugging in a new objective")
    assert len(configs) == 2
    (tmp_path / "my_objectives.py").write_text(code)
    cfg = yaml.safe_load(configs[which])
    urls = write_singleview_shards(tmp_path / "shards", num_samples=8, size=32, with_depth=True)
    cfg["data"]["init_args"].update(train_urls=urls, num_workers=0, batch_size=4, image_size=32)
    cfg["model"]["init_args"]["encoder"]["init_args"].update(img_size=32, depth=2, embed_dim=32, num_heads=2)
    cfg["model"]["init_args"]["encoder"]["init_args"]["num_out_layers"] = 2
    cfg["trainer"].update(max_steps=2, accelerator="cpu", default_root_dir=str(tmp_path), enable_progress_bar=False)
    path = tmp_path / "my_objective.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_objectives", raising=False)
    main(["fit", "--config", str(path)])
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    if which == 1:
        assert any(k.startswith("objectives.centre.head.") for k in state)
        assert any(k.startswith("objectives.triplane.triplane.") for k in state)
        assert not any(".encoder." in k for k in state if k.startswith("objectives."))


def test_plug_in_example_learns_visibly(tmp_path, monkeypatch):
    """The worked example's loss falls well below guessing one colour for the whole batch within 60 steps."""
    (code,) = _blocks("python", "Plugging in a new objective")
    (tmp_path / "my_objectives.py").write_text(code)
    cfg = yaml.safe_load(_blocks("yaml", "Plugging in a new objective")[0])
    urls = write_singleview_shards(tmp_path / "shards", num_samples=32, size=32, num_shards=2)
    cfg["data"]["init_args"].update(train_urls=urls, num_workers=0, batch_size=16)
    cfg["trainer"].update(max_steps=60, accelerator="cpu", default_root_dir=str(tmp_path), enable_progress_bar=False)
    path = tmp_path / "my_objective.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_objectives", raising=False)
    main(["fit", "--config", str(path)])
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    loss = [e.value for e in events.Scalars("train/loss")[-3:]]
    guess = [e.value for e in events.Scalars("train/mse_of_the_batch_mean")[-3:]]
    assert sum(loss) < 0.6 * sum(guess), (loss, guess)
