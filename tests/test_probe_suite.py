"""The probe suite end to end on synthetic scenes with exact geometry: sources that carry exactly what a probe
asks for reach its best value, sources that carry nothing reach chance, and breaking the link between
views and cameras drops correspondence and pose to chance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from probe_synthetic import plane_scene_set

from selfsup3d.eval.dense import normals_from_depth
from selfsup3d.eval.features import ColourFeatures, ConstantFeatures, Features, FeatureSource, OracleFeatures, Views
from selfsup3d.eval.suite import ProbeSettings, chance_levels, run_probes

FAST = {"head_steps": 150, "pose_steps": 300, "linear_steps": 100, "num_queries": 128, "num_matches": 64}


@pytest.fixture(scope="module")
def splits():
    probe = plane_scene_set(24, num_views=4, size=32, seed=1)
    test = plane_scene_set(6, num_views=4, size=32, seed=2, start=100)
    return probe, test


@pytest.fixture(scope="module")
def splits64():
    return plane_scene_set(4, num_views=4, size=64, seed=1), plane_scene_set(4, num_views=4, size=64, seed=2)


class DepthOracle(FeatureSource):
    """Each pixel's log depth over its image's median (what the scale-free depth head regresses)."""

    def __call__(self, views: Views) -> Features:
        d = views.depth
        med = torch.stack([x[x > 0].median() for x in d])
        rel = torch.where(d > 0, (d / med[:, None, None, None]).clamp(min=1e-6).log(), torch.zeros_like(d))
        return Features(torch.cat([rel, torch.ones_like(rel)], dim=1), rel.flatten(1).mean(1, keepdim=True))


class NormalOracle(FeatureSource):
    def __call__(self, views: Views) -> Features:
        n, _ = normals_from_depth(views.depth, views.K)
        return Features(n, n.flatten(2).mean(2))


class CameraOracle(FeatureSource):
    """The camera-to-world matrix of each view, the same at every pixel."""

    def __call__(self, views: Views) -> Features:
        c = views.c2w[:, :3].flatten(1)
        return Features(c[:, :, None, None].expand(-1, -1, 8, 8).contiguous(), c)


def stamped(scenes, codes: torch.Tensor):
    """A copy of ``scenes`` whose views carry ``codes[scene]`` (0..255) in the red channel of pixel (0, 0)."""
    from dataclasses import replace

    images = scenes.images.clone()
    images[:, :, 0, 0, 0] = codes.to(torch.uint8)[:, None]
    return replace(scenes, images=images)


class CodeOracle(FeatureSource):
    """The global feature names the code stamped into pixel (0, 0): one-hot (``classes``) or, with
    ``classes=None``, a random vector seeded by it."""

    def __init__(self, classes: int | None) -> None:
        self.classes = classes

    def __call__(self, views: Views) -> Features:
        codes = (views.images[:, 0, 0, 0] * 255).round().long()
        if self.classes:
            vec = F.one_hot(codes, self.classes).float()
        else:
            vec = torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(int(c))) for c in codes])
        return Features(torch.ones(len(codes), 1, 1, 1), vec)


def test_oracle_correspondence_near_perfect_constant_at_chance_shuffled_at_chance(splits64):
    probe, test = splits64
    settings = ProbeSettings(probes=("correspondence",), **FAST)
    chance = chance_levels(probe, test, settings)
    oracle = run_probes(OracleFeatures(), probe, test, settings)
    constant = run_probes(ConstantFeatures(), probe, test, settings)
    shuffled = run_probes(OracleFeatures(), probe, test, ProbeSettings(**{**settings.as_dict(), "shuffle_views": True}))
    assert oracle["corr@0.025"] >= 0.95
    for tau in ("0.025", "0.05", "0.1"):
        assert 0 < chance[f"corr@{tau}"] < 0.1
        assert constant[f"corr@{tau}"] <= chance[f"corr@{tau}"] + 0.05
        assert shuffled[f"corr@{tau}"] <= chance[f"corr@{tau}"] + 0.05
    assert oracle["corr_matches/rot60-180"] + oracle["corr_matches/rot30-60"] > 0


def test_depth_and_normal_probes_recover_what_the_features_carry(splits):
    probe, test = splits
    settings = ProbeSettings(probes=("depth", "normals"), **FAST)
    chance = chance_levels(probe, test, settings)
    depth = run_probes(DepthOracle(), probe, test, settings)
    normal = run_probes(NormalOracle(), probe, test, settings)
    constant = run_probes(ConstantFeatures(), probe, test, settings)
    assert depth["depth_delta1"] > 0.99 and depth["depth_absrel"] < 0.03
    assert depth["depth_rmse"] < 0.2 * chance["depth_rmse"]
    assert normal["normal_deg"] < 5.0 and normal["normal_11.25"] > 0.95
    # no information: the heads learn the constant answer
    assert constant["depth_rmse"] == pytest.approx(chance["depth_rmse"], rel=0.1)
    assert constant["normal_deg"] == pytest.approx(chance["normal_deg"], rel=0.15)


def test_pose_probe_reads_cameras_and_drops_to_the_prior_when_views_are_shuffled(splits):
    probe, test = splits
    settings = ProbeSettings(probes=("pose",), **FAST)
    chance = chance_levels(probe, test, settings)
    good = run_probes(CameraOracle(), probe, test, settings)
    shuffled = run_probes(CameraOracle(), probe, test, ProbeSettings(**{**settings.as_dict(), "shuffle_views": True}))
    assert good["pose_rot_auc30"] > 0.6 and good["pose_trans_auc30"] > 0.4
    assert chance["pose_rot_auc30"] < 0.3
    assert shuffled["pose_rot_auc30"] <= chance["pose_rot_auc30"] + 0.15
    assert good["pose_rot_err"] < shuffled["pose_rot_err"] / 3


def test_classification_and_retrieval_of_features_that_name_the_label_or_the_scene(splits):
    probe, test = splits
    settings = ProbeSettings(probes=("classification", "retrieval"), **FAST)
    chance = chance_levels(probe, test, settings)
    labelled = run_probes(CodeOracle(3), stamped(probe, probe.labels), stamped(test, test.labels), settings)
    assert labelled["linear_acc"] == 1.0 and labelled["knn_acc"] == 1.0
    scene = torch.arange(len(test))
    named = run_probes(CodeOracle(None), stamped(probe, torch.arange(len(probe))), stamped(test, scene), settings)
    assert named["retrieval_top1"] == 1.0
    assert chance["retrieval_top1"] == pytest.approx(3 / (6 * 4 - 1))
    majority = int(torch.bincount(probe.labels).argmax())
    assert chance["linear_acc"] == pytest.approx(float((test.labels == majority).float().mean()))
    constant = run_probes(ConstantFeatures(), probe, test, settings)
    assert constant["linear_acc"] == pytest.approx(chance["linear_acc"])


def test_same_call_same_numbers(splits):
    probe, test = splits
    settings = ProbeSettings(**{**FAST, "head_steps": 50, "pose_steps": 50})
    a = run_probes(ColourFeatures(), probe, test, settings)
    b = run_probes(ColourFeatures(), probe, test, settings)
    assert a == b
    assert all(math.isfinite(v) or "/rot" in k for k, v in a.items())


def test_unknown_probe_is_refused():
    with pytest.raises(ValueError, match="unknown probes"):
        ProbeSettings(probes=("depth", "telepathy"))
