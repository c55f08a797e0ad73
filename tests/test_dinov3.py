"""DINOv3 (timm's Eva-based ``vit_*_dinov3``: RoPE, register tokens, LayerScale as ``gamma_1``) end to end, with a
tiny random model built here (no downloads): the encoder, a config fitted by the CLI, the export that plain timm
loads, a released timm weights file as a teacher and as a probed encoder."""

from __future__ import annotations

import json

import timm
import torch
import yaml
from probe_synthetic import write_plane_shards
from test_cli import _features_in_plain_timm, run_dir, write_config
from test_probe_command import FAST
from toy import tiny_encoder_config

from selfsup3d.cli import main
from selfsup3d.cli.probe import main as probe_main
from selfsup3d.encoders import ViTEncoder
from selfsup3d.encoders.architecture import vit_architecture
from selfsup3d.encoders.export import load_exported_encoder, read_metadata
from selfsup3d.encoders.teacher import build_teacher

NAME = "vit_small_patch16_dinov3"
SHAPE = dict(img_size=32, embed_dim=32, depth=2, num_heads=2)  # patch 16, as the released models


def _tiny(**kwargs) -> ViTEncoder:
    return ViTEncoder(NAME, num_out_layers=2, **SHAPE, **kwargs)


def test_the_dinov3_encoder_gives_class_patch_and_layer_tokens_on_any_grid():
    torch.manual_seed(0)
    encoder = _tiny()
    assert encoder.num_prefix_tokens == 5 and encoder.patch_size == 16  # class + 4 registers
    out = encoder(torch.rand(2, 3, 32, 48))  # RoPE: any grid, no position table to resample
    assert out.grid == (2, 3) and out.patches.shape == (2, 6, 32) and out.cls.shape == (2, 32)
    assert [tuple(t.shape) for t in out.layers] == [(2, 7, 32)] * 2  # class token + patches, registers left out
    arch = vit_architecture(encoder.vit)
    assert arch["layer_scale"] and arch["reg_tokens"] == 4 and arch["mlp_hidden"] == 128
    scales = {g["lr_scale"] for g in encoder.param_groups(weight_decay=0.05, layer_decay=0.75)}
    dinov2 = ViTEncoder(
        "tiny", patch_size=16, num_out_layers=2, **SHAPE
    )  # timm's layer decay reads Eva's group matcher as a ViT's
    assert (
        scales == {g["lr_scale"] for g in dinov2.param_groups(weight_decay=0.05, layer_decay=0.75)} and len(scales) == 3
    )


def test_a_dinov3_config_fits_and_its_export_loads_in_plain_timm(tmp_path):
    cfg = yaml.safe_load(write_config(tmp_path, max_steps=2).read_text())
    cfg["model"]["init_args"]["encoder"] = tiny_encoder_config(name=NAME, patch_size=None, img_size=32)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp_path / "config.yaml")])
    export = run_dir(tmp_path) / "encoder.safetensors"
    meta = read_metadata(export)
    assert meta["timm_name"] == NAME and json.loads(meta["timm_kwargs"])["init_values"] == 1e-5
    encoder = load_exported_encoder(export).eval()
    images = torch.rand(2, 3, 32, 32)
    folder = tmp_path / "plain"
    folder.mkdir()
    (folder / "encoder.safetensors").write_bytes(export.read_bytes())
    expected = encoder.vit.forward_features(encoder.normalize(images))
    assert torch.allclose(_features_in_plain_timm(folder, images), expected, atol=1e-6)
    # the probe suite measures it as any other encoder
    data = write_plane_shards(tmp_path / "shards", 4, num_views=4, size=32, split="val")
    probe = write_plane_shards(tmp_path / "shards", 4, num_views=4, size=32, split="train", start=50)
    argv = [f"dinov3={export}", "--data", data, "--probe-data", probe, "--test-scenes", "2", *FAST]
    assert probe_main([*argv, "--out", str(tmp_path / "probe.json")]) == 0
    report = json.loads((tmp_path / "probe.json").read_text())
    assert "dinov3" in json.dumps(report)


def test_released_dinov3_weights_are_a_teacher_and_a_starting_point(tmp_path):
    """A timm DINOv3 state dict (as timm saves released weights), made here from a random model."""
    torch.manual_seed(1)
    released = timm.create_model(NAME, pretrained=False, num_classes=0, **SHAPE).eval()
    path = tmp_path / "dinov3.pth"
    torch.save(released.state_dict(), path)
    x = torch.rand(2, 3, 32, 32)
    student = _tiny()
    teacher = build_teacher(str(path), student)
    expected = released.forward_features(teacher.encoder.normalize(x))
    out = teacher(x)
    assert torch.allclose(out.cls, expected[:, 0], atol=1e-6) and torch.allclose(
        out.patches, expected[:, 5:], atol=1e-6
    )
    assert not any(p.requires_grad for p in teacher.parameters())
    # continuing pretraining from the released weights: the student starts from them
    started = _tiny(checkpoint_path=str(path))
    assert torch.allclose(started(x).cls, out.cls, atol=1e-6)
