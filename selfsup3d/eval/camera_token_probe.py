"""RayZer's pose probe: relative camera pose read from frozen camera tokens by a small MLP.

RayZer (Jiang et al. 2025) measures its self-supervised cameras not by aligning them to the truth but with a
2-layer MLP trained on the frozen camera tokens of a probe split, which predicts the relative pose of two
views; it reports R@10° (share of view pairs whose relative-rotation error is below 10°) and a translation
accuracy (RE10K: R@10° 99.6%, t@0.3 92.8%). Reimplemented from that description:

* input of a pair ``(i, j)``: the two views' camera tokens ``[t_i ‖ t_j]``, each channel standardised with
  probe-split statistics;
* target: camera ``j`` in camera ``i``'s frame, ``c2w_i^-1 c2w_j``: its rotation (predicted as 6D) and its
  translation *direction* (the scene scale is unknown to a self-supervised model);
* ``R@10``: share of pairs with a rotation error below 10°; ``t@0.3``: share of pairs whose predicted and true
  unit translations are closer than 0.3 (our reading of RayZer's ``t@0.3``: a chord of 0.3 is an angle of
  about 17.3°; the paper's exact definition was not available);
* chance: the same figures for the best constant answer (:func:`~selfsup3d.eval.feature_pose_probe.prior_pose`).

:func:`fit_camera_probe` is the whole protocol as one pure function on tensors; the ``CameraTokenProbe``
callback (``selfsup3d.callbacks``) runs it on a masked-view model's camera tokens at every validation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup3d.eval.dense import Standardize
from selfsup3d.eval.feature_pose_probe import pose_errors, pose_loss, prior_pose, relative_pose_targets
from selfsup3d.eval.fitting import fit_head
from selfsup3d.geometry.cameras import rotation_6d_to_matrix
from selfsup3d.metrics.pose import pair_indices

ROT_THRESHOLD_DEG = 10.0
TRANS_THRESHOLD = 0.3


class CameraTokenHead(nn.Module):
    """A 2-layer MLP from a pair of standardised camera tokens to a 6D rotation and a translation direction.

    Args:
        norm: per-channel standardisation of a token (fitted on the probe split).
        dim: token width ``D``.
        hidden: hidden width.
    """

    def __init__(self, norm: Standardize, dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = norm
        self.mlp = nn.Sequential(nn.Linear(2 * dim, hidden), nn.GELU(), nn.Linear(hidden, 9))
        with torch.no_grad():  # start at the identity rotation
            self.mlp[-1].weight.mul_(0.01)
            self.mlp[-1].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 1]))

    def forward(self, first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        """``(rotation [P, 3, 3], unit direction [P, 3])`` of the second view in the first's frame."""
        out = self.mlp(torch.cat([self.norm(first.float()), self.norm(second.float())], dim=-1))
        return rotation_6d_to_matrix(out[:, :6]), F.normalize(out[:, 6:], dim=-1)


def token_pairs(tokens: Tensor, c2w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """All pairs ``i < j`` of every scene: tokens ``[P, D]`` of ``i`` and ``j``, target rotations ``[P, 3, 3]`` and
    unit directions ``[P, 3]``, from ``tokens [N, V, D]`` and true cameras ``[N, V, 4, 4]``."""
    i, j = pair_indices(tokens.shape[1], tokens.device)
    rot, direction = relative_pose_targets(c2w[:, i].flatten(0, 1), c2w[:, j].flatten(0, 1))
    return tokens[:, i].flatten(0, 1), tokens[:, j].flatten(0, 1), rot, direction


def probe_figures(rot_pred: Tensor, dir_pred: Tensor, rot_true: Tensor, dir_true: Tensor) -> dict[str, float]:
    """``r10`` (share of rotation errors below 10°), ``t03`` (share of unit-translation distances below 0.3),
    and the median rotation and translation-direction errors in degrees."""
    rot_err, trans_err = pose_errors(rot_pred, dir_pred, rot_true, dir_true)
    chord = (F.normalize(dir_pred.float(), dim=-1) - F.normalize(dir_true.float(), dim=-1)).norm(dim=-1)
    return {
        "r10": float((rot_err < ROT_THRESHOLD_DEG).float().mean()),
        "t03": float((chord < TRANS_THRESHOLD).float().mean()),
        "rot_err": float(rot_err.median()),
        "trans_err": float(trans_err.median()),
    }


@dataclass
class CameraProbeResult:
    """Figures of the probe on the held-out pairs (``probe``) beside the constant answer's (``chance``)."""

    probe: dict[str, float]
    chance: dict[str, float]
    train_pairs: int
    test_pairs: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Flat figures: ``{prefix}r10``, ``{prefix}t03``, ..., ``{prefix}r10_chance``, ..."""
        out = {f"{prefix}{k}": v for k, v in self.probe.items()}
        out.update({f"{prefix}{k}_chance": v for k, v in self.chance.items()})
        return out


def fit_camera_probe(
    train_tokens: Tensor,
    train_c2w: Tensor,
    test_tokens: Tensor,
    test_c2w: Tensor,
    steps: int = 600,
    lr: float = 3e-3,
    hidden: int = 256,
    batch_pairs: int = 1024,
    seed: int = 0,
) -> CameraProbeResult:
    """Train the probe on the probe split's pairs and evaluate it on held-out scenes' pairs.

    Args:
        train_tokens: ``[N, V, D]`` frozen camera tokens of the probe-split scenes.
        train_c2w: ``[N, V, 4, 4]`` their true cameras (the probe's labels; never seen by the model).
        test_tokens: ``[M, V', D]`` camera tokens of held-out scenes.
        test_c2w: ``[M, V', 4, 4]`` their true cameras.
        steps: AdamW steps (:func:`~selfsup3d.eval.fitting.fit_head`: cosine-decayed learning rate).
        lr: peak learning rate.
        hidden: the MLP's hidden width.
        batch_pairs: pairs per step.
        seed: seed of the head's initialisation and of the pair batches.
    """
    if train_tokens.ndim != 3 or train_tokens.shape[:2] != train_c2w.shape[:2]:
        raise ValueError(f"tokens [N, V, D] and cameras [N, V, 4, 4] must match: {tuple(train_tokens.shape)}")
    if test_tokens.shape[:2] != test_c2w.shape[:2] or test_tokens.shape[-1] != train_tokens.shape[-1]:
        raise ValueError(f"test tokens {tuple(test_tokens.shape)} do not match the probe split's")
    # a validation loop may run under inference mode, which enable_grad alone does not lift
    with torch.inference_mode(False):
        a, b, rot, direction = (x.detach().float().cpu().clone() for x in token_pairs(train_tokens, train_c2w))
        ta, tb, trot, tdir = (x.detach().float().cpu().clone() for x in token_pairs(test_tokens, test_c2w))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = CameraTokenHead(
                Standardize.fit(train_tokens.detach().float().cpu().clone().flatten(0, 1)), a.shape[-1], hidden
            )

        def loss_fn(model: CameraTokenHead, first: Tensor, second: Tensor, r: Tensor, d: Tensor) -> Tensor:
            return pose_loss(*model(first, second), r, d)

        fit_head(head, loss_fn, [a, b, rot, direction], steps, batch_pairs, lr=lr, seed=seed)
        with torch.no_grad():
            probe = probe_figures(*head(ta, tb), trot, tdir)
        prior_rot, prior_dir = prior_pose(rot, direction)
        chance = probe_figures(prior_rot.expand_as(trot), prior_dir.expand_as(tdir), trot, tdir)
        return CameraProbeResult(probe, chance, int(a.shape[0]), int(ta.shape[0]))
