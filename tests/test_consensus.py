"""The feature-consensus objective (ConDense): its terms and gradients, the stop-gradient switches, a field that
reproduces F2D, depth rendered from a voxelised scene, retrieval, the 3D backbone export, predicted cameras in
a multi-task run, and the CLI."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_encoder
from safetensors import safe_open
from safetensors.torch import load_file
from shards import write_multiview_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toy import tiny_encoder_config

from selfsup3d.cli import main
from selfsup3d.cli.retrieve import retrieve
from selfsup3d.datamodules import MultiViewShards
from selfsup3d.errors import ConfigError
from selfsup3d.heads.scene import SceneBranch, SceneGrid, pooled_depth
from selfsup3d.losses.consensus import consensus_loss
from selfsup3d.objectives import FeatureConsensus, MaskedViewPrediction, MultiTask

ROOT = Path(__file__).resolve().parents[1]
HEADS = dict(feature_dim=8, grid_size=16, grid_width=4, grid_levels=2, num_coarse=4, num_fine=4, num_keypoints=8,
             descriptor_dim=8, lr=1e-3)  # fmt: skip
TINY = dict(HEADS, warmup_steps=1)  # fitted alone (in a multi-task run the recipe is the multi-task module's)


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("consensus_shards")
    train = write_multiview_shards(root, num_scenes=4, num_views=4, size=32, num_shards=2)
    val = write_multiview_shards(root, num_scenes=4, num_views=4, size=32, num_shards=1, split="val", seed=1)
    return train, val


def data(urls, **kwargs) -> MultiViewShards:
    args = dict(batch_size=2, num_workers=0, image_size=32, num_views=4, num_context_views=1, with_masks=True)
    dm = MultiViewShards(*urls, **{**args, **kwargs})
    dm.setup("fit")
    return dm


def batch_of(dm: MultiViewShards) -> dict:
    return dm.prepare_batch(next(iter(dm.val_dataloader())), train=False)


def make(**kwargs) -> FeatureConsensus:
    torch.manual_seed(0)
    return FeatureConsensus(tiny_encoder(num_out_layers=1), **{**TINY, **kwargs})


def test_step_reports_every_term_and_gradients_reach_both_branches(urls):
    model = make(num_classes=15, lambda_depth=0.5, lambda_keypoints=0.3)
    model.configure_data(data(urls).data_specs())
    out = model.step(batch_of(data(urls)), "train", model.encoder)
    s = {k: float(v.detach()) for k, v in out.items() if isinstance(v, torch.Tensor) and v.numel() == 1}
    for key in ("consensus", "fidelity", "depth", "kp_detection", "kp_descriptor", "kp_reliability", "probe3d_loss"):
        assert key in s, key
    kp = s["kp_detection"] + s["kp_descriptor"] + s["kp_reliability"]
    expected = s["consensus"] + s["fidelity"] + 0.5 * s["depth"] + 0.3 * kp + s["probe3d_loss"]
    assert s["loss"] == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    for module in (model.encoder, model.head2d, model.scene.backbone, model.lift, model.keypoints2d, model.grid_probe):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), type(module).__name__
    assert all(p.grad is None for p in model.teacher.parameters())


def test_key_points_are_seen_on_the_background_too(urls, monkeypatch):
    """The grid holds every surface the depth shows (the ground plane too), so a key point there is visible:
    the views' masks restrict the dense terms, not which key points the 2D heads learn from."""
    model = make(lambda_keypoints=1.0)
    dm = data(urls)
    model.configure_data(dm.data_specs())
    batch = batch_of(dm)
    seen: dict = {}
    original = model.keypoint_losses

    def spy(scene, f2d, K, c2w, depth, known, *args):
        seen["known"] = known
        return original(scene, f2d, K, c2w, depth, known, *args)

    monkeypatch.setattr(model, "keypoint_losses", spy)
    model.step(batch, "train", model.encoder)
    _, surface = pooled_depth(batch["depth"].float().flatten(0, 1), seen["known"].shape[-2:])
    assert torch.equal(seen["known"], surface)
    foreground = torch.nn.functional.adaptive_avg_pool2d(batch["mask"].float().flatten(0, 1), surface.shape[-2:])
    assert (surface & (foreground < 0.5)).any()  # the test data has background the masks leave out


@pytest.mark.parametrize("switch", ["detach_2d", "detach_3d"])
def test_stop_gradient_switches(urls, switch):
    model = make(lambda_fidelity=0.0, lambda_depth=0.0, lambda_keypoints=0.0, **{switch: True})
    out = model.step(batch_of(data(urls)), "train", model.encoder)
    out["consensus"].backward()
    encoder_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    scene_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.scene.parameters())
    assert (encoder_grad, scene_grad) == ((False, True) if switch == "detach_2d" else (True, False))


def test_consensus_is_zero_for_a_field_that_reproduces_f2d():
    """A grid whose feature is one colour everywhere, opaque, renders that colour into every cell of every view;
    against an F2D of that colour (lifted as the objective lifts it) the consensus is exactly zero."""
    torch.manual_seed(0)
    branch = SceneBranch(3, feature_dim=4, grid_size=8, width=4, levels=1)
    cube_c2w = torch.eye(4).expand(1, 2, 4, 4).clone()
    cube_c2w[0, :, 2, 3] = -3.0  # two cameras 3 units in front of the cube, looking at it
    cube_c2w[0, 1, 0, 3] = 0.3
    K = torch.tensor([[16.0, 0, 8], [0, 16.0, 8], [0, 0, 1]]).expand(1, 2, 3, 3)
    colour = torch.tensor([0.2, -1.0, 0.5, 2.0])
    from selfsup3d.geometry.points import UnitCube

    scene = SceneGrid(
        cube=UnitCube(centre=torch.zeros(1, 3), scale=torch.ones(1)),
        features=colour.view(1, 4, 1, 1, 1).expand(1, 4, 8, 8, 8).contiguous(),
        density=torch.full((1, 1, 8, 8, 8), 1e4),
        occupancy=torch.ones(1, 1, 8, 8, 8),
    )
    f3d, depth, opacity = branch.render(scene, K, cube_c2w, (4, 4), (16, 16), perturb=False)
    lift = torch.nn.Linear(4, 6, bias=False)
    lifted = lift(f3d.flatten(0, 1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    f2d = lift(colour).view(1, 6, 1, 1).expand_as(lifted)
    hit = opacity.flatten(0, 1) > 0.999
    assert hit.float().mean() > 0.5  # the cube fills most of the view
    assert float(consensus_loss(lifted, f2d, hit)) < 1e-10
    assert float(consensus_loss(lifted, -f2d, hit)) > 1.0  # and not for another field
    assert torch.allclose(depth[0, 0, 0][hit[0, 0]], torch.full_like(depth[0, 0, 0][hit[0, 0]], 2.0), atol=0.05)


def test_a_voxelised_scene_renders_its_depth(urls):
    """The views' depth fused and voxelised, with density on the occupied voxels, renders back to that depth."""
    batch = batch_of(data(urls))
    branch = SceneBranch(3, feature_dim=2, grid_size=32, width=2, levels=1, num_coarse=64, num_fine=64)
    depth, K, c2w = batch["depth"], batch["K"], batch["c2w"]
    cube = branch.fit_cube(depth, K, c2w, batch["mask"])
    grid = branch.embed(depth, K, c2w, batch["images"], cube)
    occupancy = grid[:, -1:]
    scene = SceneGrid(cube, grid[:, :2], occupancy * 400.0, occupancy)
    _, rendered, _ = branch.render(scene, K, c2w, (32, 32), (32, 32), perturb=False)
    target, known = pooled_depth(depth.flatten(0, 1), (32, 32), min_share=1.0)
    known = known & (batch["mask"].flatten(0, 1) > 0.5)
    target = cube.depth_to_unit(target.unflatten(0, depth.shape[:2])).flatten(0, 1)
    rel = (rendered.flatten(0, 1) - target).abs()[known] / target[known]
    assert rel.median() < 0.03, rel.median()


def test_start_up_checks_name_the_keys(urls):
    model = make()
    spec = data(urls).data_spec()
    from dataclasses import replace

    with pytest.raises(ConfigError, match="data.init_args.*has no depth"):
        model.check_data(replace(spec, with_depth=False))
    with pytest.raises(ConfigError, match="model.init_args.cameras=predicted"):
        make(cameras="predicted").check_data(spec)
    with pytest.raises(ConfigError, match="model.init_args.grid_size=10 must be divisible"):
        make(grid_size=10)


def test_retrieval_and_the_3d_backbone_export_from_the_cli(tmp_path, urls, capsys):
    cfg = yaml.safe_load((ROOT / "configs/demo/consensus.yaml").read_text())
    cfg["model"]["init_args"].update(TINY, encoder=tiny_encoder_config(num_out_layers=1), num_classes=15)
    cfg["data"]["init_args"].update(train_urls=urls[0], val_urls=urls[1], image_size=32, batch_size=2, num_workers=0,
                                    batches_per_epoch=2, num_views=4, num_context_views=1)  # fmt: skip
    cfg["trainer"].update(max_steps=2, default_root_dir=str(tmp_path), check_val_every_n_epoch=1,
                          enable_progress_bar=False, log_every_n_steps=1)  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(config)])
    run = tmp_path / "lightning_logs" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0}).Reload().Tags()
    for name in ("val/retrieval_top1", "val/retrieval_top5", "val/duplicate_auc", "val/probe3d_acc", "val/consensus"):
        assert name in events["scalars"], name
    assert "consensus/features_0" in events["images"]
    # the 3D backbone is a product: exported beside the encoder, with what rebuilds it
    path = run / "backbone3d.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["selfsup3d"])
    backbone = SceneBranch(**meta["init_args"])
    backbone.load_state_dict(load_file(str(path)))
    # the teacher (a copy of the randomly initialised encoder, saved in the checkpoint) exports for the probe
    ckpt = run / "checkpoints" / "last.ckpt"
    assert main(["export", str(ckpt), "--teacher", "--out", str(tmp_path / "teacher.safetensors")]) == 0
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    teacher = load_file(str(tmp_path / "teacher.safetensors"))
    assert teacher and all(torch.equal(v, saved[f"teacher.module.vit.{k}"]) for k, v in teacher.items())
    # the retrieval command over the held-out scenes
    capsys.readouterr()
    assert main(["retrieve", str(run / "checkpoints" / "last.ckpt"), "--data", urls[1], "--views", "4"]) == 0
    printed = capsys.readouterr().out
    assert "4 held-out scenes" in printed and "top-1" in printed and "ROC AUC" in printed
    results = retrieve(run / "checkpoints" / "last.ckpt", urls[1], views=4, progress=False)
    assert results["consensus"]["retrieval_chance"] == pytest.approx(0.25)
    # another way to compare key-point sets, named in the output
    assert main(["retrieve", str(ckpt), "--data", urls[1], "--views", "4", "--mode", "chamfer"]) == 0
    assert "(chamfer)" in capsys.readouterr().out


def test_predicted_cameras_in_a_multitask_run(tmp_path, urls):
    """``cameras: predicted`` takes the masked-view objective's cameras; the run fits end to end from the CLI."""
    objectives = {
        "masked_view": {"class_path": "selfsup3d.objectives.MaskedViewPrediction",
                        "init_args": {"dim": 32, "num_heads": 2, "camera_layers": 2, "scene_layers": 1,
                                      "render_layers": 1, "num_scene_tokens": 8}},
        "consensus": {"class_path": "selfsup3d.objectives.FeatureConsensus",
                      "init_args": {**HEADS, "cameras": "predicted", "camera_objective": "masked_view"}},
    }  # fmt: skip
    cfg = {
        "model": {"class_path": "selfsup3d.objectives.MultiTask",
                  "init_args": {"encoder": tiny_encoder_config(num_out_layers=1), "objectives": objectives,
                                "warmup_steps": 1}},
        "data": {"class_path": "selfsup3d.datamodules.MultiViewShards",
                 "init_args": {"train_urls": urls[0], "val_urls": urls[1], "image_size": 32, "num_views": 4,
                               "num_context_views": 2, "batch_size": 2, "num_workers": 0, "batches_per_epoch": 2,
                               "val_batches": 1, "with_masks": True}},
        "trainer": {"max_steps": 2, "default_root_dir": str(tmp_path), "enable_progress_bar": False,
                    "log_every_n_steps": 1, "accelerator": "cpu"},
    }  # fmt: skip
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(config)])
    tags = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    tags = set(tags.Reload().Tags()["scalars"])
    assert {"train/consensus/consensus", "train/masked_view/loss", "val/consensus/depth"} <= tags


def test_predicted_cameras_scale_is_fixed_from_the_views(urls):
    """The estimator's translations have no unit: the closed-form scale makes the result the same whatever the
    prediction's scale, and close to the true one when the predicted poses are the true ones."""
    enc = tiny_encoder(num_out_layers=1)
    masked = functools.partial(MaskedViewPrediction, dim=32, num_heads=2, camera_layers=2, scene_layers=1,
                               render_layers=1, num_scene_tokens=8)  # fmt: skip
    consensus = functools.partial(FeatureConsensus, cameras="predicted", **HEADS)
    model = MultiTask(enc, {"masked_view": masked, "consensus": consensus})
    mv, consensus = model.objectives["masked_view"], model.objectives["consensus"]
    batch = batch_of(data(urls))
    true = batch["c2w"]
    rel = torch.linalg.inv(true[:, :1]) @ true  # relative to view 0, as the estimator predicts
    focal = batch["K"][:, 0, 0, 0] / batch["images"].shape[-1]
    enc_out = model.encoder(batch["images"].flatten(0, 1))
    results = []
    for factor in (0.1, 10.0):
        scaled = rel.clone()
        scaled[..., :3, 3] *= factor
        mv.camera.cameras = lambda tokens, c=scaled: (c, focal)  # type: ignore[method-assign]
        results.append(consensus.scene_cameras(batch, enc_out, *batch["images"].shape[:2])[1])
    assert torch.allclose(results[0], results[1], atol=1e-4)
    ratio = results[0][:, 1:, :3, 3].norm(dim=-1) / rel[:, 1:, :3, 3].norm(dim=-1)
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio


def test_retrieval_summaries_take_their_own_number_of_key_points(urls):
    model = make(lambda_keypoints=1.0, num_keypoints=4, summary_keypoints=12)
    dm = data(urls)
    model.configure_data(dm.data_specs())
    batch = batch_of(dm)
    assert model.scene_keypoints(batch, model.encoder).descriptors.shape[1] == 12
    assert model.image_keypoints(batch["images"][:, 0], model.encoder).descriptors.shape[1] == 12
    with pytest.raises(ConfigError, match="summary_keypoints must be >= 1, got 0"):
        make(summary_keypoints=0)


def test_the_view_subset_is_max_views_and_the_old_key_still_reads(urls):
    batch = batch_of(data(urls))
    model = make(max_views=2)
    assert model.step(batch, "val", model.encoder)["f2d"].shape[0] == 2 * batch["images"].shape[0]
    with pytest.warns(FutureWarning, match="model.init_args.num_views is now model.init_args.max_views"):
        old = make(num_views=2)
    assert old.max_views == 2 and old.hparams["max_views"] == 2 and old.hparams["num_views"] is None
    with pytest.raises(ConfigError, match="num_views=2 and model.init_args.max_views=3"):
        make(num_views=2, max_views=3)
