"""2D->3D scene retrieval and duplicate-scene detection over a held-out set of multi-view shards, with any
model that summarises scenes and images as key-point sets (the feature-consensus objective does; ``selfsup3d
retrieve`` loads one from a checkpoint).

Every held-out scene (all of ``urls``, read once in order) is summarised as in
:class:`~selfsup3d.metrics.keypoint_retrieval.RetrievalProtocol`: view 0's 2D key points are the query, the 3D key
points of its other views the scene's entry in the database; two disjoint halves of those views give the
duplicate pairs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from tqdm import tqdm

from selfsup3d.datamodules import MultiViewShards
from selfsup3d.encoders.base import Encoder
from selfsup3d.metrics.keypoint_retrieval import RetrievalProtocol, SetSimilarity, SparseSummaries


def held_out_retrieval(
    summaries: Mapping[str, SparseSummaries],
    encoder: Encoder,
    urls: str,
    views: int = 8,
    batch_size: int = 8,
    image_size: int = 64,
    progress: bool = True,
    mode: SetSimilarity = "best_match",
) -> dict[str, dict[str, float]]:
    """The retrieval and duplicate figures of each of ``summaries`` (by name) on the scenes of ``urls``.

    Args:
        summaries: what summarises the scenes, by name (e.g. the consensus objectives of a run).
        encoder: the encoder they read.
        urls: held-out multi-view shards with depth and cameras.
        views: views per scene: 1 query + the rest.
        batch_size: scenes per batch.
        image_size: the image size the views are read at.
        progress: show a progress bar.
        mode: how key-point sets compare (:func:`~selfsup3d.metrics.keypoint_retrieval.set_similarity`).
    """
    data = MultiViewShards(urls, urls, batch_size=batch_size, num_workers=0, image_size=image_size, num_views=views,
                           num_context_views=1, with_depth=True, with_masks=None)  # fmt: skip
    data.setup("validate")
    protocols = {name: RetrievalProtocol(mode) for name in summaries}
    with torch.no_grad():
        for batch in tqdm(data.val_dataloader(), desc="scenes", unit="batch", disable=not progress):
            batch = data.prepare_batch(batch, train=False)
            for name, summary in summaries.items():
                protocols[name].add(summary, batch, encoder)
    return {name: protocol.compute() for name, protocol in protocols.items()}
