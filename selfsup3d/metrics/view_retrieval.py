"""Scene retrieval from frozen global features: does an encoder recognise the same scene from another view?

Every test view is a query in turn; the database is every other test view (the query's own scene's
remaining views and all other scenes' views). A query is right when its cosine nearest neighbour belongs
to its scene (top-1). Chance: ``(V - 1) / (N - 1)`` for ``N`` views of which ``V`` per scene.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def retrieval_hits(features: Tensor, scene: Tensor) -> Tensor:
    """Top-1 scene retrieval of each view against all other views.

    Args:
        features: ``[N, G]`` global features.
        scene: ``[N]`` scene index of each view.

    Returns:
        ``[N]`` booleans: the nearest other view (cosine; ties go to the lower index) is of the same scene.
    """
    if features.shape[0] < 2:
        raise ValueError("scene retrieval needs at least two views")
    x = F.normalize(features.float(), dim=-1)
    sim = x @ x.T
    sim.fill_diagonal_(float("-inf"))
    nearest = sim.argmax(dim=1)
    return scene[nearest] == scene


def retrieval_chance(scene: Tensor) -> float:
    """The top-1 accuracy of a uniformly random other view: mean over queries of ``(same-scene others) / (N - 1)``."""
    n = scene.numel()
    same = (scene[:, None] == scene[None]).sum(1) - 1
    return float(same.double().sum() / (n * (n - 1)))
