"""The 3D-Prior objective: losses, ablations, teacher handling in checkpoints, learning on synthetic scenes."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_encoder
from lightning.pytorch import Trainer
from triplane_synthetic import SphereDataModule, sphere_batch

from selfsup3d.encoders.export import save_encoder
from selfsup3d.errors import CheckpointMismatchError, ConfigError
from selfsup3d.objectives.triplane import TriplaneReconstruction

TINY = dict(
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
    triplane_grid=4,
    triplane_size=16,
    triplane_channels=8,
    field_hidden=16,
    render_size=16,
    rays_per_image=64,
    num_coarse=8,
    num_fine=8,
    ray_chunk=32,
    near=1.5,
    far=4.5,
    fov_deg=40.0,
    lr=3e-3,
    warmup_steps=0,
)


def make(encoder=None, **kwargs) -> TriplaneReconstruction:
    return TriplaneReconstruction(encoder if encoder is not None else tiny_encoder(), **{**TINY, **kwargs})


def scalars(out: dict) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}


def trainer(tmp_path, max_steps: int, **kwargs) -> Trainer:
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        **kwargs,
    )


def test_step_reports_every_term_and_the_weighted_loss():
    torch.manual_seed(0)
    model = make(lambda_rgb=0.3, lambda_depth=2.0, lambda_dist=0.5, lambda_norm=0.1)
    batch = sphere_batch(3)
    with torch.no_grad():
        model.encoder.vit.norm.weight.add_(0.1)  # the student moves away from the teacher
    out = model.step(batch, "train", model.encoder)
    s = scalars(out)
    for key in ("rgb_loss", "depth_loss", "dist_loss", "density_l1", "psnr", "depth_rmse", "opacity", "teacher_cosine"):
        assert key in s, key
    assert s["dist_loss"] > 0
    expected = 0.3 * s["rgb_loss"] + 2.0 * s["depth_loss"] + 0.5 * s["dist_loss"] + 0.1 * s["density_l1"]
    assert s["loss"] == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    assert model.triplane.queries.grad is not None and model.encoder.vit.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())


def test_validation_renders_whole_images_for_pictures():
    model = make().eval()
    with torch.no_grad():
        out = model.step(sphere_batch(2), "val", model.encoder)
    assert out["render_rgb"].shape == (2, 3, 16, 16) and out["render_depth"].shape == (2, 1, 16, 16)
    assert out["target_depth"].shape == (2, 1, 16, 16) and out["depth_valid"].dtype == torch.bool
    assert out["render_depth"].min() >= 1.5 and out["render_depth"].max() <= 4.5


def test_representation_is_the_last_layers_concatenated():
    enc = tiny_encoder(num_out_layers=2)
    model = make(enc)
    feats = enc(torch.rand(1, 3, 32, 32))
    rep = model.representation(feats)
    assert rep.shape == (1, 1 + 16, 2 * 32)
    assert model.triplane.in_proj[1].in_features == 64


@pytest.mark.parametrize(
    "ablation",
    [{"decoder": "conv"}, {"lambda_dist": 0.0}, {"random_init": True}, {"plane_aggregate": "concat"}],
    ids=["no-triplane", "no-distillation", "random-init", "concat-planes"],
)
def test_ablations_build_and_train_a_step(ablation):
    torch.manual_seed(0)
    model = make(**ablation)
    out = model.step(sphere_batch(2), "train", model.encoder)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    if ablation.get("decoder") == "conv":
        assert model.triplane is None and "density_l1" not in out and "depth_loss" in out
    if ablation.get("lambda_dist") == 0.0:
        assert model.teacher is None and "dist_loss" not in out
        assert not any(k.startswith("teacher.") for k in model.state_dict())
    if ablation.get("random_init"):
        student = model.encoder.vit.blocks[0].attn.qkv.weight
        teacher = model.teacher.module.vit.blocks[0].attn.qkv.weight
        assert not torch.equal(student, teacher)


def test_configuration_errors_name_the_key():
    with pytest.raises(ConfigError, match="lambda_rgb"):
        make(lambda_rgb=-1.0)
    with pytest.raises(ConfigError, match="triplane_size"):
        make(triplane_size=24)
    with pytest.raises(ConfigError, match="num_out_layers"):
        make(tiny_encoder(num_out_layers=0))
    with pytest.raises(ConfigError, match="no depth"):
        (m := make()).step({"image": torch.rand(2, 3, 32, 32)}, "train", m.encoder)


def test_bf16_autocast_step_is_finite():
    model = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.step(sphere_batch(2), "train", model.encoder)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32


# ---------------------------------------------------------------------------- teacher and checkpoints
def _teacher_state(model: TriplaneReconstruction) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.teacher.module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_random_init_teacher_is_saved_once_and_resume_restores_it(tmp_path):
    torch.manual_seed(1)
    model = make()
    assert not model.teacher.reproducible
    original = _teacher_state(model)
    trainer(tmp_path, 2).fit(model, SphereDataModule(num_train=4, batch_size=2))
    ckpt_path = tmp_path / "run.ckpt"
    model.trainer.save_checkpoint(ckpt_path)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    teacher_keys = [k for k in state if k.startswith("teacher.")]
    assert len(teacher_keys) == len(original)  # written once
    student_after = {k: v.clone() for k, v in model.encoder.state_dict().items()}

    torch.manual_seed(2)  # a different random teacher before loading
    resumed = make()
    assert not _same(_teacher_state(resumed), original)
    t = trainer(tmp_path, 3)
    t.fit(resumed, SphereDataModule(num_train=4, batch_size=2), ckpt_path=ckpt_path)
    assert t.global_step == 3
    assert _same(_teacher_state(resumed), original)
    assert not _same(resumed.encoder.state_dict(), student_after)  # the student trained on


def test_reproducible_teacher_is_not_saved_and_resume_rebuilds_it(tmp_path):
    torch.manual_seed(3)
    source = tiny_encoder()
    weights = tmp_path / "enc.safetensors"
    save_encoder(source.export_state_dict(), None, weights)
    model = make(tiny_encoder(checkpoint_path=str(weights)))
    assert model.teacher.reproducible
    original = _teacher_state(model)
    assert _same({k.removeprefix("vit."): v for k, v in original.items()}, source.export_state_dict())
    trainer(tmp_path, 2).fit(model, SphereDataModule(num_train=4, batch_size=2))
    ckpt_path = tmp_path / "run.ckpt"
    model.trainer.save_checkpoint(ckpt_path)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("encoder.") for k in state)

    resumed = make(tiny_encoder(checkpoint_path=str(weights)))
    t = trainer(tmp_path, 3)
    t.fit(resumed, SphereDataModule(num_train=4, batch_size=2), ckpt_path=ckpt_path)
    assert _same(_teacher_state(resumed), original)
    # and load_from_checkpoint rebuilds encoder and teacher from the saved hyper-parameters
    loaded = TriplaneReconstruction.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True)
    assert _same(_teacher_state(loaded), original)
    assert torch.equal(
        loaded.encoder.vit.pos_embed, torch.load(ckpt_path, weights_only=True)["state_dict"]["encoder.vit.pos_embed"]
    )


def test_teacher_from_another_file_and_mismatched_checkpoints(tmp_path):
    torch.manual_seed(4)
    other = tiny_encoder(embed_dim=48, num_heads=2)
    weights = tmp_path / "teacher.safetensors"
    save_encoder(other.export_state_dict(), other.config, weights)
    model = make(teacher=str(weights))
    assert model.teacher.reproducible and model.teacher.module.embed_dim == 48
    assert isinstance(model.distill_proj, torch.nn.Linear)  # 2x32 student dims -> 2x48 teacher dims
    out = model.step(sphere_batch(2), "train", model.encoder)
    assert out["dist_loss"] > 0
    # a checkpoint missing weights is refused, naming them
    bad = {"state_dict": {k: v for k, v in model.state_dict().items() if not k.startswith("triplane.")}}
    with pytest.raises(CheckpointMismatchError, match="triplane"):
        model.on_load_checkpoint(bad)


# ---------------------------------------------------------------------------- learning
def test_depth_error_falls_when_fitting_a_few_scenes():
    torch.manual_seed(0)
    model = make(rays_per_image=128, lambda_dist=0.0)
    batch = sphere_batch(4)
    model.eval()
    with torch.no_grad():
        before = float(model.step(batch, "val", model.encoder)["depth_rmse"])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        model.step(batch, "train", model.encoder)["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(model.step(batch, "val", model.encoder)["depth_rmse"])
    assert after < 0.6 * before, (before, after)
