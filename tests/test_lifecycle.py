"""The fine-tune recipe of docs/lifecycle.md, command by command on tiny shards: pretrain with the masked-view
objective, fine-tune its encoder with the triplane objective, export, and distil a third run from the export."""

from __future__ import annotations

from pathlib import Path

import torch
from shards import write_multiview_shards

from selfsup3d.cli import main
from selfsup3d.encoders.export import load_exported_encoder

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "lifecycle.md"


def recipe() -> list[list[str]]:
    """The commands of the doc's recipe block (``selfsup3d ...`` lines), as argument lists."""
    block = DOC.read_text().split("<!-- recipe -->")[1]
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    return [line.split()[1:] for line in lines if line.startswith("selfsup3d ")]


def test_the_fine_tune_recipe_runs_as_written(tmp_path, monkeypatch):
    # the triplane demo reads data/embedded (8 views), the masked-view demo data/orbit (windows of up to 16 views)
    for name, views in (("embedded", 8), ("orbit", 16)):
        data = tmp_path / "data" / name
        write_multiview_shards(data, num_scenes=4, num_views=views, size=64, num_shards=4)  # the demos name 4
        write_multiview_shards(data, num_scenes=1, num_views=views, size=64, num_shards=1, split="val", seed=1)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)  # the recipe's relative paths: configs/, data/, runs/
    small = ["--trainer.max_steps", "2", "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
             "--data.init_args.batches_per_epoch", "2", "--data.init_args.val_batches", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.max_time", "null",
             "--trainer.callbacks", "[]"]  # fmt: skip
    commands = recipe()
    assert [c[0] for c in commands] == ["fit", "fit", "export", "fit"], commands
    for command in commands:
        if command[0] == "fit":
            main([*command, *small])
        else:
            assert main(command) == 0

    pretrained = torch.load("runs/demo_masked_view/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    tuned = torch.load("runs/demo_finetune_triplane/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert any(k.startswith("camera.") for k in pretrained["state_dict"])  # masked-view heads
    assert any(k.startswith("triplane.") for k in tuned["state_dict"])  # triplane heads, the same encoder keys
    enc = sorted(k for k in pretrained["state_dict"] if k.startswith("encoder."))
    assert enc == sorted(k for k in tuned["state_dict"] if k.startswith("encoder."))
    export = next(a for c in commands if c[0] == "export" for a in c[c.index("--out") + 1 :][:1])
    exported = load_exported_encoder(export).vit.state_dict()
    assert all(torch.equal(v, tuned["state_dict"][f"encoder.vit.{k}"]) for k, v in exported.items())
    third = torch.load("runs/demo_triplane/lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert third["hyper_parameters"]["teacher"] == export
    assert not any(k.startswith("teacher.") for k in third["state_dict"])  # rebuilt from the file, not saved
    # a 96-wide 4-layer student representation, a 64-wide 3-block teacher
    assert third["state_dict"]["distill_proj.weight"].shape == (64 * 3, 96 * 4)
