"""Probe building blocks: the kNN vote and the feature bank of the online probes."""

from __future__ import annotations

import torch

from selfsup3d.eval.probes import FeatureBank, knn_predict


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
