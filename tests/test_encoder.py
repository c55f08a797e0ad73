"""The shared encoder: timm sizes and names, weights from files and the hub, export, teachers, outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from conftest import tiny_encoder
from safetensors.torch import save_file

from selfsup3d.encoders import SIZES, ViTEncoder, make_teacher
from selfsup3d.encoders.export import load_exported_encoder, save_encoder
from selfsup3d.errors import CheckpointMismatchError, ConfigError


def test_outputs_shapes(encoder):
    out = encoder(torch.rand(2, 3, 32, 32))
    assert out.cls.shape == (2, 32)
    assert out.patches.shape == (2, 16, 32)
    assert out.grid == (4, 4)
    assert out.patch_grid.shape == (2, 32, 4, 4)
    assert len(out.layers) == 2 and out.layers[0].shape == (2, 17, 32)
    assert out.concat_layers().shape == (2, 17, 64)
    # the grid is the patch tokens laid out row-major
    assert torch.equal(out.patch_grid[:, :, 1, 2], out.patches[:, 1 * 4 + 2])


def test_last_layer_matches_final_tokens(encoder):
    out = encoder(torch.rand(1, 3, 32, 32))
    assert torch.allclose(out.layers[-1][:, 0], out.cls, atol=1e-6)
    assert torch.allclose(out.layers[-1][:, 1:], out.patches, atol=1e-6)


def test_other_resolutions_interpolate_positions(encoder):
    assert encoder(torch.rand(1, 3, 48, 24)).grid == (6, 3)


def test_bad_input_is_explained(encoder):
    with pytest.raises(ValueError, match="multiple of the encoder patch size 8"):
        encoder(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        encoder(torch.rand(3, 32, 32))


@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_builds_offline(size):
    enc = ViTEncoder(size, img_size=28)
    expected = {"tiny": 192, "small": 384, "base": 768, "large": 1024}[size]
    assert enc.embed_dim == expected and enc.patch_size == 14
    assert all(block.attn.fused_attn for block in enc.vit.blocks)  # scaled_dot_product_attention path


def test_any_timm_dinov2_name_and_registers():
    enc = ViTEncoder("vit_small_patch14_reg4_dinov2", img_size=28, depth=1, num_out_layers=1)
    out = enc(torch.rand(1, 3, 28, 28))
    assert enc.num_prefix_tokens == 5
    assert out.patches.shape == (1, 4, 384) and out.layers[0].shape == (1, 5, 384)  # registers dropped


def test_unknown_name_and_bad_sizes_fail_clearly():
    with pytest.raises(ConfigError, match="unknown encoder name 'huge'"):
        ViTEncoder("huge")
    with pytest.raises(ConfigError, match="img_size=.* is not divisible by the patch size 8"):
        tiny_encoder(img_size=36)
    with pytest.raises(ConfigError, match=r"encoder.init_args.num_out_layers must be in \[0, depth=2\], got 3"):
        tiny_encoder(num_out_layers=3)


def test_pretrained_in_offline_mode_says_what_to_do(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from selfsup3d.errors import WeightsUnavailableError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(WeightsUnavailableError, match="checkpoint_path") as err:
        ViTEncoder("small", img_size=28, pretrained=True)
    assert "HF_HUB_OFFLINE" in str(err.value) and "timm/vit_small_patch14_dinov2.lvd142m" in str(err.value)


def test_pretrained_without_network_says_what_to_do_at_once(no_network):
    from selfsup3d.errors import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="checkpoint_path") as err:
        ViTEncoder("test_vit", img_size=32, pretrained=True)
    assert "cannot be reached" in str(err.value)
    assert len(no_network) == 1  # one short probe, not a minute of retries per file


def _cache_hub_weights(cache: Path, repo: str, tensors: dict) -> None:
    """Lay ``tensors`` out as ``model.safetensors`` of ``repo`` in a Hugging Face cache (as a download would)."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "snapshots" / commit).mkdir(parents=True)
    save_file(tensors, str(folder / "snapshots" / commit / "model.safetensors"))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)


def test_pretrained_weights_in_the_cache_load_without_network(no_network, tmp_path):
    from huggingface_hub import constants

    torch.manual_seed(0)
    reference = timm.create_model("test_vit", pretrained=False, num_classes=0)
    _cache_hub_weights(Path(constants.HF_HUB_CACHE), "timm/test_vit.r160_in1k", reference.state_dict())
    enc = ViTEncoder("test_vit", img_size=32, pretrained=True)
    assert torch.equal(enc.vit.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    assert len(no_network) <= 1


def test_pretrained_loads_through_timm_from_local_file(tmp_path):
    """timm's own pretrained path (the one pretrained=True takes), fed with a file the test saved."""
    small = ViTEncoder("small", img_size=28, depth=1, num_out_layers=1)
    path = tmp_path / "small.safetensors"
    save_file(small.export_state_dict(), str(path))
    vit = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path)},
        img_size=28,
        depth=1,
        num_classes=0,
        dynamic_img_size=True,
    )
    x = small.normalize(torch.rand(1, 3, 28, 28))
    assert torch.allclose(vit.forward_features(x), small.vit.forward_features(x))


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "lightning"])
def test_checkpoint_path_round_trip(tmp_path, encoder, fmt):
    sd = encoder.export_state_dict()
    path = tmp_path / f"weights.{'ckpt' if fmt == 'lightning' else fmt}"
    if fmt == "pth":
        torch.save(sd, path)
    elif fmt == "safetensors":
        save_file(sd, str(path))
    else:  # a selfsup3d checkpoint: encoder under encoder.vit., heads and teacher beside it
        full = {f"encoder.vit.{k}": v for k, v in sd.items()}
        full["head.weight"] = torch.zeros(3, 3)
        full.update({f"teacher.module.vit.{k}": v + 1 for k, v in sd.items()})
        torch.save({"state_dict": full, "hyper_parameters": {}}, path)
    torch.manual_seed(1)
    loaded = tiny_encoder(checkpoint_path=str(path))
    x = torch.rand(2, 3, 32, 32)
    encoder.eval(), loaded.eval()
    assert torch.equal(encoder(x).patches, loaded(x).patches)


def test_mismatched_checkpoint_names_keys(tmp_path, encoder):
    sd = encoder.export_state_dict()
    sd.pop("blocks.1.mlp.fc2.weight")
    sd["blocks.7.attn.qkv.weight"] = torch.zeros(1)
    sd["norm.weight"] = torch.zeros(5)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as err:
        tiny_encoder(checkpoint_path=str(path))
    msg = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.weight" in msg
    assert "unexpected keys (1): blocks.7.attn.qkv.weight" in msg
    assert "norm.weight (5,) vs model (32,)" in msg


def test_missing_checkpoint_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        tiny_encoder(checkpoint_path=str(tmp_path / "nope.pth"))


def test_export_round_trip_rebuilds_from_metadata(tmp_path, encoder):
    path = save_encoder(encoder.export_state_dict(), {**encoder.config}, tmp_path / "enc.safetensors")
    rebuilt = load_exported_encoder(path)
    x = torch.rand(1, 3, 32, 32)
    encoder.eval(), rebuilt.eval()
    assert torch.equal(encoder(x).cls, rebuilt(x).cls)


def test_teacher_is_frozen_and_runs_in_eval_mode_whatever_the_model_mode():
    torch.manual_seed(0)
    student = tiny_encoder(drop_path_rate=0.5)  # stochastic depth: train and eval mode differ
    teacher = make_teacher(student)
    teacher.train()  # the surrounding model trains (no "modules in eval mode" warning from Lightning)
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 3, 32, 32)
    a, b = teacher(x).cls, teacher(x).cls
    assert torch.equal(a, b) and not a.requires_grad  # deterministic: eval mode inside the forward
    student.eval()
    assert torch.allclose(a, student(x).cls)
    assert teacher.training and teacher.module.training  # the mode is restored after the forward


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = tiny_encoder()
    b = tiny_encoder(grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32)
    for enc in (a, b):
        enc(x).concat_layers().square().mean().backward()
    ga = a.vit.blocks[0].attn.qkv.weight.grad
    gb = b.vit.blocks[0].attn.qkv.weight.grad
    assert b.vit.grad_checkpointing and torch.allclose(ga, gb, atol=1e-6)


def test_layer_scale_init_override():
    default = tiny_encoder()
    neutral = tiny_encoder(layer_scale_init=1.0)
    assert torch.allclose(default.vit.blocks[0].ls1.gamma, torch.full((32,), 1e-5))
    assert torch.allclose(neutral.vit.blocks[0].ls1.gamma, torch.ones(32))
    assert set(default.state_dict()) == set(neutral.state_dict())  # same key schema as DINOv2
    with pytest.raises(ConfigError, match="cannot use pretrained weights"):
        ViTEncoder("small", pretrained=True, layer_scale_init=1.0)


# ---------------------------------------------------------------------------- files that are not weights
class _NotATensor:
    """A pickled object torch's safe loader refuses (what a full-model torch.save leaves in a file)."""


@pytest.mark.parametrize("content", ["text", "pickled object", "bad safetensors"])
def test_a_file_that_is_not_weights_is_refused_in_one_sentence(tmp_path, content):
    from selfsup3d.errors import WeightsFileError

    path = tmp_path / ("weights.safetensors" if content == "bad safetensors" else "weights.ckpt")
    if content == "pickled object":
        torch.save({"model": _NotATensor()}, path)
    else:
        path.write_bytes(b"these are my notes, not weights\n" * 4)
    with pytest.raises(WeightsFileError) as err:
        tiny_encoder(checkpoint_path=str(path))
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg
    assert "weights_only=False" not in msg  # torch's advice to load untrusted pickles is not passed on


# ---------------------------------------------------------------------------- architecture, not only shapes
def test_weights_of_another_architecture_are_refused_naming_the_fields(tmp_path):
    torch.manual_seed(0)
    source = tiny_encoder(num_heads=2)
    path = save_encoder(source.export_state_dict(), source.config, tmp_path / "enc.safetensors")
    # num_heads leaves every tensor shape unchanged: only the recorded architecture tells them apart
    with pytest.raises(CheckpointMismatchError, match=r"num_heads 2 .*4"):
        tiny_encoder(num_heads=4, checkpoint_path=str(path))
    tiny_encoder(num_heads=2, checkpoint_path=str(path))  # the same architecture loads


def test_lightning_checkpoint_of_another_architecture_is_refused(tmp_path):
    from toy import RotationPrediction, tiny_encoder_config

    source = RotationPrediction(tiny_encoder(num_heads=2))
    ckpt = tmp_path / "run.ckpt"
    # what LightningCLI saves: the encoder as its class_path/init_args config
    hparams = {"encoder": tiny_encoder_config(num_heads=2)}
    torch.save({"state_dict": source.state_dict(), "hyper_parameters": hparams}, ckpt)
    with pytest.raises(CheckpointMismatchError, match=r"num_heads 2 .*4"):
        RotationPrediction(tiny_encoder(num_heads=4), init_encoder_from=str(ckpt))
    RotationPrediction(tiny_encoder(num_heads=2), init_encoder_from=str(ckpt))
