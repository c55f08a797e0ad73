"""``selfsup3d retrieve``: 2D->3D scene retrieval and duplicate-scene detection with a consensus model's key points.

::

    selfsup3d retrieve runs/demo_consensus/lightning_logs/version_0/checkpoints/last.ckpt \\
        --data 'data/embedded/val-*.tar' [--views 8] [--out retrieval.json]

Every held-out scene (all of ``--data``, read once in order) is summarised as in
:class:`~selfsup3d.metrics.keypoint_retrieval.RetrievalProtocol`: view 0's 2D key points are the query, the 3D key
points of its other views the scene's entry in the database; two disjoint halves of those views give the
duplicate pairs. Printed: top-1 and top-5 retrieval over all scenes beside chance (1 / scenes), and the ROC
AUC of duplicate detection (0.5 is chance). The checkpoint is a ``FeatureConsensus`` run or a multi-task run
with one (each consensus objective is reported).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from selfsup3d.eval.held_out_retrieval import held_out_retrieval
from selfsup3d.metrics.keypoint_retrieval import SetSimilarity
from selfsup3d.objectives import FeatureConsensus
from selfsup3d.objectives.base import load_objective


def retrieve(checkpoint: str | Path, urls: str, views: int = 8, batch_size: int = 8, image_size: int | None = None,
             progress: bool = True, mode: SetSimilarity = "best_match") -> dict[str, dict[str, float]]:  # fmt: skip
    """The retrieval and duplicate figures of every consensus objective of ``checkpoint`` on the scenes of ``urls``
    (:func:`~selfsup3d.eval.held_out_retrieval.held_out_retrieval`)."""
    model = load_objective(checkpoint).eval()
    components = {name or "consensus": c for name, c in model.components() if isinstance(c, FeatureConsensus)}
    if not components:
        raise ValueError(f"{checkpoint} holds no FeatureConsensus objective")
    size = image_size or int(model.encoder.config.get("img_size", 64))
    return held_out_retrieval(components, model.encoder, urls, views, batch_size, size, progress, mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfsup3d retrieve", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a checkpoint of a FeatureConsensus run (or a multi-task run with one)")
    parser.add_argument(
        "--data", required=True, help="held-out multi-view shards with depth, e.g. 'data/embedded/val-*.tar'"
    )
    parser.add_argument(
        "--views", type=int, default=8, help="views per scene: 1 query + the rest (default %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="scenes per batch (default %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="image size (default: the encoder's img_size)")
    parser.add_argument(
        "--mode",
        choices=list(get_args(SetSimilarity)),
        default="best_match",
        help="how key-point sets compare (selfsup3d.metrics.keypoint_retrieval.set_similarity; default %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.views < 3:
        parser.error("--views must be at least 3 (a query view and two halves of the others)")
    try:
        results = retrieve(args.checkpoint, args.data, args.views, args.batch_size, args.image_size, mode=args.mode)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    for name, m in results.items():
        print(f"{name}: {int(m['scenes'])} held-out scenes, 1 query view + {args.views - 1} views in the database "
              f"({args.mode})")  # fmt: skip
        print(f"  2D->3D retrieval: top-1 {m['retrieval_top1']:.3f}, top-5 {m['retrieval_top5']:.3f} "
              f"(chance {m['retrieval_chance']:.3f})")  # fmt: skip
        if "duplicate_auc" in m:
            print(f"  duplicate-scene detection (disjoint halves of the other views): ROC AUC {m['duplicate_auc']:.3f}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0
