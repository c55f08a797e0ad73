"""Training a probe head on cached frozen features: seeded minibatches, AdamW, cosine learning-rate decay.

The features are tensors held in memory (extracted once per encoder), so a head trains in seconds; the
minibatch order comes from its own generator, so the same call gives the same head.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn


def fit_head(
    head: nn.Module,
    loss_fn: Callable[..., Tensor],
    data: Sequence[Tensor],
    steps: int,
    batch_size: int,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Train ``head`` for ``steps`` AdamW steps on random minibatches of ``data``.

    Args:
        head: the module to train (left in eval mode).
        loss_fn: ``loss_fn(head, *minibatch) -> scalar`` where ``minibatch`` holds the same rows of each
            tensor in ``data``.
        data: tensors with the same first dimension (rows are drawn with replacement).
        steps: optimiser steps (0 leaves the head as it is).
        batch_size: rows per step (all rows when there are fewer).
        lr: peak learning rate (cosine decay to a tenth of it).
        weight_decay: AdamW weight decay.
        seed: seed of the minibatch draws.

    Returns:
        the mean loss of the last tenth of the steps (NaN for ``steps=0``).
    """
    n = int(data[0].shape[0])
    if n == 0:
        raise ValueError("a probe head needs at least one training row")
    if any(int(d.shape[0]) != n for d in data):
        raise ValueError(f"probe data must share their first dimension, got {[tuple(d.shape) for d in data]}")
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))
    )
    g = torch.Generator().manual_seed(seed)
    device = data[0].device
    tail: list[float] = []
    head.train()
    with torch.enable_grad():
        for step in range(steps):
            if batch_size >= n:
                index = torch.randperm(n, generator=g)
            else:
                index = torch.randint(n, (batch_size,), generator=g)
            batch = [d[index.to(device)] for d in data]
            loss = loss_fn(head, *batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step >= steps - max(1, steps // 10):
                tail.append(float(loss.detach()))
    head.eval()
    return sum(tail) / len(tail) if tail else float("nan")
