"""Scene retrieval and duplicate detection metrics on hand-made cases with known answers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from selfsup3d.heads.keypoints import KeypointSet
from selfsup3d.metrics.keypoint_retrieval import (
    duplicate_auroc,
    duplicate_auroc_matrix,
    retrieval_accuracy,
    set_similarity,
)


def test_retrieval_accuracy_counts_ranks_and_ties_against_the_query():
    sim = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3, 0.0, 0.0],  # true 0: rank 0
            [0.5, 0.4, 0.6, 0.1, 0.0, 0.0],  # true 1: two scenes above it, rank 2
            [0.3, 0.3, 0.3, 0.3, 0.3, 0.3],  # true 2: all tied, rank 5 (ties count against)
            [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],  # true 3: rank 2
        ]
    )
    truth = torch.tensor([0, 1, 2, 3])
    acc = retrieval_accuracy(sim, truth, ks=(1, 3, 5, 6))
    assert acc == {"top1": 0.25, "top3": 0.75, "top5": 0.75, "top6": 1.0}
    with pytest.raises(ValueError, match="truth"):
        retrieval_accuracy(sim, torch.tensor([0, 1, 2, 6]))


def test_duplicate_auroc_known_cases():
    scores = torch.tensor([0.9, 0.8, 0.3, 0.2, 0.1])
    labels = torch.tensor([1, 1, 0, 0, 0])
    assert duplicate_auroc(scores, labels) == pytest.approx(1.0)
    assert duplicate_auroc(-scores, labels) == pytest.approx(0.0)
    # one of the 2 x 3 positive-negative pairs is ordered wrongly: AUC 5/6
    assert duplicate_auroc(torch.tensor([0.9, 0.25, 0.3, 0.2, 0.1]), labels) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="both"):
        duplicate_auroc(scores, torch.ones(5))
    # a similarity matrix whose diagonal (the duplicates) is highest
    sim = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) * 0.5 + torch.eye(6)
    assert duplicate_auroc_matrix(sim) == pytest.approx(1.0)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_best_match_finds_the_scene_a_query_was_taken_from():
    scenes = _unit(5, 20, 32, seed=0)  # 5 scenes x 20 key points
    weights = torch.ones(5, 20)
    weights[3, 15:] = 0.0  # scene 3 has only 15 key points
    db = KeypointSet(scenes, weights)
    # each query sees 6 of its scene's key points, slightly perturbed, plus 2 padded slots
    g = torch.Generator().manual_seed(1)
    truth = torch.tensor([2, 0, 3, 3, 4])
    q = torch.stack([scenes[s, torch.randperm(15, generator=g)[:6]] for s in truth.tolist()])
    q = F.normalize(q + 0.05 * torch.randn(q.shape, generator=g), dim=-1)
    q = torch.cat([q, torch.randn(5, 2, 32, generator=g)], dim=1)
    qw = torch.cat([torch.ones(5, 6), torch.zeros(5, 2)], dim=1)
    for mode in ("best_match", "mutual", "chamfer"):
        sim = set_similarity(KeypointSet(q, qw), db, mode=mode, chunk=2)
        assert sim.shape == (5, 5)
        assert retrieval_accuracy(sim, truth, ks=(1,))["top1"] == 1.0, mode
    best = set_similarity(KeypointSet(q, qw), db)
    own = best[torch.arange(5), truth]
    assert own.min() > 0.9  # cosine of a key point and its noisy copy (noise of norm 0.28)
    assert best.masked_fill(F.one_hot(truth, 5).bool(), 0).max() < 0.75


def test_best_match_exact_values_and_mutual_discounts_hub_descriptors():
    e = torch.eye(4)
    # query: key points e0 and e1; scene A holds e0 and e1; scene B holds a hub (e0 + e1) that is everyone's
    # nearest neighbour but only the mutual nearest neighbour of one of them
    hub = F.normalize(e[0] + e[1], dim=0)
    query = KeypointSet(e[None, :2], torch.ones(1, 2))
    scenes = KeypointSet(torch.stack([e[:2], torch.stack([hub, e[3]])]), torch.ones(2, 2))
    best = set_similarity(query, scenes, mode="best_match")
    assert best[0].tolist() == pytest.approx([1.0, hub[0].item()])
    mutual = set_similarity(query, scenes, mode="mutual")
    assert mutual[0].tolist() == pytest.approx([1.0, 0.5 * hub[0].item()])
    # chamfer is symmetric: B's e3 matches nothing in the query (cosine 0)
    chamfer = set_similarity(query, scenes, mode="chamfer")
    assert chamfer[0, 1].item() == pytest.approx(0.5 * (hub[0].item() + 0.5 * hub[0].item()))
    # weights: a query key point of weight 0 does not count
    half = set_similarity(
        KeypointSet(e[None, :2], torch.tensor([[1.0, 0.0]])), KeypointSet(e[None, 1:2], torch.ones(1, 1))
    )
    assert half.item() == pytest.approx(0.0, abs=1e-6)
    # an empty scene scores 0
    empty = set_similarity(query, KeypointSet(e[None, :2], torch.zeros(1, 2)))
    assert empty.item() == 0.0


def test_keypoint_set_from_selection_weights_by_sigmoid_scores():
    desc = torch.randn(1, 3, 4)
    ks = KeypointSet.from_keypoints(
        desc, torch.tensor([[True, True, False]]), torch.tensor([[0.0, 2.0, float("-inf")]])
    )
    assert ks.weights[0].tolist() == pytest.approx([0.5, torch.sigmoid(torch.tensor(2.0)).item(), 0.0])
    assert len(ks) == 1
    with pytest.raises(ValueError, match="descriptor sizes"):
        set_similarity(ks, KeypointSet(torch.randn(1, 3, 5), torch.ones(1, 3)))
