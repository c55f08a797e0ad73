"""Probes: kNN, feature bank, depth targets, and the online callback beside a frozen reference."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_encoder
from lightning.pytorch import Trainer
from toy import RotationPrediction
from triplane_synthetic import SphereDataModule

from selfsup3d.callbacks import OnlineProbes
from selfsup3d.eval.probes import (
    DepthProbe,
    FeatureBank,
    LinearProbe,
    depth_probe_target,
    global_features,
    knn_predict,
    token_cosine,
)


def test_knn_on_separable_clusters_and_unlabelled_entries():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4)[:3] * 5
    bank = torch.cat([centres[i] + 0.1 * torch.randn(10, 4, generator=g) for i in range(3)])
    labels = torch.arange(3).repeat_interleave(10)
    queries = centres + 0.1 * torch.randn(3, 4, generator=g)
    assert torch.equal(knn_predict(bank, labels, queries, 3, k=5), torch.arange(3))
    # unlabelled bank entries do not vote; an unlabelled bank predicts -1
    labels_unknown = labels.clone()
    labels_unknown[:10] = -1
    assert knn_predict(bank, labels_unknown, queries[:1], 3, k=5).item() != 0
    assert knn_predict(bank, torch.full_like(labels, -1), queries, 3).tolist() == [-1, -1, -1]


def test_feature_bank_is_first_in_first_out():
    bank = FeatureBank(4)
    bank.add(torch.arange(3.0)[:, None], torch.tensor([0, 1, 2]))
    bank.add(torch.arange(3.0, 6.0)[:, None], torch.tensor([3, 4, 5]))
    feats, labels = bank.get()
    assert len(bank) == 4
    assert sorted(feats[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0]
    assert sorted(labels.tolist()) == [2, 3, 4, 5]


def test_probe_heads_and_targets():
    enc = tiny_encoder()
    out = enc(torch.rand(2, 3, 32, 32))
    assert global_features(out, "cls").shape == (2, 32)
    assert global_features(out, "cls_avg").shape == (2, 64)
    assert LinearProbe(64, 5)(global_features(out)).shape == (2, 5)
    assert DepthProbe(32, 8)(out.patches, out.grid).shape == (2, 1, 32, 32)
    depth = torch.full((1, 1, 8, 8), 4.0)
    depth[..., :4, :] = 2.0
    depth[..., 0, 0] = 0.0
    target, valid = depth_probe_target(depth, (4, 4), "median")
    assert target.shape == (1, 1, 4, 4) and not valid[0, 0, 0, 0]
    assert target[valid].min().item() == pytest.approx(0.5) and target[valid].max().item() == pytest.approx(1.0)
    assert token_cosine(out.patches, out.patches).item() == pytest.approx(1.0)


def test_online_probes_report_student_beside_reference(tmp_path):
    """Any objective: the toy rotation objective trains; the probes learn the sphere colours' classes and
    report the reference (a frozen copy of the initial encoder) side by side."""
    torch.manual_seed(0)
    probes = OnlineProbes(lr=1e-2, knn_k=3, bank_size=64)
    model = RotationPrediction(tiny_encoder(), lr=1e-3, warmup_steps=0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=24,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=12,
        callbacks=[probes],
    )
    trainer.fit(model, SphereDataModule(num_train=12, num_val=6, batch_size=6))
    m = probes.last_metrics
    for key in ("linear_acc", "knn_acc", "depth_rmse", "teacher_linear_acc", "teacher_knn_acc", "teacher_depth_rmse"):
        assert key in m, key
        assert f"val/probe/{key}" in trainer.callback_metrics
    # classes differ by colour: both encoders' features separate them better than chance (1/3)
    assert m["teacher_knn_acc"] > 0.5 and m["teacher_linear_acc"] > 0.5
    assert 0.0 < m["teacher_cosine"] < 1.0  # the student moved
    assert m["depth_rmse"] > 0
    state = probes.state_dict()
    assert set(state["heads"]) and state["train_steps"] == 24


def test_online_probes_use_the_objectives_teacher(tmp_path):
    from test_triplane import make

    torch.manual_seed(0)
    probes = OnlineProbes(num_classes=3, lr=1e-2, knn_k=3)
    model = make(lambda_dist=1.0)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=4,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[probes],
    )
    trainer.fit(model, SphereDataModule(num_train=12, num_val=6, batch_size=6))
    assert probes.reference_encoder(model) is model.teacher and probes._reference is None
    assert {"linear_acc", "teacher_linear_acc", "teacher_cosine"} <= probes.last_metrics.keys()
