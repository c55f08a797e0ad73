"""Several objectives over one encoder: shared parameters, the weighted sum that is optimised, one encoder copy
in the checkpoint, logging per objective, sources, start-up errors that name the keys, the CLI and DDP."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import timm
import torch
import yaml
from conftest import tiny_encoder
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from shards import write_multiview_shards
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from toy import tiny_encoder_config

from selfsup3d.cli import main
from selfsup3d.datamodules import CombinedShards, DataSpec, MultiViewShards, SingleViewShards
from selfsup3d.encoders.export import load_exported_encoder, read_export_config
from selfsup3d.errors import ConfigError
from selfsup3d.objectives import FeatureConsensus, MaskedViewPrediction, MultiTask, TriplaneReconstruction
from selfsup3d.objectives.run.recipe import RECIPE_ARGUMENTS

ROOT = Path(__file__).resolve().parents[1]
MASKED = dict(dim=32, num_heads=2, camera_layers=2, scene_layers=1, render_layers=1, num_scene_tokens=8, lr=1e-3)
TRIPLANE = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2, triplane_grid=4, triplane_size=16,
                triplane_channels=8, field_hidden=16, render_size=16, rays_per_image=32, num_coarse=4, num_fine=4,
                ray_chunk=None, lr=2e-3)  # fmt: skip


@pytest.fixture(scope="module")
def urls(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("mt_shards")
    train = write_multiview_shards(root, num_scenes=4, num_views=4, size=32, num_shards=2)
    val = write_multiview_shards(root, num_scenes=2, num_views=4, size=32, num_shards=1, split="val", seed=1)
    return train, val


def make_model(weights: dict[str, float] | None = None, **kwargs) -> MultiTask:
    torch.manual_seed(0)
    objectives = {
        "masked_view": functools.partial(MaskedViewPrediction, **MASKED),
        "triplane": functools.partial(TriplaneReconstruction, **TRIPLANE),
    }
    return MultiTask(tiny_encoder(), objectives, weights=weights, warmup_steps=1, **kwargs)


def make_data(urls: tuple[str, str]) -> CombinedShards:
    common = dict(batch_size=2, num_workers=0, image_size=32, batches_per_epoch=2, val_batches=1)
    return CombinedShards(
        {
            "scenes": functools.partial(MultiViewShards, *urls, num_views=4, num_context_views=2, **common),
            "images": functools.partial(SingleViewShards, *urls, **common),
        }
    )


def batches(urls: tuple[str, str]) -> dict:
    """One training batch of each source, prepared as Lightning would."""
    dm = make_data(urls)
    for source in dm.sources.values():
        source.setup("fit")
    out = {}
    for name, source in dm.sources.items():
        out[name] = source.prepare_batch(next(iter(source.train_dataloader())), train=False)
    return out


def test_objectives_share_the_encoder_and_the_weighted_sum_is_optimised(urls):
    model = make_model(
        weights={"masked_view": 0.7, "triplane": 0.3}, sources={"masked_view": "scenes", "triplane": "images"}
    )
    model._routes = dict(model.sources)  # what set-up does with the datamodule's sources
    batch = batches(urls)
    encoder_params = dict(model.encoder.named_parameters())
    assert not any(hasattr(c, "encoder") for c in model.objectives.values())  # stored once, by the multi-task module

    grads = {}
    torch.manual_seed(1)
    parts = []
    for name in ("masked_view", "triplane"):
        component = model.objectives[name]
        out = component.step(component.adapt_batch(batch[model.sources[name]]), "train", model.encoder)
        model.zero_grad(set_to_none=True)
        out["loss"].backward()
        grads[name] = {n: p.grad.clone() for n, p in encoder_params.items() if p.grad is not None}
        parts.append(float(out["loss"].detach()))
        # every objective's gradient reaches (almost) every encoder parameter
        assert len(grads[name]) >= len(encoder_params) - 2, sorted(set(encoder_params) - set(grads[name]))
    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    total = model.step(batch, "train", model.encoder)
    assert float(total["loss"]) == pytest.approx(0.7 * parts[0] + 0.3 * parts[1], rel=1e-5)
    total["loss"].backward()
    for name, param in encoder_params.items():
        if param.grad is None:
            continue
        expected = 0.7 * grads["masked_view"].get(name, 0) + 0.3 * grads["triplane"].get(name, 0)
        assert torch.allclose(param.grad, expected, atol=1e-6, rtol=1e-4), name


def test_an_objective_without_a_batch_still_gives_every_head_a_gradient(urls):
    model = make_model()
    model._routes = {"masked_view": "scenes", "triplane": "images"}
    batch = batches(urls)
    out = model.step({"scenes": batch["scenes"], "images": None}, "train", model.encoder)
    assert "triplane" not in out and "masked_view" in out
    out["loss"].backward()
    heads = [p for p in model.objectives["triplane"].parameters() if p.requires_grad]
    assert heads and all(p.grad is not None and not p.grad.any() for p in heads)  # zero, but present (DDP)


def test_fit_logs_per_objective_and_the_checkpoint_holds_one_encoder(tmp_path, urls):
    model = make_model(sources={"masked_view": "scenes", "triplane": "images"})
    trainer = Trainer(
        accelerator="cpu", max_steps=2, default_root_dir=tmp_path, logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(model, datamodule=make_data(urls))
    tags = set(EventAccumulator(trainer.log_dir, size_guidance={"scalars": 0}).Reload().Tags()["scalars"])
    for name in ("train/loss", "train/masked_view/loss", "train/triplane/loss", "train/triplane/depth_rmse",
                 "val/masked_view/psnr", "val/triplane/depth_rmse", "train/masked_view/psnr"):  # fmt: skip
        assert name in tags, (name, sorted(tags))
    assert "train/psnr" not in tags  # no collisions: every metric under its objective
    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=True)
    keys = ckpt["state_dict"].keys()
    assert any(k.startswith("encoder.vit.") for k in keys)
    assert not any(".encoder." in k for k in keys if k.startswith("objectives."))  # one copy
    # the random-init encoder's teacher cannot be rebuilt: saved once, under its objective
    assert any(k.startswith("objectives.triplane.teacher.") for k in keys)
    reloaded = MultiTask.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert torch.equal(reloaded.encoder.vit.cls_token, model.encoder.vit.cls_token)
    assert reloaded.weights == model.weights and set(reloaded.objectives) == {"masked_view", "triplane"}
    # a checkpoint written while the objectives still carried the spike guard's state loads: those keys go
    old = dict(ckpt, state_dict={**ckpt["state_dict"], "objectives.triplane._grad_norm_ema": torch.zeros(()),
                                 "objectives.triplane.skipped_steps": torch.zeros((), dtype=torch.long)})  # fmt: skip
    torch.save(old, tmp_path / "old.ckpt")
    assert torch.equal(MultiTask.load_from_checkpoint(tmp_path / "old.ckpt").encoder.vit.cls_token,
                       model.encoder.vit.cls_token)  # fmt: skip


NOT_DEFAULT = {"betas": (0.8, 0.9), "warmup_steps": 7, "min_lr_ratio": 0.5, "layer_decay": 0.5,
               "encoder_lr_scale": 0.5, "grad_spike_factor": 3.0, "grad_spike_warmup": 3, "compile": True,
               "init_encoder_from": "run/last.ckpt", "max_nonfinite_steps": 3, "ema_decay": 0.9}  # fmt: skip


@pytest.mark.parametrize("name", RECIPE_ARGUMENTS)
def test_an_objective_refuses_a_recipe_argument_of_the_run(name):
    objectives = {"masked_view": functools.partial(MaskedViewPrediction, **MASKED, **{name: NOT_DEFAULT[name]})}
    with pytest.raises(ConfigError) as err:
        MultiTask(tiny_encoder(), objectives)
    message = str(err.value)
    assert message.startswith(f"model.init_args.objectives.masked_view.init_args.{name}=")
    assert f"set model.init_args.{name} instead" in message and "\n" not in message


def test_each_objective_is_told_when_its_images_are_not_the_encoders_size():
    model = make_model(sources={"masked_view": "scenes", "triplane": "images"})  # the encoder is built for 32x32
    source = "data.init_args.sources.{}.init_args".format
    specs = {"scenes": DataSpec("multi_view", (32, 32), 4, 2, key_prefix=source("scenes")),
             "images": DataSpec("single_view", (64, 64), with_depth=True, key_prefix=source("images"))}  # fmt: skip
    with pytest.warns(UserWarning) as seen:
        model.configure_data(specs)
    messages = [str(w.message) for w in seen if "built for" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("data.init_args.sources.images.init_args.image_size=64 ")


def test_objectives_carry_none_of_the_run_state():
    # MaskedViewPrediction's own defaults (RayZer's warm-up and spike factor) are not a setting
    model = make_model(ema_decay=0.5, grad_spike_factor=3.0)
    assert model.recipe.ema_decay == 0.5 and model.ema_encoder is not None
    for component in model.objectives.values():
        assert component.recipe is None
        assert not hasattr(component, "run_state") and not hasattr(component, "ema_encoder")
    keys = set(model.state_dict())
    assert {"_grad_norm_ema", "skipped_steps"} <= keys
    assert not any(k.endswith(("._grad_norm_ema", ".skipped_steps")) for k in keys)
    encoder = tiny_encoder()
    alone = MaskedViewPrediction(encoder, **MASKED)  # a run of its own, with its recipe
    with pytest.raises(ConfigError, match="model.init_args.objectives.masked_view was built outside"):
        MultiTask(encoder, {"masked_view": lambda e: alone})


def test_one_multiview_source_feeds_both_objectives(urls):
    model = make_model(image_views=2)
    dm = MultiViewShards(*urls, batch_size=2, num_workers=0, image_size=32, num_views=4, num_context_views=2)
    dm.setup("fit")
    model.configure_data(dm.data_specs())
    assert model.objectives["triplane"].data_spec.kind == "single_view"
    batch = dm.prepare_batch(next(iter(dm.train_dataloader())), train=False)
    out = model.step(batch, "train", model.encoder)
    assert {"masked_view", "triplane"} <= set(out)


def _write(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def demo_config(tmp_path: Path, urls: tuple[str, str]) -> dict:
    """configs/demo/multitask.yaml at test size: tiny shards, a tiny encoder, 3 steps."""
    cfg = yaml.safe_load((ROOT / "configs/demo/multitask.yaml").read_text())
    args = cfg["model"]["init_args"]
    args["encoder"] = tiny_encoder_config()
    args["objectives"]["masked_view"]["init_args"].update(dim=32, num_scene_tokens=8)
    args["objectives"]["triplane"]["init_args"].update(TRIPLANE)
    for name, source in cfg["data"]["init_args"]["sources"].items():
        source["init_args"].update(train_urls=urls[0], val_urls=urls[1], num_workers=0, batch_size=2,
                                   batches_per_epoch=2, val_batches=1, image_size=32)  # fmt: skip
        if name in ("scenes", "posed"):
            source["init_args"].update(num_views=4, num_context_views=2 if name == "scenes" else 1)
    cfg["trainer"].update(max_steps=3, default_root_dir=str(tmp_path), enable_progress_bar=False,
                          log_every_n_steps=1)  # fmt: skip
    return cfg


def test_demo_config_from_the_cli_and_the_export_loads_in_timm(tmp_path, urls):
    main(["fit", "--config", str(_write(tmp_path, demo_config(tmp_path, urls)))])
    run = tmp_path / "lightning_logs" / "version_0"
    tags = set(EventAccumulator(str(run), size_guidance={"scalars": 0}).Reload().Tags()["scalars"])
    assert {"train/masked_view/loss", "train/triplane/loss", "train/consensus/consensus", "train/loss"} <= tags
    export = run / "encoder.safetensors"
    config = read_export_config(export)
    vit = timm.create_model("vit_tiny_patch14_dinov2", pretrained=False, num_classes=0, dynamic_img_size=True,
                            img_size=config["img_size"], patch_size=config["patch_size"], embed_dim=config["embed_dim"],
                            depth=config["depth"], num_heads=config["num_heads"], init_values=1e-5,
                            checkpoint_path=str(export))  # fmt: skip
    encoder = load_exported_encoder(export).eval()
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(vit.eval().forward_features(encoder.normalize(x))[:, 0], encoder(x).cls, atol=1e-5)


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ([], []),  # the config as written starts
        (["--model.init_args.sources", "{masked_view: scenes}"], ["reads in model.init_args.sources"]),
        (
            ["--model.init_args.sources", "{masked_view: scenes, triplane: x, consensus: posed}"],
            ["model.init_args.sources.triplane='x'"],
        ),
        (["--model.init_args.weights", "{bogus: 1.0}"], ["model.init_args.weights names no objective: bogus"]),
        (
            ["--model.init_args.objectives.triplane.init_args.ema_decay", "0.99"],
            ["model.init_args.objectives.triplane.init_args.ema_decay", "set model.init_args.ema_decay instead"],
        ),
        (
            ["--model.init_args.objectives.consensus.init_args.warmup_steps", "7"],
            ["model.init_args.objectives.consensus.init_args.warmup_steps=7",
             "set model.init_args.warmup_steps instead"],
        ),
        (
            ["--model.init_args.objectives.masked_view.init_args.num_heads", "3"],
            ["model.init_args.objectives.masked_view.init_args.dim=32",
             "model.init_args.objectives.masked_view.init_args.num_heads=3"],
        ),
        (
            ["--data.init_args.sources.scenes.init_args.image_size", "36"],
            ["data.init_args.sources.scenes.init_args.image_size=36", "model.init_args.encoder.init_args.patch_size=8"],
        ),
    ],
)  # fmt: skip
def test_start_up_errors_name_the_keys(tmp_path, urls, capsys, override, needles):
    cfg = demo_config(tmp_path, urls)
    cfg["trainer"]["max_steps"] = 1
    if not needles:
        main(["fit", "--config", str(_write(tmp_path, cfg)), *override])
        return
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(_write(tmp_path, cfg)), *override])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert all(n in err for n in needles), err
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["command line", "config file"])
@pytest.mark.parametrize(
    "section,entry,key,value,needle",
    [
        ("objectives", "masked_view", "dimm", 3, "not an argument of selfsup3d.objectives.MaskedViewPrediction"),
        ("objectives", "triplane", "decoder_depth", "deep", "expected int, got 'deep'"),
        ("sources", "posed", "num_viewz", 3, "not an argument of selfsup3d.datamodules.MultiViewShards"),
        ("sources", "images", "image_size", "big", "expected int or tuple, got 'big'"),
    ],
)  # fmt: skip
def test_a_typo_inside_an_objective_or_a_source_names_it(tmp_path, urls, capsys, where, section, entry, key, value,
                                                         needle):  # fmt: skip
    """jsonargparse explains a typo inside one entry of a mapping of components without the entry's name (and
    with a dump of its type and value); the message names it as the single-objective case names its key."""
    cfg = demo_config(tmp_path, urls)
    top = "model" if section == "objectives" else "data"
    override = []
    if where == "command line":
        override = [f"--{top}.init_args.{section}.{entry}.init_args.{key}", str(value)]
    else:
        cfg[top]["init_args"][section][entry]["init_args"][key] = value
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(_write(tmp_path, cfg)), *override, "--print_config"])
    err = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and len(err) == 2, err
    assert err[0] == f"selfsup3d fit: error: {top}.init_args.{section}.{entry}.init_args.{key}: {needle}"


# about 30 s a run on two cores (two spawned processes importing torch and Lightning): real DDP in `make test`
def test_two_process_ddp_fit_of_the_demo_config_resumed_mid_epoch_is_the_whole_run(tmp_path, urls):
    """A 2-rank (gloo) fit of 4 steps that checkpoints at step 2 (mid-epoch), and a fit resumed from that
    checkpoint: the same losses on rank 0 and the same final weights (so rank 1 resumed its own stream too)."""
    cfg = demo_config(tmp_path, urls)
    cfg["trainer"].update(devices=2, strategy="ddp", max_steps=4, callbacks=[])
    for source in cfg["data"]["init_args"]["sources"].values():
        source["init_args"]["batches_per_epoch"] = 3
    config = str(_write(tmp_path, cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    script = Path(sys.executable).parent / "selfsup3d"

    def fit(root: Path, *extra: str) -> tuple[dict, dict]:
        record = ["--trainer.callbacks+=toy.RecordLosses", f"--trainer.callbacks.path={root / 'losses.json'}"]
        argv = [str(script), "fit", "--config", config, "--trainer.default_root_dir", str(root), *record, *extra]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        ckpt = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        assert state["global_step"] == 4
        return json.loads((root / "losses.json").read_text()), state["state_dict"]

    losses, weights = fit(tmp_path / "whole", "--checkpoint.every_n_train_steps", "2")
    at_2 = tmp_path / "whole" / "lightning_logs" / "version_0" / "checkpoints" / "step00000002.ckpt"
    resumed_losses, resumed_weights = fit(tmp_path / "resumed", "--ckpt_path", str(at_2))
    assert list(losses) == ["1", "2", "3", "4"] and resumed_losses == {k: losses[k] for k in ("3", "4")}
    assert all(torch.equal(v, resumed_weights[k]) for k, v in weights.items())


@pytest.mark.parametrize("name", ["configs/multitask.yaml", "configs/demo/multitask.yaml"])
def test_shipped_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / name), "--print_config"])
    assert exit_.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "selfsup3d.objectives.MultiTask"
    assert set(printed["model"]["init_args"]["objectives"]) == {"masked_view", "triplane", "consensus"}


def test_gpu_config_builds_at_its_sizes():
    """configs/multitask.yaml builds as written (randomly initialised: no download), both objectives on one ViT-B."""
    from selfsup3d.cli import SelfSup3DCLI

    cli = SelfSup3DCLI(
        args=["--config", str(ROOT / "configs/multitask.yaml"), "--model.init_args.encoder.init_args.pretrained",
              "false", "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
              "--trainer.precision", "32-true", "--trainer.logger", "false"],
        run=False,
    )  # fmt: skip
    model = cli.model
    assert isinstance(model, MultiTask) and model.encoder.embed_dim == 768 and model.encoder.patch_size == 16
    assert model.objectives["triplane"].teacher is not None
    assert model.objectives["consensus"].teacher is model.objectives["triplane"].teacher  # one frozen ViT-B, not two
    # the scenes' depth and cameras are known once the shards are read; here: posed scenes with depth, as the config
    # asks for
    model.configure_data({"data": replace(cli.datamodule.data_spec(), with_depth=True, has_cameras=True)})
    assert model.objectives["triplane"].data_spec.kind == "single_view"


def _triplane_and_consensus(consensus_teacher: str | None = None, **encoder_args) -> MultiTask:
    from test_consensus import HEADS

    torch.manual_seed(0)
    objectives = {
        "triplane": functools.partial(TriplaneReconstruction, **TRIPLANE),
        "consensus": functools.partial(FeatureConsensus, **HEADS, teacher=consensus_teacher),
    }
    return MultiTask(tiny_encoder(num_out_layers=1, **encoder_args), objectives)


def test_objectives_with_the_same_teacher_share_one_frozen_copy(tmp_path):
    """configs/multitask.yaml built the same frozen ViT-B twice (the triplane's and the consensus's teacher)."""
    shared = _triplane_and_consensus()
    teacher = shared.objectives["triplane"].teacher
    assert teacher is not None and shared.objectives["consensus"].teacher is teacher
    separate = _triplane_and_consensus(consensus_teacher="ema")  # another teacher: its own copy
    assert separate.objectives["consensus"].teacher is not separate.objectives["triplane"].teacher
    size = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in shared.parameters()) + size == sum(p.numel() for p in separate.parameters())
    # the copy of a randomly initialised encoder cannot be rebuilt: saved, and loaded back into the one copy
    state = shared.state_dict()
    assert any(k.startswith("objectives.triplane.teacher.") for k in state)
    again = _triplane_and_consensus()
    torch.nn.init.zeros_(again.objectives["triplane"].teacher.module.vit.cls_token)
    again.load_state_dict(state)
    assert again.objectives["consensus"].teacher is again.objectives["triplane"].teacher
    assert torch.equal(again.objectives["consensus"].teacher.module.vit.cls_token, teacher.module.vit.cls_token)
    # a teacher rebuilt from its source (the encoder's weights file) is left out of checkpoints under either name
    weights = tmp_path / "weights.pth"
    torch.save(tiny_encoder(num_out_layers=1).export_state_dict(), weights)
    rebuilt = _triplane_and_consensus(checkpoint_path=str(weights))
    assert rebuilt.objectives["consensus"].teacher is rebuilt.objectives["triplane"].teacher
    assert not any(".teacher." in k for k in rebuilt.state_dict())


def test_a_checkpoint_of_other_objectives_is_refused_naming_them(tmp_path, urls, capsys):
    """A multi-task checkpoint whose objectives are not the config's: Lightning rebuilt the checkpoint's objectives
    from its hyper-parameters in place of the config's, which failed on data that did not fit them (or trained
    them); the checkpoint's objectives are named instead."""
    cfg = demo_config(tmp_path / "a", urls)
    cfg["trainer"]["max_steps"] = 1
    (tmp_path / "a").mkdir()
    main(["fit", "--config", str(_write(tmp_path / "a", cfg))])
    ckpt = tmp_path / "a/lightning_logs/version_0/checkpoints/last.ckpt"
    other = demo_config(tmp_path / "b", urls)  # the triplane objective and its image source left out
    del other["model"]["init_args"]["objectives"]["triplane"]
    for key in ("weights", "sources"):
        other["model"]["init_args"].get(key, {}).pop("triplane", None)
    del other["data"]["init_args"]["sources"]["images"]
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(_write(tmp_path / "b", other)), "--ckpt_path", str(ckpt)])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    theirs = (
        "MultiTask(consensus: FeatureConsensus, masked_view: MaskedViewPrediction, triplane: TriplaneReconstruction)"
    )
    assert f"--ckpt_path {ckpt} is a checkpoint of {theirs}, but the config trains " in err
    assert (
        "MultiTask(consensus: FeatureConsensus, masked_view: MaskedViewPrediction) (model.init_args.objectives)" in err
    )
    # in Python (no CLI), loading it into a module of other objectives names them too
    from selfsup3d.errors import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match=r"checkpoint of MultiTask\(consensus: FeatureConsensus, mask"):
        make_model().on_load_checkpoint(torch.load(ckpt, weights_only=True))
    assert not (tmp_path / "b" / "lightning_logs").exists()  # nothing ran


def test_exporting_a_multitask_checkpoint_names_the_teacher_and_warns_of_nothing(tmp_path, urls, capsys):
    """Loading a multi-task checkpoint warned that objectives=dict could not be saved; --teacher exported one of two
    teachers without saying whose."""
    import warnings

    cfg = demo_config(tmp_path, urls)
    cfg["trainer"]["max_steps"] = 1
    cfg["model"]["init_args"]["objectives"]["consensus"]["init_args"]["teacher"] = "ema"  # two different teachers
    main(["fit", "--config", str(_write(tmp_path, cfg))])
    ckpt = str(tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["export", ckpt, "--teacher", "--out", str(tmp_path / "t.safetensors")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "holds 2 different frozen teachers (" in err and "--teacher " in err, err
    assert "triplane: copy of the encoder" in err and "consensus: moving average of the encoder" in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning about hyper-parameters left out
        assert main(["export", ckpt, "--teacher", "consensus", "--out", str(tmp_path / "t.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "the frozen teacher of consensus (moving average of the encoder" in out
    assert "ImageNet-normalised" in out
