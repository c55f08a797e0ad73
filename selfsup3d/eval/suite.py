"""The 3D-awareness probe suite: every probe of one frozen feature source on fixed probe-train/test splits.

One call of :func:`run_probes` extracts the source's features once over the probe-train split (caching
what the heads need: features at sampled pixels, ``g × g`` pose grids, global vectors), trains the heads
on them, then streams the test split scene by scene: correspondence, depth and normal errors, pose
errors, and the global vectors for classification and retrieval. :func:`chance_levels` gives what a
source with no information reaches on each probe (from the data alone).

The pixels, pairs and query subsets drawn are seeded and do not depend on the source, so every source is
measured on exactly the same samples; the heads' initialisation and minibatches are seeded too, so the
same call gives the same numbers (on one machine and device type).

Metric names (the keys of the returned dict, see :data:`METRICS` for the ones the table shows):

* ``corr@τ`` correspondence recall at threshold ``τ`` (a fraction of the image's longer side),
  ``corr@τ/rotA-B`` the same for pairs whose relative rotation is in ``[A, B)`` degrees, ``corr_matches/rotA-B``
  the matches counted there;
* ``depth_rmse``, ``depth_absrel``, ``depth_delta1``; ``normal_deg``, ``normal_11.25``, ``normal_30``;
* ``pose_rot_auc30``, ``pose_trans_auc30``, ``pose_auc30`` (both), ``pose_rot_err``, ``pose_trans_err``;
* ``linear_acc``, ``knn_acc`` (views of labelled scenes only), ``retrieval_top1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from selfsup3d.errors import require
from selfsup3d.eval.correspondence import ROTATION_BINS, THRESHOLDS, CorrespondenceRecall, batch_correspondence
from selfsup3d.eval.dense import (
    DepthMetrics,
    NormalMetrics,
    PixelHead,
    Standardize,
    log_depth_loss,
    normal_loss,
    normals_from_depth,
)
from selfsup3d.eval.feature_pose_probe import (
    PoseAUC,
    PoseHead,
    pose_errors,
    pose_loss,
    prior_pose,
    relative_pose_targets,
)
from selfsup3d.eval.features import (
    ConstantFeatures,
    Features,
    FeatureSource,
    Views,
    derangements,
    permute_views,
    pixel_uv,
    resample_grid,
    sample_at,
)
from selfsup3d.eval.fitting import fit_head
from selfsup3d.eval.probes import knn_predict
from selfsup3d.eval.scenes import SceneSet
from selfsup3d.metrics.depth import median_scale
from selfsup3d.metrics.view_retrieval import retrieval_chance, retrieval_hits

PROBES: tuple[str, ...] = ("correspondence", "depth", "normals", "pose", "classification", "retrieval")
"""Every probe; :class:`ProbeSettings` ``probes`` picks a subset."""


@dataclass
class ProbeSettings:
    """How the probes run. Defaults fit 48 test scenes x 8 views at 64x64 in about a minute per tiny
    encoder on two CPU cores.

    Args:
        probes: which probes run (a subset of :data:`PROBES`).
        thresholds: correspondence thresholds, fractions of the image's longer side.
        rotation_bins: edges (degrees) of the relative-rotation bins of correspondence recall.
        num_queries: correspondence queries sampled per pair.
        num_matches: matches kept per pair by the ratio test.
        visibility_tol: relative depth tolerance of the visibility test.
        pixels_per_image: pixels sampled per probe-train image for the depth and normal heads.
        head_steps: optimiser steps of the depth and normal heads.
        head_batch: pixels per step.
        pose_grid: side of the grid both feature maps are brought to for the pose head.
        pose_steps: optimiser steps of the pose head.
        pose_batch: pairs per step.
        linear_steps: optimiser steps (full batch) of the linear classifier.
        knn_k: neighbours of the kNN vote.
        lr: learning rate of the heads.
        depth_align: ``median`` (scale-free: the depth head regresses depth over its image's median, and each
            image's prediction is scaled to the true median before the errors, as monocular-depth
            evaluations of relative depth do) or ``none`` (metric depth, for data of one known scale).
        shuffle_views: sanity check: the test views of each scene are permuted (a seeded permutation that
            moves every view) before the source sees them, so features no longer belong to the cameras and
            depth.
        seed: seed of every random draw and of the heads.
        batch_scenes: scenes per forward pass.
    """

    probes: tuple[str, ...] = PROBES
    thresholds: tuple[float, ...] = THRESHOLDS
    rotation_bins: tuple[float, ...] = ROTATION_BINS
    num_queries: int = 512
    num_matches: int = 256
    visibility_tol: float = 0.02
    pixels_per_image: int = 128
    head_steps: int = 600
    head_batch: int = 1024
    pose_grid: int = 8
    pose_steps: int = 600
    pose_batch: int = 128
    linear_steps: int = 300
    knn_k: int = 20
    lr: float = 1e-3
    depth_align: Literal["none", "median"] = "median"
    shuffle_views: bool = False
    seed: int = 0
    batch_scenes: int = 8

    def __post_init__(self) -> None:
        unknown = set(self.probes) - set(PROBES)
        if unknown:
            raise ValueError(f"unknown probes {sorted(unknown)}; choose from {', '.join(PROBES)}")
        require(
            self.depth_align in ("none", "median"), "depth_align", "'none' or 'median'", self.depth_align, ValueError
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


METRICS: tuple[tuple[str, str, bool], ...] = (
    ("corr@0.025", "correspondence recall @ 2.5% of the image side", True),
    ("corr@0.05", "correspondence recall @ 5%", True),
    ("corr@0.1", "correspondence recall @ 10%", True),
    ("depth_rmse", "depth RMSE", False),
    ("depth_absrel", "depth AbsRel", False),
    ("depth_delta1", "depth δ<1.25", True),
    ("normal_deg", "normal mean angular error (°)", False),
    ("pose_rot_auc30", "relative rotation AUC@30", True),
    ("pose_trans_auc30", "translation direction AUC@30", True),
    ("linear_acc", "linear classification accuracy", True),
    ("knn_acc", "kNN classification accuracy", True),
    ("retrieval_top1", "scene retrieval top-1", True),
)
"""The table's metrics: ``(key, description, higher is better)``."""


def _bin_name(lo: float, hi: float) -> str:
    return f"rot{lo:g}-{hi:g}"


def _tau(t: float) -> str:
    return f"{t:g}"


def _scene_seed(seed: int, scene: int) -> int:
    return (seed * 1_000_003 + scene * 7919) & 0x7FFFFFFF


# ============================================================================ what is drawn (source-independent)
@dataclass
class _PixelDraw:
    """Pixels drawn on the probe-train split for the dense heads, with their targets."""

    image: Tensor  # [P] view index
    uv: Tensor  # [P, 2]
    depth: Tensor  # [P]
    image_median: Tensor  # [P] median depth of the pixel's image
    normal: Tensor  # [P, 3]
    normal_valid: Tensor  # [P] bool


def _draw_pixels(views: Views, first_view: int, per_image: int, generator: torch.Generator) -> _PixelDraw:
    assert views.depth is not None and views.K is not None
    n, _, h, w = views.depth.shape
    normals, nvalid = normals_from_depth(views.depth, views.K)
    images, uvs, depths, medians, norms, nvs = [], [], [], [], [], []
    for k in range(n):
        flat = views.depth[k, 0].flatten().cpu()
        valid = (flat > 0).nonzero()[:, 0]
        if valid.numel() == 0:
            continue
        medians.append(flat[valid].median().expand(per_image))
        pick = valid[torch.randint(valid.numel(), (per_image,), generator=generator)]
        row, col = pick // w, pick % w
        images.append(torch.full((per_image,), first_view + k, dtype=torch.long))
        uvs.append(torch.stack([col.float() + 0.5, row.float() + 0.5], dim=-1))
        depths.append(views.depth[k, 0].cpu()[row, col])
        norms.append(normals[k].cpu()[:, row, col].T)
        nvs.append(nvalid[k, 0].cpu()[row, col])
    if not images:
        empty = torch.zeros(0)
        return _PixelDraw(empty.long(), torch.zeros(0, 2), empty, empty, torch.zeros(0, 3), empty.bool())
    return _PixelDraw(
        torch.cat(images), torch.cat(uvs), torch.cat(depths), torch.cat(medians), torch.cat(norms), torch.cat(nvs)
    )


def _pairs(num_scenes: int, num_views: int, ordered: bool) -> tuple[Tensor, Tensor]:
    """View indices of every pair within each scene (scene-major): ``i < j`` or, ``ordered``, ``i != j``."""
    i, j = torch.meshgrid(torch.arange(num_views), torch.arange(num_views), indexing="ij")
    keep = (i != j) if ordered else (i < j)
    i, j = i[keep], j[keep]
    base = (torch.arange(num_scenes) * num_views)[:, None]
    return (base + i).flatten(), (base + j).flatten()


def _shuffles(num_scenes: int, num_views: int, seed: int) -> Tensor:
    return derangements(num_scenes, num_views, torch.Generator().manual_seed(_scene_seed(seed, 99991)))


# ============================================================================ the probes
class _Heads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.depth: PixelHead | None = None
        self.log_depth_range: tuple[float, float] = (-20.0, 20.0)
        self.normal: PixelHead | None = None
        self.pose: PoseHead | None = None
        self.linear: nn.Module | None = None


def _progress(iterable: range, desc: str, enabled: bool) -> Any:
    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _extract_probe_split(
    source: FeatureSource, probe: SceneSet, settings: ProbeSettings, device: torch.device, progress: bool, label: str
) -> dict[str, Tensor]:
    """Features of the probe-train split that the heads need, and their targets."""
    wanted = set(settings.probes)
    g = torch.Generator().manual_seed(_scene_seed(settings.seed, 1))
    v = probe.num_views
    pixel_feats, draws, grids, vectors = [], [], [], []
    for start in _progress(range(0, len(probe), settings.batch_scenes), f"{label}: probe-train split", progress):
        stop = min(start + settings.batch_scenes, len(probe))
        views = probe.views(start, stop).to(device)
        feats = source(views)
        if wanted & {"depth", "normals"}:
            draw = _draw_pixels(views, start * v, settings.pixels_per_image, g)
            local = draw.image - start * v
            sampled = [
                sample_at(feats.dense[k : k + 1], draw.uv[local == k].to(device)[None], views.hw)[0]
                for k in range(stop * v - start * v)
            ]
            pixel_feats.append(torch.cat(sampled))
            draws.append(draw)
        if "pose" in wanted:
            grids.append(resample_grid(feats.dense, settings.pose_grid))
        vectors.append(feats.vector)
    out: dict[str, Tensor] = {"vector": torch.cat(vectors)}
    if draws:
        out["pixel_feat"] = torch.cat(pixel_feats)
        out["depth"] = torch.cat([d.depth for d in draws]).to(device)
        out["image_median"] = torch.cat([d.image_median for d in draws]).to(device)
        out["normal"] = torch.cat([d.normal for d in draws]).to(device)
        out["normal_valid"] = torch.cat([d.normal_valid for d in draws]).to(device)
    if grids:
        out["grid"] = torch.cat(grids)
    return out


def _fit_heads(cache: dict[str, Tensor], probe: SceneSet, settings: ProbeSettings, num_classes: int) -> _Heads:
    heads = _Heads()
    wanted = set(settings.probes)
    device = cache["vector"].device
    seed = settings.seed
    if "pixel_feat" in cache and cache["pixel_feat"].shape[0] > 0:
        x = cache["pixel_feat"]
        dim = x.shape[1]
        norm = Standardize.fit(x)
        if "depth" in wanted:
            torch.manual_seed(_scene_seed(seed, 2))
            heads.depth = PixelHead(norm, dim, 1).to(device)
            target = cache["depth"] / cache["image_median"] if settings.depth_align == "median" else cache["depth"]
            log_target = target.clamp(min=1e-6).log()
            heads.log_depth_range = (float(log_target.min()), float(log_target.max()))
            fit_head(
                heads.depth,
                lambda h, f, d: log_depth_loss(h(f), d),
                [x, target],
                settings.head_steps,
                settings.head_batch,
                settings.lr,
                seed=_scene_seed(seed, 3),
            )
        nv = cache["normal_valid"]
        if "normals" in wanted and nv.any():
            torch.manual_seed(_scene_seed(seed, 4))
            heads.normal = PixelHead(norm, dim, 3).to(device)
            fit_head(
                heads.normal,
                lambda h, f, n: normal_loss(h(f), n),
                [x[nv], cache["normal"][nv]],
                settings.head_steps,
                settings.head_batch,
                settings.lr,
                seed=_scene_seed(seed, 5),
            )
    if "pose" in wanted and "grid" in cache:
        grid = cache["grid"]
        a, b = _pairs(len(probe), probe.num_views, ordered=True)
        c2w = probe.c2w.flatten(0, 1).to(device)
        rot, direction = relative_pose_targets(c2w[a], c2w[b])
        torch.manual_seed(_scene_seed(seed, 6))
        norm = Standardize.fit(grid.permute(0, 2, 3, 1).flatten(0, 2))
        heads.pose = PoseHead(norm, grid.shape[1], settings.pose_grid).to(device)

        def loss(h: PoseHead, ia: Tensor, ib: Tensor, r: Tensor, t: Tensor) -> Tensor:
            pr, pt = h(grid[ia], grid[ib])
            return pose_loss(pr, pt, r, t)

        fit_head(
            heads.pose,
            loss,
            [a.to(device), b.to(device), rot, direction],
            settings.pose_steps,
            settings.pose_batch,
            settings.lr,
            seed=_scene_seed(seed, 7),
        )
    labels = probe.labels.to(device).repeat_interleave(probe.num_views)
    if "classification" in wanted and num_classes > 0 and (labels >= 0).any():
        x = cache["vector"][labels >= 0]
        torch.manual_seed(_scene_seed(seed, 8))
        heads.linear = nn.Sequential(Standardize.fit(x), nn.Linear(x.shape[1], num_classes)).to(device)
        fit_head(
            heads.linear,
            lambda h, f, y: F.cross_entropy(h(f), y),
            [x, labels[labels >= 0]],
            settings.linear_steps,
            x.shape[0],
            lr=1e-2,
            weight_decay=1e-4,
            seed=_scene_seed(seed, 9),
        )
    return heads


def _dense_eval(
    heads: _Heads, feats: Features, views: Views, depth_m: DepthMetrics, normal_m: NormalMetrics, align: str
) -> None:
    assert views.depth is not None and views.K is not None
    n, _, h, w = views.depth.shape
    normals, nvalid = normals_from_depth(views.depth, views.K)
    all_uv = pixel_uv(torch.arange(h * w, device=views.depth.device), w)
    with torch.no_grad():
        for k in range(n):
            valid = views.depth[k, 0].flatten() > 0
            if not valid.any():
                continue
            f = sample_at(feats.dense[k : k + 1], all_uv[valid][None], (h, w))[0]
            if heads.depth is not None:
                pred = heads.depth(f)[:, 0].clamp(*heads.log_depth_range).exp()
                target = views.depth[k, 0].flatten()[valid]
                if align == "median":
                    pred = median_scale(pred, target)
                depth_m.update(pred, target)
            if heads.normal is not None:
                nv = nvalid[k, 0].flatten()[valid]
                if nv.any():
                    target_n = normals[k].flatten(1).T[valid][nv]
                    normal_m.update(heads.normal(f[nv]), target_n)


def named_metrics(
    thresholds: Sequence[float],
    bins: Sequence[float],
    corr: dict[str, Tensor] | None = None,
    **groups: dict[str, Tensor] | None,
) -> dict[str, float]:
    """The metric classes' results under the report's names (see the module docstring).

    Args:
        thresholds: correspondence thresholds (fractions).
        bins: rotation-bin edges (degrees).
        corr: :class:`CorrespondenceRecall` results.
        groups: ``depth=`` :class:`DepthMetrics`, ``normal=`` :class:`NormalMetrics`, ``pose=`` :class:`PoseAUC`
            results (``None`` to leave out).
    """
    out: dict[str, float] = {}
    if corr is not None:
        for t, tau in enumerate(thresholds):
            out[f"corr@{_tau(tau)}"] = float(corr["recall"][t])
        for b in range(len(bins) - 1):
            name = _bin_name(bins[b], bins[b + 1])
            for t, tau in enumerate(thresholds):
                out[f"corr@{_tau(tau)}/{name}"] = float(corr["bin_recall"][b, t])
            out[f"corr_matches/{name}"] = float(corr["bin_matches"][b])
    names = {
        "depth": {"rmse": "depth_rmse", "abs_rel": "depth_absrel", "delta1": "depth_delta1"},
        "normal": {"mean_deg": "normal_deg", "within11.25": "normal_11.25", "within30": "normal_30"},
        "pose": {
            "rot_auc": "pose_rot_auc30",
            "trans_auc": "pose_trans_auc30",
            "auc": "pose_auc30",
            "rot_err": "pose_rot_err",
            "trans_err": "pose_trans_err",
        },
    }
    for group, values in groups.items():
        if values is None:
            continue
        for key, value in values.items():
            out[names.get(group, {}).get(key, key)] = float(value)
    return out


def num_classes_of(*sets: SceneSet) -> int:
    """Classes of the labels (``max + 1``; 0 when no scene is labelled)."""
    return int(max(int(s.labels.max()) for s in sets) + 1) if sets else 0


def run_probes(
    source: FeatureSource,
    probe: SceneSet,
    test: SceneSet,
    settings: ProbeSettings | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    label: str = "encoder",
) -> dict[str, float]:
    """Every probe of ``source``: heads trained on ``probe``, every number measured on ``test``.

    Args:
        source: the frozen features.
        probe: the probe-train split (trains the heads, fills the kNN bank).
        test: the test split.
        settings: see :class:`ProbeSettings`.
        device: where features and heads live.
        progress: show progress bars.
        label: name in the progress bars.

    Returns:
        the metrics by name (see the module docstring); probes that cannot run on the data (no labels) are
        absent.
    """
    settings = settings or ProbeSettings()
    device = torch.device(device)
    source = source.to(device)
    wanted = set(settings.probes)
    num_classes = num_classes_of(probe, test)
    cache = _extract_probe_split(source, probe, settings, device, progress, label)
    heads = _fit_heads(cache, probe, settings, num_classes)
    cache.pop("pixel_feat", None)  # the test split is streamed; only the kNN bank stays

    corr_m = CorrespondenceRecall(settings.thresholds, settings.rotation_bins).to(device)
    depth_m, normal_m, pose_m = DepthMetrics().to(device), NormalMetrics().to(device), PoseAUC(30).to(device)
    v = test.num_views
    perms = _shuffles(len(test), v, settings.seed) if settings.shuffle_views else None
    vectors = []
    for start in _progress(range(0, len(test), settings.batch_scenes), f"{label}: test split", progress):
        stop = min(start + settings.batch_scenes, len(test))
        views = test.views(start, stop).to(device)
        seen = permute_views(views, perms[start:stop]) if perms is not None else views
        feats = source(seen)
        vectors.append(feats.vector)
        if "correspondence" in wanted:
            seeds = [_scene_seed(settings.seed, s) for s in range(start, stop)]
            batch_correspondence(feats.dense, views, seeds, corr_m, settings.num_queries, settings.num_matches,
                                 settings.visibility_tol)  # fmt: skip
        if heads.depth is not None or heads.normal is not None:
            _dense_eval(heads, feats, views, depth_m, normal_m, settings.depth_align)
        if heads.pose is not None and views.c2w is not None:
            a, b = _pairs(stop - start, v, ordered=False)
            grid = resample_grid(feats.dense, settings.pose_grid)
            with torch.no_grad():
                rot, direction = heads.pose(grid[a.to(device)], grid[b.to(device)])
            true_r, true_t = relative_pose_targets(views.c2w[a.to(device)], views.c2w[b.to(device)])
            pose_m.update(*pose_errors(rot, direction, true_r, true_t))
    out = named_metrics(
        settings.thresholds,
        settings.rotation_bins,
        corr_m.compute() if "correspondence" in wanted else None,
        depth=depth_m.compute() if heads.depth is not None else None,
        normal=normal_m.compute() if heads.normal is not None else None,
        pose=pose_m.compute() if heads.pose is not None else None,
    )
    test_vec = torch.cat(vectors)
    test_labels = test.labels.to(device).repeat_interleave(v)
    labelled = test_labels >= 0
    if "classification" in wanted and labelled.any() and heads.linear is not None:
        with torch.no_grad():
            pred = heads.linear(test_vec[labelled]).argmax(-1)
        out["linear_acc"] = float((pred == test_labels[labelled]).float().mean())
        bank_labels = probe.labels.to(device).repeat_interleave(probe.num_views)
        knn = knn_predict(cache["vector"], bank_labels, test_vec[labelled], num_classes, settings.knn_k)
        out["knn_acc"] = float((knn == test_labels[labelled]).float().mean())
    if "retrieval" in wanted:
        scene = torch.arange(len(test), device=device).repeat_interleave(v)
        out["retrieval_top1"] = float(retrieval_hits(test_vec, scene).float().mean())
    return out


def chance_levels(
    probe: SceneSet, test: SceneSet, settings: ProbeSettings | None = None, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """What a source without information reaches, from the data alone, under the same names as
    :func:`run_probes`: a uniformly random correspondence match, the constant depth ``exp(mean log depth)``
    and the mean normal of the probe-train pixels, the constant pose :func:`prior_pose`, the majority
    class (linear and kNN), and a uniformly random other view (retrieval)."""
    settings = settings or ProbeSettings()
    device = torch.device(device)
    wanted = set(settings.probes)
    v = test.num_views
    out: dict[str, float] = {}
    constant = ConstantFeatures()
    corr_m = CorrespondenceRecall(settings.thresholds, settings.rotation_bins).to(device)
    depth_m, normal_m, pose_m = DepthMetrics().to(device), NormalMetrics().to(device), PoseAUC(30).to(device)
    g = torch.Generator().manual_seed(_scene_seed(settings.seed, 1))
    draws = [
        _draw_pixels(probe.views(s, min(s + settings.batch_scenes, len(probe))).to(device), s * v, 1, g)
        for s in range(0, len(probe), settings.batch_scenes)
    ] if wanted & {"depth", "normals"} else []  # fmt: skip
    log_depth = torch.cat([d.depth for d in draws]).clamp(min=1e-6).log().mean() if draws else None
    mean_normal = None
    if draws:
        nv = torch.cat([d.normal_valid for d in draws])
        mean_normal = F.normalize(torch.cat([d.normal for d in draws])[nv].mean(0), dim=0) if nv.any() else None
    a, b = _pairs(len(probe), probe.num_views, ordered=True)
    c2w = probe.c2w.flatten(0, 1)
    prior_r, prior_t = prior_pose(*relative_pose_targets(c2w[a], c2w[b]))
    for start in range(0, len(test), settings.batch_scenes):
        stop = min(start + settings.batch_scenes, len(test))
        views = test.views(start, stop).to(device)
        assert views.depth is not None and views.K is not None and views.c2w is not None
        if "correspondence" in wanted:
            seeds = [_scene_seed(settings.seed, s) for s in range(start, stop)]
            batch_correspondence(constant(views).dense, views, seeds, corr_m, settings.num_queries,
                                 settings.num_matches, settings.visibility_tol, chance=True)  # fmt: skip
        if log_depth is not None and "depth" in wanted:
            for k in range(views.depth.shape[0]):
                target = views.depth[k][views.depth[k] > 0]
                if target.numel() == 0:
                    continue
                pred = torch.full_like(target, float(log_depth.exp()))
                depth_m.update(median_scale(pred, target) if settings.depth_align == "median" else pred, target)
        if mean_normal is not None and "normals" in wanted:
            normals, nvalid = normals_from_depth(views.depth, views.K)
            target_n = normals.permute(0, 2, 3, 1)[nvalid[:, 0]]
            normal_m.update(mean_normal.to(device).expand_as(target_n), target_n)
        if "pose" in wanted:
            ta, tb = _pairs(stop - start, v, ordered=False)
            true_r, true_t = relative_pose_targets(views.c2w[ta], views.c2w[tb])
            pose_m.update(
                *pose_errors(prior_r.to(device).expand_as(true_r), prior_t.to(device).expand_as(true_t), true_r, true_t)
            )
    if "correspondence" in wanted:
        chance = corr_m.compute()["chance"]
        out.update({f"corr@{_tau(t)}": float(chance[k]) for k, t in enumerate(settings.thresholds)})
    out.update(
        named_metrics(
            settings.thresholds,
            settings.rotation_bins,
            None,
            depth=depth_m.compute() if log_depth is not None and "depth" in wanted else None,
            normal=normal_m.compute() if mean_normal is not None and "normals" in wanted else None,
            pose=pose_m.compute() if "pose" in wanted else None,
        )
    )
    test_labels = test.labels.repeat_interleave(v)
    probe_labels = probe.labels[probe.labels >= 0]
    if "classification" in wanted and (test_labels >= 0).any() and probe_labels.numel():
        majority = int(torch.bincount(probe_labels).argmax())
        acc = float((test_labels[test_labels >= 0] == majority).float().mean())
        out["linear_acc"] = out["knn_acc"] = acc
    if "retrieval" in wanted:
        out["retrieval_top1"] = retrieval_chance(torch.arange(len(test)).repeat_interleave(v))
    return out
