"""Multi-view correspondence from frozen dense features (the Probe3D protocol, reimplemented from its
description: El Banani et al., CVPR 2024).

For a pair of views ``(i, j)`` of one scene:

1. queries: pixels of ``i`` with known depth whose surface point is *visible* in ``j`` (it projects inside
   ``j``, in front of the camera, and agrees with ``j``'s depth at that pixel within ``rel_tol`` of its
   depth); a seeded random subset of at most ``num_queries`` of them; their true position in ``j`` is the
   projection through ``i``'s depth and both cameras;
2. database: every pixel of ``j`` with known depth;
3. each query's feature is matched to its cosine nearest neighbour in the database; the match's weight is
   the ratio test ``1 - d1 / d2`` (``d`` = Euclidean distance of the unit-normalised features to the
   nearest and second-nearest database features); the ``num_matches`` matches of largest weight are kept
   (Probe3D keeps its top 1000);
4. error of a kept match = distance in pixels between the matched pixel's centre and the true position.

Recall at a threshold is the fraction of kept matches with an error below it, pooled over all pairs.
Thresholds are fractions of the image's longer side (``0.025, 0.05, 0.1``: 1.6, 3.2 and 6.4 pixels at 64
pixels), so they mean the same at any resolution; errors are passed to :class:`CorrespondenceRecall`
already divided by that side. Recall is also binned by the pair's relative camera rotation
(``[0, 15), [15, 30), [30, 60), [60, 180]`` degrees).

Chance: the recall of a match drawn uniformly from the database, i.e. for each query the fraction of
database pixels within the threshold of its true position (a property of the data, not of an encoder).

Cameras and pixels follow :mod:`selfsup3d.geometry.cameras` (OpenCV ``c2w``, pixel ``K``, centres at +0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from selfsup3d.errors import require
from selfsup3d.eval.features import Views, pixel_uv, sample_at
from selfsup3d.geometry.cameras import project_points, rotation_angle, unproject_depth

THRESHOLDS: tuple[float, ...] = (0.025, 0.05, 0.1)
"""Default thresholds, as fractions of the image's longer side."""
ROTATION_BINS: tuple[float, ...] = (0.0, 15.0, 30.0, 60.0, 180.0)
"""Default edges (degrees) of the relative-rotation bins; the last bin includes its upper edge."""


def visible_queries(
    depth_i: Tensor, K_i: Tensor, c2w_i: Tensor, depth_j: Tensor, K_j: Tensor, c2w_j: Tensor, rel_tol: float = 0.02
) -> tuple[Tensor, Tensor]:
    """Pixels of view ``i`` whose surface point is visible in view ``j``, and where it lands there.

    Args:
        depth_i: ``[1, H, W]`` z-depth of view ``i`` (0 = unknown).
        K_i: ``[3, 3]`` intrinsics of ``i``.
        c2w_i: ``[4, 4]`` camera-to-world of ``i``.
        depth_j: ``[1, H, W]`` z-depth of view ``j``.
        K_j: ``[3, 3]`` intrinsics of ``j``.
        c2w_j: ``[4, 4]`` camera-to-world of ``j``.
        rel_tol: the projected depth must match ``j``'s depth at the landing pixel within ``rel_tol`` of it.

    Returns:
        ``(index [Q], uv [Q, 2])``: flat (row-major) pixel indices in ``i`` and the true pixel coordinates in
        ``j`` (float32).
    """
    h, w = depth_i.shape[-2:]
    valid = depth_i[0].flatten() > 0
    points = unproject_depth(depth_i.double(), K_i.double(), c2w_i.double()).reshape(-1, 3)[valid]
    uv, z = project_points(points, K_j.double(), c2w_j.double())
    col, row = torch.floor(uv[:, 0]), torch.floor(uv[:, 1])
    inside = (z > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    d_j = depth_j[0].double()[row.clamp(0, h - 1).long(), col.clamp(0, w - 1).long()]
    visible = inside & (d_j > 0) & ((d_j - z).abs() <= rel_tol * z)
    index = valid.nonzero()[:, 0][visible]
    return index, uv[visible].float()


def nearest_neighbours(query: Tensor, database: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine nearest neighbour of each query in the database, with the ratio-test weight.

    Args:
        query: ``[Q, D]`` features.
        database: ``[M, D]`` features.

    Returns:
        ``(index [Q], weight [Q])``: the nearest database entry and ``1 - d1 / d2`` in ``[0, 1]`` (``d`` the
        distances of the unit-normalised features to the nearest and second nearest; 0 when ``d2 = 0`` or
        the database has one entry).
    """
    q = F.normalize(query.float(), dim=-1)
    db = F.normalize(database.float(), dim=-1)
    sim = q @ db.T
    top = sim.topk(min(2, db.shape[0]), dim=1)
    index = top.indices[:, 0]
    if db.shape[0] < 2:
        return index, torch.zeros(q.shape[0], device=q.device)
    dist = (2.0 - 2.0 * top.values).clamp(min=0).sqrt()
    d1, d2 = dist[:, 0], dist[:, 1]
    weight = torch.where(d2 > 0, 1.0 - d1 / d2.clamp(min=1e-12), torch.zeros_like(d2)).clamp(0, 1)
    return index, weight


def match_errors(
    query: Tensor, database: Tensor, database_uv: Tensor, true_uv: Tensor, num_matches: int
) -> tuple[Tensor, Tensor]:
    """Errors (pixels) of the ``num_matches`` most confident nearest-neighbour matches.

    Args:
        query: ``[Q, D]`` query features.
        database: ``[M, D]`` database features.
        database_uv: ``[M, 2]`` pixel centres of the database entries.
        true_uv: ``[Q, 2]`` true positions of the queries in the database view.
        num_matches: matches kept, by ratio-test weight (ties keep the earlier query).

    Returns:
        ``(errors [k], kept [k])``: pixel errors and the indices of the kept queries, ``k = min(num_matches, Q)``.
    """
    index, weight = nearest_neighbours(query, database)
    errors = (database_uv[index] - true_uv).norm(dim=-1)
    order = torch.sort(weight, descending=True, stable=True).indices[: min(num_matches, query.shape[0])]
    return errors[order], order


def chance_fractions(true_uv: Tensor, database_uv: Tensor, thresholds_px: Tensor) -> Tensor:
    """For each query, the fraction of database pixels within each threshold of its true position:
    ``[Q, T]`` (the recall of a uniformly random match)."""
    dist = torch.cdist(true_uv.float(), database_uv.float())  # [Q, M]
    return (dist[:, :, None] < thresholds_px.to(dist)[None, None]).float().mean(1)


def relative_rotation_deg(c2w_i: Tensor, c2w_j: Tensor) -> Tensor:
    """Angle in degrees of the relative rotation ``R_i^T R_j`` of two cameras (``[..., 4, 4]``)."""
    rel = c2w_i[..., :3, :3].transpose(-1, -2).double() @ c2w_j[..., :3, :3].double()
    return torch.rad2deg(rotation_angle(rel)).float()


class CorrespondenceRecall(Metric):
    """Recall of kept matches at relative thresholds, overall and per relative-rotation bin, and chance.

    Sums only (DDP-safe: every state is reduced by summation).

    Args:
        thresholds: fractions of the image's longer side.
        bins: edges of the relative-rotation bins in degrees.
    """

    full_state_update = False

    def __init__(
        self, thresholds: Sequence[float] = THRESHOLDS, bins: Sequence[float] = ROTATION_BINS, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        require(
            list(bins) == sorted(bins) and len(bins) >= 2,
            "rotation bins",
            "at least two increasing edges",
            list(bins),
            ValueError,
        )
        self.thresholds = tuple(float(t) for t in thresholds)
        self.bins = tuple(float(b) for b in bins)
        t, b = len(self.thresholds), len(self.bins) - 1
        self.add_state("hits", torch.zeros(t, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bin_hits", torch.zeros(b, t, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("bin_count", torch.zeros(b, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("chance_sum", torch.zeros(t, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("chance_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def bin_of(self, angle_deg: float) -> int:
        """Index of the bin holding a relative rotation of ``angle_deg`` degrees."""
        inner = torch.tensor(self.bins[1:-1], dtype=torch.float64)
        return int(torch.bucketize(torch.tensor(float(angle_deg), dtype=torch.float64), inner, right=True))

    def update(self, errors: Tensor, angle_deg: float | Tensor, chance: Tensor | None = None) -> None:
        """Add one pair's kept matches.

        Args:
            errors: ``[k]`` match errors divided by the image's longer side.
            angle_deg: the pair's relative rotation in degrees.
            chance: optional ``[Q, T]`` chance fractions of the pair's queries (:func:`chance_fractions`).
        """
        thr = torch.tensor(self.thresholds, dtype=torch.float64, device=self.hits.device)
        hits = (errors.double().to(thr.device)[:, None] < thr[None]).sum(0).double()
        b = self.bin_of(float(angle_deg))
        self.hits += hits
        self.count += errors.numel()
        self.bin_hits[b] += hits
        self.bin_count[b] += errors.numel()
        if chance is not None:
            self.chance_sum += chance.double().to(thr.device).sum(0)
            self.chance_count += chance.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``recall [T]``, ``bin_recall [B, T]`` (NaN for an empty bin), ``bin_matches [B]``, ``matches``,
        ``chance [T]`` (NaN when no chance was added)."""
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.hits.device)
        return {
            "recall": self.hits / self.count if self.count > 0 else self.hits * nan,
            "bin_recall": torch.where(
                self.bin_count[:, None] > 0, self.bin_hits / self.bin_count.clamp(min=1)[:, None], nan
            ),
            "bin_matches": self.bin_count.clone(),
            "matches": self.count.clone(),
            "chance": self.chance_sum / self.chance_count if self.chance_count > 0 else self.chance_sum * nan,
        }


def scene_correspondence(
    dense: Tensor,
    depth: Tensor,
    K: Tensor,
    c2w: Tensor,
    metric: CorrespondenceRecall,
    num_queries: int = 512,
    num_matches: int = 256,
    rel_tol: float = 0.02,
    seed: int = 0,
    chance: bool = False,
    min_queries: int = 8,
    max_pairs: int | None = None,
) -> int:
    """Match every pair ``i < j`` of one scene's views and add them to ``metric``.

    Args:
        dense: ``[V, D, h, w]`` dense features of the views (any ``h × w``; read at pixel centres).
        depth: ``[V, 1, H, W]`` true z-depth at the common resolution.
        K: ``[V, 3, 3]`` intrinsics at that resolution.
        c2w: ``[V, 4, 4]`` camera-to-world.
        metric: where the pairs go.
        num_queries: queries sampled per pair (seeded by ``seed``, ``i`` and ``j``: the same for every encoder).
        num_matches: matches kept per pair by ratio-test weight.
        rel_tol: visibility tolerance (see :func:`visible_queries`).
        seed: seed of the query subsets.
        chance: also add the pairs' chance fractions.
        min_queries: pairs with fewer visible queries are skipped.
        max_pairs: stop after this many pairs (in the order ``(0, 1), (0, 2), ...``); ``None``: all.

    Returns:
        the number of pairs added.
    """
    v = dense.shape[0]
    hw = (int(depth.shape[-2]), int(depth.shape[-1]))
    side = float(max(hw))
    thresholds_px = torch.tensor(metric.thresholds, device=depth.device) * side
    added = 0
    for i, j in torch.triu_indices(v, v, offset=1).T.tolist():
        if max_pairs is not None and added >= max_pairs:
            break
        index, true_uv = visible_queries(depth[i], K[i], c2w[i], depth[j], K[j], c2w[j], rel_tol)
        if index.numel() < min_queries:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + i * v + j)
        # in random order, so that matches of equal weight (e.g. a constant feature) are kept at random
        pick = torch.randperm(index.numel(), generator=g)[:num_queries].to(index.device)
        index, true_uv = index[pick], true_uv[pick]
        db_index = (depth[j, 0].flatten() > 0).nonzero()[:, 0]
        query_uv = pixel_uv(index, hw[1]).to(depth.device)
        db_uv = pixel_uv(db_index, hw[1]).to(depth.device)
        query = sample_at(dense[i : i + 1], query_uv[None], hw)[0]
        database = sample_at(dense[j : j + 1], db_uv[None], hw)[0]
        errors, _ = match_errors(query, database, db_uv, true_uv, num_matches)
        fractions = chance_fractions(true_uv, db_uv, thresholds_px) if chance else None
        metric.update(errors / side, relative_rotation_deg(c2w[i], c2w[j]), fractions)
        added += 1
    return added


def batch_correspondence(
    dense: Tensor,
    views: Views,
    seeds: Sequence[int],
    metric: CorrespondenceRecall,
    num_queries: int = 512,
    num_matches: int = 256,
    rel_tol: float = 0.02,
    chance: bool = False,
    max_pairs: int | None = None,
) -> int:
    """:func:`scene_correspondence` for every scene of a batch of views, scene after scene.

    Args:
        dense: ``[S·V, D, h, w]`` dense features of ``S`` scenes of ``V`` consecutive views each.
        views: the same views, with depth, intrinsics and cameras.
        seeds: the seed of each scene's query subsets (``S`` of them).
        metric: where the pairs go.
        num_queries, num_matches, rel_tol, chance, max_pairs: as :func:`scene_correspondence`.

    Returns:
        the number of pairs added.
    """
    if views.depth is None or views.K is None or views.c2w is None:
        raise ValueError("correspondence needs the views' depth, intrinsics and cameras")
    v = dense.shape[0] // len(seeds)
    added = 0
    for s, seed in enumerate(seeds):
        sl = slice(s * v, (s + 1) * v)
        added += scene_correspondence(dense[sl], views.depth[sl], views.K[sl], views.c2w[sl], metric, num_queries,
                                      num_matches, rel_tol, seed, chance, max_pairs=max_pairs)  # fmt: skip
    return added
