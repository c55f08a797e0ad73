"""Masked-view prediction: shapes at any view count and split, camera-free loss, initial cameras, errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_encoder

from selfsup3d.datamodules import DataSpec
from selfsup3d.errors import CheckpointMismatchError, ConfigError
from selfsup3d.geometry.cameras import intrinsics_from_fov, look_at, rotation_angle, spherical_to_cartesian
from selfsup3d.geometry.rays import pixel_rays
from selfsup3d.heads.latent_renderer import ContextBlend, camera_proximity
from selfsup3d.objectives.masked_view import MaskedViewPrediction

HEADS = dict(dim=32, num_heads=2, camera_layers=1, scene_layers=1, render_layers=1, num_scene_tokens=8)


def sphere_scenes(num_scenes: int, num_views: int, size: int, num_context: int, seed: int = 0) -> dict:
    """Multi-view batches following the data contract, ray-traced analytically: a unit sphere with four
    coloured quadrants on a coloured background, cameras on a sphere of radius 3 looking at it."""
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(num_scenes, num_views, generator=g) * 2 * math.pi
    el = torch.rand(num_scenes, num_views, generator=g) * 0.8 - 0.2
    eye = spherical_to_cartesian(az, el, torch.full_like(az, 3.0))
    c2w = look_at(eye, torch.zeros_like(eye))
    K = intrinsics_from_fov(torch.full((num_scenes, num_views), math.radians(50.0)), size, size)
    o, d = pixel_rays(K, c2w, size, size)  # [S, V, H, W, 3]
    b = (o * d).sum(-1)
    disc = b * b - ((o * o).sum(-1) - 1.0)
    hit = disc > 0
    p = o + (-b - disc.clamp(min=0).sqrt())[..., None] * d
    colours = torch.rand(num_scenes, 5, 3, generator=g)  # four quadrants and the background
    quadrant = (p[..., 0] > 0).long() * 2 + (p[..., 2] > 0).long()
    idx = torch.arange(num_scenes)[:, None, None, None].expand_as(quadrant)
    shade = 0.6 + 0.4 * (-(d * p).sum(-1)).clamp(0, 1)
    fg = colours[idx, quadrant] * shade[..., None]
    bg = colours[:, 4][:, None, None, None].expand_as(fg)
    images = torch.where(hit[..., None], fg, bg).permute(0, 1, 4, 2, 3).contiguous()
    return {
        "images": images.float(),
        "K": K.float(),
        "c2w": c2w.float(),
        "num_context": num_context,
        "label": torch.full((num_scenes,), -1),
        "key": [f"scene{i:03d}" for i in range(num_scenes)],
    }


def make_model(**kwargs) -> MaskedViewPrediction:
    torch.manual_seed(0)
    cfg = {**HEADS, **kwargs}
    encoder = cfg.pop("encoder", None) or tiny_encoder(num_out_layers=0)
    return MaskedViewPrediction(encoder, **cfg)


@pytest.mark.parametrize("options", [{}, {"blend_context": True, "render_context_tokens": True, "ray_positions": True}])
@pytest.mark.parametrize(("views", "context"), [(2, 1), (5, 2), (8, 6)])
def test_any_view_count_and_split_with_one_model(views, context, options):
    model = make_model(**options)
    batch = sphere_scenes(2, views, 32, context)
    out = model.step(batch, "train", model.encoder)
    assert torch.isfinite(out["loss"]) and out["loss"].ndim == 0
    pred = model(batch["images"], context)
    assert pred["render"].shape == (2, views - context, 3, 32, 32)
    assert pred["c2w"].shape == (2, views, 4, 4) and pred["K"].shape == (2, views, 3, 3)
    assert ((pred["render"] >= 0) & (pred["render"] <= 1)).all()


def test_other_resolution_and_patch_size_from_the_encoder():
    model = make_model(encoder=tiny_encoder(num_out_layers=0, img_size=48, patch_size=16))
    pred = model(torch.rand(1, 3, 3, 48, 64), 2)  # non-square too
    assert pred["render"].shape == (1, 1, 3, 48, 64)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model(torch.rand(1, 3, 3, 40, 48), 2)
    with pytest.raises(ValueError, match="num_context=3"):
        model(torch.rand(1, 3, 3, 48, 48), 3)


def test_cameras_start_at_identity_pose_and_the_initial_field_of_view():
    model = make_model(init_fov_deg=60.0)
    pred = model(sphere_scenes(3, 4, 32, 2)["images"], 2)
    c2w = pred["c2w"]
    assert torch.equal(c2w[:, 0], torch.eye(4).expand(3, 4, 4))  # the canonical view is the reference
    assert rotation_angle(c2w[:, 1:, :3, :3]).max() < math.radians(1.0)
    assert c2w[:, 1:, :3, 3].norm(dim=-1).max() < 0.05
    fov = 2 * torch.atan(0.5 * 32 / pred["K"][..., 0, 0])
    assert torch.allclose(fov, torch.full_like(fov, math.radians(60.0)), atol=math.radians(1.0))


@pytest.mark.parametrize("options", [{}, {"reprojection_weight": 1.0, "blend_context": True}])
def test_loss_never_reads_the_true_cameras(options):
    model = make_model(**options)
    batch = sphere_scenes(3, 4, 32, 2)
    gen = torch.Generator().manual_seed(1)
    shuffled = dict(batch, K=batch["K"][torch.randperm(3, generator=gen)] * 1.7, c2w=batch["c2w"].flip(1))
    shuffled["c2w"][..., :3, 3] += 5.0
    deleted = {k: v for k, v in batch.items() if k not in ("K", "c2w")}
    for stage in ("train", "val"):
        reference = model.step(batch, stage, model.encoder)["loss"]
        assert torch.equal(model.step(shuffled, stage, model.encoder)["loss"], reference)
        assert torch.equal(model.step(deleted, stage, model.encoder)["loss"], reference)
    # evaluation without true cameras still reports render quality, only no pose figures
    out = model.step(deleted, "val", model.encoder)
    assert "psnr_mean_colour" in out and "rot_err" not in out and "psnr_nearest" not in out


@pytest.mark.parametrize("aids", [False, True])
def test_nan_cameras_leave_the_loss_and_its_gradients_unchanged(aids):
    """Poisoned true cameras: any read of K or c2w on the loss path would turn the loss or a gradient into NaN."""
    options = {"blend_context": aids, "render_context_tokens": aids, "ray_positions": aids}
    options["reprojection_weight"] = 0.0 if aids else 1.0
    batch = sphere_scenes(2, 5, 32, 3)
    poisoned = dict(batch, K=torch.full_like(batch["K"], math.nan), c2w=torch.full_like(batch["c2w"], math.nan))
    grads = []
    for b in (batch, poisoned):
        model = make_model(**options)
        loss = model.step(b, "train", model.encoder)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


@pytest.mark.parametrize("blend", [False, True])
def test_gradients_reach_the_encoder_and_every_head(blend):
    model = make_model(blend_context=blend, render_context_tokens=blend, reprojection_weight=float(blend))
    model.step(sphere_scenes(2, 4, 32, 2), "train", model.encoder)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    # the encoder's class token feeds nothing (only patch tokens are used)
    assert [n for n in missing if "cls_token" not in n] == []
    pose = model.camera.pose_head.fc2.weight.grad
    assert pose.abs().sum() > 0  # the photometric loss trains the camera estimator


def test_validation_reports_renders_baselines_and_pose_accuracy():
    model = make_model()
    batch = sphere_scenes(2, 5, 32, 3)
    out = model.validation_step(batch, 0) if model._trainer else model.step(batch, "val", model.encoder)
    for key in ("psnr", "ssim", "psnr_mean_colour", "ssim_mean_colour", "psnr_nearest", "ssim_nearest", "rot_err",
                "trans_err", "centre_err", "auc5", "auc15", "auc30", "focal_err"):  # fmt: skip
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    assert out["render"].shape == out["target"].shape == (2, 2, 3, 32, 32)
    assert out["pred_c2w"].shape == out["gt_c2w"].shape == (2, 5, 4, 4)
    assert 0 <= out["auc30"] <= 1


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = sphere_scenes(2, 4, 32, 2)
    grads = []
    for ckpt in (False, True):
        model = make_model(grad_checkpointing=ckpt)
        model.step(batch, "train", model.encoder)["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("blend", [False, True])
def test_bf16_autocast_step_on_the_cpu(blend):
    model = make_model(blend_context=blend, render_context_tokens=blend, ray_positions=blend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.step(sphere_scenes(2, 4, 32, 2), "val", model.encoder)
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert torch.isfinite(out["rot_err"])


def test_compile_option_compiles_in_place_without_renaming_weights():
    model = make_model(compile=True)
    keys = set(model.state_dict())
    model.configure_model()
    model.configure_model()  # idempotent
    assert set(model.state_dict()) == keys
    assert model.encoder._compiled_call_impl is not None
    assert all(b._compiled_call_impl is not None for b in model.renderer.transformer.blocks)


def test_configuration_errors_name_the_keys():
    with pytest.raises(ConfigError, match="model.init_args.dim=33 is not divisible by model.init_args.num_heads"):
        make_model(dim=33)
    with pytest.raises(ConfigError, match="model.init_args.perceptual_weights"):
        make_model(perceptual_weight=0.5)
    with pytest.raises(ConfigError, match="render_layers"):
        make_model(render_layers=0)
    with pytest.raises(ConfigError, match="model.init_args.blend_context=true is an aid of the latent renderer"):
        make_model(renderer="gaussians", blend_context=True)

    model = make_model()

    def check(image_hw, num_views=4, num_context_views=2):
        spec = DataSpec("multi_view", image_hw, num_views, num_context_views, has_cameras=True)
        model.check_data(spec)

    check((32, 32))  # fine
    check((32, 48))  # (height, width)
    with pytest.raises(ConfigError, match=r"data.init_args.image_size=\[32, 44\]"):
        check((32, 44))
    with pytest.raises(ConfigError) as err:
        check((36, 36))
    assert "data.init_args.image_size=36" in str(err.value)
    assert "model.init_args.encoder.init_args.patch_size=8" in str(err.value)
    with pytest.raises(ConfigError, match=r"data.init_args.num_context_views=0: set A"):
        check((32, 32), num_context_views=0)
    with pytest.raises(ConfigError, match=r"data.init_args.num_views=3 with data.init_args.num_context_views=3"):
        check((32, 32), num_views=3, num_context_views=3)


def vgg_stub(path, num_layers: int = 1) -> None:
    """A VGG19 state dict of the first ``num_layers`` perceptual layers with random weights (no download)."""
    from selfsup3d.losses.perceptual import VGG19_LAYERS, vgg19_features

    torch.manual_seed(3)
    features = vgg19_features(VGG19_LAYERS[num_layers - 1] + 1)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)


def test_perceptual_loss_from_a_local_file(tmp_path):
    path = tmp_path / "vgg19.pth"
    vgg_stub(path, num_layers=2)
    model = make_model(perceptual_weight=0.5, perceptual_weights=str(path), perceptual_layers=2)
    assert not any(k.startswith("perceptual") for k in model.state_dict())  # an external asset, not saved
    assert all(not n.startswith("perceptual") for n, _ in model.named_parameters())
    out = model.step(sphere_scenes(2, 4, 32, 2), "train", model.encoder)
    assert out["perceptual"] > 0
    assert torch.allclose(out["loss"], out["mse"] + 0.5 * out["perceptual"])
    img = torch.rand(2, 3, 32, 32)
    assert model.perceptual(img, img) == 0
    out["loss"].backward()  # differentiable through the frozen network
    assert all(p.grad is None for p in model.perceptual.net.parameters())
    # the file holds only two layers: asking for three names the missing keys
    with pytest.raises(CheckpointMismatchError, match="missing"):
        make_model(perceptual_weight=0.5, perceptual_weights=str(path), perceptual_layers=3)
    with pytest.raises(FileNotFoundError):
        make_model(perceptual_weight=0.5, perceptual_weights=str(tmp_path / "none.pth"))


def test_vgg19_prefix_matches_torchvision_layout():
    from torchvision.models.vgg import cfgs, make_layers

    from selfsup3d.losses.perceptual import VGG19_LAYERS, vgg19_features

    full = make_layers(cfgs["E"])
    assert all(isinstance(full[i], torch.nn.ReLU) for i in VGG19_LAYERS)
    part = vgg19_features(VGG19_LAYERS[2] + 1)
    assert [type(m) for m in part] == [type(m) for m in full[: VGG19_LAYERS[2] + 1]]
    assert {k: v.shape for k, v in part.state_dict().items()} == {
        k: v.shape for k, v in full[: VGG19_LAYERS[2] + 1].state_dict().items()
    }


def test_context_blend_starts_at_the_context_mean_and_weighs_near_cameras_more():
    batch = sphere_scenes(2, 5, 32, 3)
    context, c2w = batch["images"][:, :3], batch["c2w"]
    blend = ContextBlend(init_sharpness=4.0)
    eye = torch.eye(4).expand(2, 5, 4, 4)
    assert torch.allclose(
        blend(context, eye[:, :3], eye[:, 3:]), context.mean(1, keepdim=True).expand(2, 2, -1, -1, -1)
    )
    # the target sits on context view 1; with a sharp blend, view 1 dominates
    sharp = ContextBlend(init_sharpness=200.0)
    target_c2w = c2w[:, 1:2].clone()
    out = sharp(context, c2w[:, :3], target_c2w)
    assert torch.allclose(out[:, 0], context[:, 1], atol=1e-3)


def test_camera_proximity_has_a_gradient_where_cameras_coincide():
    eye = torch.eye(4).expand(1, 1, 4, 4)
    moved = eye.clone().requires_grad_(True)
    d = camera_proximity(moved, eye)
    assert d.item() == pytest.approx(1e-4)
    shifted = eye.clone()
    shifted[..., 0, 3] = 1e-3
    shifted.requires_grad_(True)
    camera_proximity(shifted, eye).sum().backward()
    assert shifted.grad[..., 0, 3].item() > 0.9  # ~1: the distance grows linearly, not quadratically
    # symmetric, and 1 - cos of a quarter turn about z
    quarter = torch.tensor([[0.0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]).expand(1, 1, 4, 4)
    assert camera_proximity(quarter, eye).item() == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(camera_proximity(quarter, eye), camera_proximity(eye, quarter))


def test_picture_grid_rows_and_enlargement():
    from selfsup3d.callbacks import MaskedViewPictures

    b, va, vb, size = 2, 3, 2, 16
    outputs = {
        "context": torch.rand(b, va, 3, size, size),
        "target": torch.rand(b, vb, 3, size, size),
        "render": torch.rand(b, vb, 3, size, size),
        "gt_c2w": torch.eye(4).expand(b, va + vb, 4, 4).clone(),
    }
    outputs["gt_c2w"][:, :, 0, 3] = torch.arange(va + vb, dtype=torch.float32)
    grid = MaskedViewPictures(max_scenes=2, min_size=64).render_grid(outputs)
    # per scene 4 rows (context, targets, renders, nearest views) of 64-pixel views with 2 pixels of padding,
    # after a margin on the left that names the rows
    margin = grid.shape[-1] - va * (64 + 4)
    assert grid.shape[:2] == (3, b * 4 * (64 + 4)) and margin > 0
    plain = MaskedViewPictures(max_scenes=1, min_size=1).render_grid(outputs)
    assert plain.shape[:2] == (3, 4 * (size + 4)) and plain.shape[-1] > va * (size + 4)
    # the enlarged context row shows the views pixel for pixel
    assert torch.equal(grid[:, 2 : 2 + 64 : 4, margin + 2 : margin + 2 + 64 : 4], outputs["context"][0, 0])


# ---------------------------------------------------------------------------- the explicit renderer (E-RayZer)
GAUSSIANS = {"renderer": "gaussians", "gaussian_eps2d": 0.05}


@pytest.mark.parametrize(("views", "context"), [(2, 1), (5, 2)])
def test_gaussian_renderer_any_view_count_and_its_outputs(views, context):
    model = make_model(**GAUSSIANS)
    batch = sphere_scenes(2, views, 32, context)
    pred = model(batch["images"], context)
    assert pred["render"].shape == (2, views - context, 3, 32, 32)
    assert pred["depth"].shape == pred["opacity"].shape == (2, context, 1, 32, 32)
    assert pred["colour"].shape == (2, context, 3, 32, 32)
    assert pred["alpha"].shape == pred["target_depth"].shape == (2, views - context, 1, 32, 32)
    # every pixel starts at the initial depth, opacity and its own colour
    assert torch.allclose(pred["depth"], torch.ones_like(pred["depth"]), rtol=0.02)
    assert torch.allclose(pred["colour"], batch["images"][:, :context].clamp(1e-3, 1 - 1e-3), atol=0.02)
    assert model.renderer is None and model.gaussians is not None


@pytest.mark.parametrize("renderer", ["latent", "gaussians"])
def test_nan_cameras_leave_the_explicit_and_latent_losses_unchanged(renderer):
    """``cameras: predicted`` never reads the batch's cameras, whichever renderer draws the targets."""
    batch = sphere_scenes(2, 4, 32, 2)
    poisoned = dict(batch, K=torch.full_like(batch["K"], math.nan), c2w=torch.full_like(batch["c2w"], math.nan))
    grads = []
    for b in (batch, poisoned):
        model = make_model(renderer=renderer)
        loss = model.step(b, "train", model.encoder)["loss"]
        loss.backward()
        assert torch.isfinite(loss)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


def test_gradients_of_the_explicit_renderer_reach_cameras_depth_and_encoder():
    model = make_model(**GAUSSIANS)
    model.step(sphere_scenes(2, 4, 32, 2), "train", model.encoder)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    # the class token feeds nothing, the scene tokens feed only the background colour here
    assert [n for n in missing if "cls_token" not in n] == []
    assert model.camera.pose_head.fc2.weight.grad.abs().sum() > 0
    assert model.gaussians.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("renderer", ["latent", "gaussians"])
def test_oracle_cameras_come_from_the_data(renderer):
    """``cameras: data`` (the LVSM oracle) renders with the batch's cameras: relative to view 0, the farthest
    camera at distance 1; other cameras give another loss; a source without cameras is refused at start-up."""
    model = make_model(renderer=renderer, cameras="data")
    batch = sphere_scenes(2, 4, 32, 2)
    K, c2w = model.data_cameras(batch)
    assert torch.allclose(c2w[:, 0], torch.eye(4).expand(2, 4, 4), atol=1e-5)
    assert torch.allclose(c2w[:, :, :3, 3].norm(dim=-1).amax(1), torch.ones(2))
    assert torch.equal(K, batch["K"])
    moved = dict(batch, c2w=batch["c2w"].flip(1))
    reference = model.step(batch, "train", model.encoder)["loss"]
    reference.backward()  # the camera estimator is frozen and not run: every trainable weight has a gradient (DDP)
    assert not any(p.requires_grad for p in model.camera.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert not torch.equal(model.step(moved, "train", model.encoder)["loss"], reference)
    # a rigid motion and a scale of the whole world leave the oracle's cameras as they were
    world = look_at(torch.tensor([[0.3, -2.0, 1.0]]), torch.zeros(1, 3))[0]
    scaled = batch["c2w"].clone()
    scaled[..., :3, 3] *= 3.0
    same = dict(batch, c2w=world @ scaled)
    torch.testing.assert_close(model.data_cameras(same)[1], c2w, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match=r"needs the data's cameras \(model.init_args.cameras=data renders"):
        model.check_cameras(DataSpec("multi_view", (32, 32), 4, 2, has_cameras=False))
    assert make_model(renderer=renderer).needs_cameras() is None
    with pytest.raises(ConfigError, match="this batch has none"):
        model.step({k: v for k, v in batch.items() if k not in ("K", "c2w")}, "train", model.encoder)


def test_validation_of_the_explicit_renderer_scores_pose_pairs_and_depth():
    model = make_model(**GAUSSIANS)
    batch = sphere_scenes(2, 5, 32, 3)
    batch["depth"] = torch.rand(2, 5, 1, 32, 32) + 1.0
    out = model.step(batch, "val", model.encoder)
    for key in ("rpa5", "rpa15", "rpa30", "depth_abs_rel", "depth_delta1", "depth_abs_rel_constant",
                "psnr_still_cameras", "rot_err_identity"):  # fmt: skip
        assert out[key].ndim == 0 and torch.isfinite(out[key]), key
    assert 0 <= out["rpa30"] <= 1 and out["rpa5"] <= out["rpa15"] <= out["rpa30"]
    assert out["context_depth"].shape == (2, 3, 1, 32, 32)


def test_focal_is_held_for_the_first_steps():
    model = make_model(**GAUSSIANS, focal_freeze_steps=5)
    model.train()
    model.step(sphere_scenes(2, 4, 32, 2), "train", model.encoder)["loss"].backward()
    assert model.camera.focal_head.weight.grad is None or not model.camera.focal_head.weight.grad.any()
    model.zero_grad()
    model.focal_freeze_steps = 0
    model.step(sphere_scenes(2, 4, 32, 2), "train", model.encoder)["loss"].backward()
    assert model.camera.focal_head.weight.grad.abs().sum() > 0


def test_register_tokens_are_read_by_the_cameras_and_absent_when_off():
    """E-RayZer's per-view register tokens: the same outputs' shapes, one learnable set the cameras depend on
    (they take part in the estimator's attention), and no parameter at all with ``register_tokens: 0`` (so old
    checkpoints load)."""
    images = sphere_scenes(1, 3, 32, 2)["images"]
    model = make_model(**GAUSSIANS, register_tokens=4)
    pred = model(images, 2)
    assert pred["camera_tokens"].shape == (1, 3, HEADS["dim"]) and model.camera.registers.shape == (4, HEADS["dim"])
    with torch.no_grad():
        model.camera.registers.add_(1.0)
    assert not torch.allclose(model(images, 2)["camera_tokens"], pred["camera_tokens"])
    assert not any("registers" in k for k in make_model(**GAUSSIANS).state_dict())
