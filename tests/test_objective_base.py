"""The objectives' base class: parameter groups, layer decay, schedule, spike skipping, fine-tuning, hparams."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_encoder
from lightning.pytorch import Callback, Trainer
from toy import RandomImages, RotationPrediction

from selfsup3d.datamodules import DataSpec
from selfsup3d.errors import CheckpointMismatchError, ConfigError
from selfsup3d.objectives.run.optimizer import warmup_cosine


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_weight_decay_groups(encoder):
    model = RotationPrediction(encoder, lr=1e-3, weight_decay=0.05)
    groups = model.parameter_groups()
    decayed = set().union(*(_names(model, g) for g in groups if g["weight_decay"] > 0))
    plain = set().union(*(_names(model, g) for g in groups if g["weight_decay"] == 0))
    assert decayed.isdisjoint(plain)
    assert decayed | plain == {n for n, p in model.named_parameters() if p.requires_grad}
    # no decay: norms, biases, embeddings and tokens
    for name in [
        "encoder.vit.cls_token",
        "encoder.vit.pos_embed",
        "encoder.vit.blocks.0.norm1.weight",
        "encoder.vit.blocks.0.attn.qkv.bias",
        "encoder.vit.blocks.0.ls1.gamma",
        "encoder.vit.norm.bias",
        "head.0.bias",
    ]:
        assert name in plain, name
    for name in ["encoder.vit.blocks.0.attn.qkv.weight", "encoder.vit.patch_embed.proj.weight", "head.0.weight"]:
        assert name in decayed, name


def test_head_tokens_and_embeddings_take_no_decay(encoder):
    class WithTokens(RotationPrediction):
        def __init__(self, encoder, **kw):
            super().__init__(encoder, **kw)
            self.scene_tokens = torch.nn.Parameter(torch.zeros(1, 4, 8))
            self.index_embed = torch.nn.Embedding(3, 8)

        def no_weight_decay(self):
            return {"scene_tokens"}

    model = WithTokens(encoder)
    plain = set().union(*(_names(model, g) for g in model.parameter_groups() if g["weight_decay"] == 0))
    assert {"scene_tokens", "index_embed.weight"} <= plain


def test_layer_wise_lr_decay(encoder):
    model = RotationPrediction(encoder, lr=1.0, layer_decay=0.5, encoder_lr_scale=1.0)
    lr_of = {}
    for g in model.parameter_groups():
        for n in _names(model, g):
            lr_of[n] = g["lr"]
    depth = 2  # timm's grouping: block i of L gets decay ** (L - 1 - i), the embeddings decay ** L
    assert lr_of["encoder.vit.blocks.1.attn.qkv.weight"] == pytest.approx(1.0)
    assert lr_of["encoder.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.5)
    assert lr_of["encoder.vit.blocks.0.norm1.weight"] == pytest.approx(0.5)
    assert lr_of["encoder.vit.patch_embed.proj.weight"] == pytest.approx(0.5**depth)
    assert lr_of["encoder.vit.cls_token"] == pytest.approx(0.5**depth)
    assert lr_of["encoder.vit.norm.weight"] == pytest.approx(1.0)
    assert lr_of["head.0.weight"] == pytest.approx(1.0)


def test_encoder_lr_scale(encoder):
    model = RotationPrediction(encoder, lr=2.0, encoder_lr_scale=0.1)
    lrs = {n: g["lr"] for g in model.parameter_groups() for n in _names(model, g)}
    assert lrs["encoder.vit.blocks.0.attn.qkv.weight"] == pytest.approx(0.2)
    assert lrs["head.0.weight"] == pytest.approx(2.0)


def test_warmup_cosine_schedule():
    assert warmup_cosine(0, 10, 110, 0.0) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    values = [warmup_cosine(s, 10, 110, 0.0) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"lr": 0}, "model.init_args.lr"),
        ({"layer_decay": 1.5}, "model.init_args.layer_decay"),
        ({"grad_spike_factor": 0.5}, "grad_spike"),
    ],
)
def test_bad_optimiser_settings(encoder, kwargs, key):
    with pytest.raises(ConfigError, match=key):
        RotationPrediction(encoder, **kwargs)


def _fit(model, tmp_path, steps=4, **trainer_kwargs):
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
        limit_val_batches=1,
        enable_model_summary=False,
        **trainer_kwargs,
    )
    trainer.fit(model, RandomImages(num_samples=8, batch_size=4))
    return trainer


def test_schedule_follows_max_steps(encoder, tmp_path):
    model = RotationPrediction(encoder, lr=1e-3, warmup_steps=2, min_lr_ratio=0.0)
    trainer = _fit(model, tmp_path, steps=4, enable_checkpointing=False)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(1e-3 * warmup_cosine(4, 2, 4, 0.0))
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_grad_spikes_are_skipped_and_counted(encoder, tmp_path):
    class Spiky(RotationPrediction):
        def step(self, batch, stage, encoder):
            out = super().step(batch, stage, encoder)
            if stage == "train" and self.global_step == 3:
                out["loss"] = out["loss"] * 1e6  # a spike
            return out

    model = Spiky(encoder, grad_spike_factor=5.0, grad_spike_warmup=1)
    before = {}

    class Snap(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                before.update({k: v.clone() for k, v in pl_module.state_dict().items() if "head" in k})

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                after = {k: v for k, v in pl_module.state_dict().items() if "head" in k}
                before["unchanged"] = all(torch.equal(before[k], after[k]) for k in after)

    _fit(model, tmp_path, steps=5, enable_checkpointing=False, callbacks=[Snap()])
    assert int(model.skipped_steps) == 1
    assert before["unchanged"], "the spiking step must not move the weights"


def test_init_encoder_from_checkpoint_of_another_objective(encoder, tmp_path):
    trainer = _fit(RotationPrediction(encoder), tmp_path, steps=2)
    ckpt = trainer.checkpoint_callback.best_model_path
    torch.manual_seed(123)
    fresh = RotationPrediction(tiny_encoder(), init_encoder_from=ckpt)
    assert torch.equal(fresh.encoder.vit.blocks[0].attn.qkv.weight, encoder.vit.blocks[0].attn.qkv.weight)
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        RotationPrediction(tiny_encoder(depth=3, num_out_layers=1), init_encoder_from=ckpt)


def test_checkpoint_hparams_are_plain_data_and_reload(encoder, tmp_path):
    trainer = _fit(RotationPrediction(encoder, hidden=8, lr=3e-4), tmp_path, steps=2)
    ckpt = trainer.checkpoint_callback.best_model_path
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickled modules inside
    assert raw["hyper_parameters"]["encoder"]["class_path"] == "selfsup3d.encoders.vit.ViTEncoder"
    model = RotationPrediction.load_from_checkpoint(ckpt)
    assert model.lr == 3e-4 and model.head[0].out_features == 8
    assert torch.equal(model.encoder.vit.cls_token, encoder.vit.cls_token)


def test_a_data_size_the_encoder_was_not_built_for_is_said_at_start_up(encoder, recwarn):
    model = RotationPrediction(encoder)  # the encoder is built for 32x32
    model.configure_data({"data": DataSpec("single_view", (32, 32))})
    assert not [w for w in recwarn if "built for" in str(w.message)]
    with pytest.warns(UserWarning) as seen:
        model.configure_data({"data": DataSpec("single_view", (48, 48))})
    (message,) = [str(w.message) for w in seen if "built for" in str(w.message)]
    assert message.startswith("data.init_args.image_size=48 but the encoder is built for ")
    assert "model.init_args.encoder.init_args.img_size=32" in message
