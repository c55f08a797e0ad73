"""Can the reprojection loss alone find the cameras? Free per-view poses and per-pixel depths (no network) are
fitted to held-out orbit scenes by the auto-masked minimum reprojection loss (:mod:`selfsup3d.losses.reprojection`),
from the canonical pose and a flat depth, and the fitted cameras are scored like the model's (aligned relative
rotation error, translation-direction error, AUC@30). It measures the loss's landscape at the demo's
resolution, separately from whether a network can learn to predict its minimum.

    python bench/reprojection_fit.py                       # 16 px, windows of 8 views, true focal
    python bench/reprojection_fit.py --size 32 --steps 400 --true-depth

Cameras and depth are only the loss's variables here; the scenes' true cameras are read for scoring (and
for the focal length, and the depth with ``--true-depth``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from selfsup3d.datamodules import MultiViewShards
from selfsup3d.geometry.cameras import make_se3, rotation_6d_to_matrix
from selfsup3d.losses.reprojection import min_reprojection_loss
from selfsup3d.metrics.pose import camera_metrics, relative_rotation_error

IDENTITY_6D = torch.tensor([1.0, 0, 0, 0, 1.0, 0])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="data/orbit/val-*.tar", help="orbit shards (held-out objects)")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--window", type=int, default=8, help="consecutive views the views come from")
    parser.add_argument("--scenes", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--true-depth", action="store_true", help="fix depth to the data's (background far)")
    parser.add_argument("--no-auto-mask", action="store_true", help="count every pixel that lands in a source")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(0)
    dm = MultiViewShards(args.data, args.data, batch_size=args.scenes, num_workers=0, image_size=args.size,
                         num_views=args.views, num_context_views=args.views - 1, view_window=(args.window, args.window),
                         canonical_view="middle", with_depth=args.true_depth, val_batches=1)  # fmt: skip
    dm.setup("validate")
    batch = dm.prepare_batch(next(iter(dm.val_dataloader())), train=False)
    images, K, gt = batch["images"], batch["K"], batch["c2w"]
    b, v = images.shape[:2]
    rot = torch.zeros(b, v - 1, 6, requires_grad=True)
    trans = torch.zeros(b, v - 1, 3, requires_grad=True)
    params = [rot, trans]
    if args.true_depth:
        depth = batch["depth"]
        far = depth.amax(dim=(-1, -2, -3), keepdim=True) * 3
        depth = torch.where(depth > 0, depth, far)
        scale = depth[depth > 0].median()
    else:
        log_depth = torch.zeros(b, v, 1, args.size, args.size, requires_grad=True)
        params.append(log_depth)

    def cameras() -> torch.Tensor:
        c2w = make_se3(rotation_6d_to_matrix(IDENTITY_6D + rot), trans)
        return torch.cat([torch.eye(4).expand(b, 1, 4, 4), c2w], dim=1)

    if args.true_depth:  # the loss at the true cameras (relative to the canonical view), for reference
        rel = torch.linalg.inv(gt[:, :1]) @ gt
        at_truth = min_reprojection_loss(images, depth, K, rel, auto_mask=not args.no_auto_mask)["loss"]
        print(f"loss at the true cameras and depth: {at_truth:.4f}")
    optimiser = torch.optim.Adam(params, lr=args.lr)
    still = relative_rotation_error(torch.eye(4).expand_as(gt), gt).mean()
    print(f"{b} scenes x {v} views at {args.size}px from windows of {args.window}; cameras that never turn: "
          f"rotation error {still:.1f} deg")  # fmt: skip
    start = time.perf_counter()
    for step in range(args.steps + 1):
        c2w = cameras()
        if args.true_depth:
            c2w = torch.cat([c2w[..., :3, :3], c2w[..., :3, 3:] * scale], dim=-1)
            c2w = torch.cat([c2w, gt[..., 3:, :]], dim=-2)
            d = depth
        else:
            d = torch.exp(log_depth.clamp(-3, 3))
        out = min_reprojection_loss(images, d, K, c2w, auto_mask=not args.no_auto_mask)
        if step % max(1, args.steps // 6) == 0:
            metrics, _ = camera_metrics(c2w.detach(), gt)
            print(f"step {step:4d}  loss {out['loss']:.4f}  used {out['used']:.2f}  rot err {metrics['rot_err']:.1f}  "
                  f"t err {metrics['trans_err']:.1f}  AUC@30 {metrics['auc30']:.3f}")  # fmt: skip
        optimiser.zero_grad()
        out["loss"].backward()
        optimiser.step()
    print(f"{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
