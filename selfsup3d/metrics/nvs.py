"""Novel-view synthesis metrics and the two baselines a renderer must beat, as pure functions.

Images are ``[..., 3, H, W]`` in ``[0, 1]``; metrics are per image (``[...]``), averaged by the caller, as
LVSM and RayZer report them (mean of per-image PSNR).

Baselines, computed on the same target views as the model:

* **mean colour**: every target pixel gets the mean colour of the context views of its scene (what a
  model that learned nothing about the scene's layout can do);
* **nearest view**: each target is predicted by the context view whose *true* camera is closest (see
  :func:`camera_distance`): copying the most similar input, a strong baseline when views are dense;
* **context mean**: the per-pixel mean of the context views: a blurry but well-placed guess when the views
  look at the same object from around it (and where a model with ``blend_context`` starts from).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from selfsup3d.geometry.cameras import rotation_angle

MAX_PSNR = 100.0
"""PSNR of identical images is infinite; it is reported as this many dB so that means stay finite."""


def _flat(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    if pred.shape != target.shape or pred.ndim < 4 or pred.shape[-3] not in (1, 3):
        raise ValueError(f"need matching [..., C, H, W] images, got {tuple(pred.shape)} and {tuple(target.shape)}")
    lead = tuple(pred.shape[:-3])
    return pred.float().flatten(0, -4), target.float().flatten(0, -4), lead


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Peak signal-to-noise ratio in dB of each image: ``[..., C, H, W] -> [...]`` (capped at ``MAX_PSNR``).

    Args:
        pred: predicted images.
        target: true images, same shape.
        data_range: the value range of the images (1 for ``[0, 1]``).
    """
    p, t, lead = _flat(pred, target)
    out = peak_signal_noise_ratio(p, t, data_range=data_range, reduction="none", dim=(1, 2, 3))
    return out.clamp(max=MAX_PSNR).reshape(lead)


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0) -> Tensor:
    """Structural similarity (Gaussian window 11, σ 1.5) of each image: ``[..., C, H, W] -> [...]``.

    Args:
        pred: predicted images.
        target: true images, same shape.
        data_range: the value range of the images (1 for ``[0, 1]``).
    """
    p, t, lead = _flat(pred, target)
    kernel = min(11, p.shape[-1], p.shape[-2])
    kernel -= 1 - kernel % 2  # odd
    out = structural_similarity_index_measure(p, t, data_range=data_range, reduction="none", kernel_size=kernel)
    return out.reshape(lead)


def mean_colour_baseline(context: Tensor, num_targets: int) -> Tensor:
    """The mean colour of each scene's context views, as ``num_targets`` constant images.

    Args:
        context: ``[B, Va, 3, H, W]`` context views.
        num_targets: how many target images to return per scene.

    Returns:
        ``[B, num_targets, 3, H, W]``.
    """
    b, _, c, h, w = context.shape
    colour = context.float().mean(dim=(1, 3, 4))  # [B, 3]
    return colour[:, None, :, None, None].expand(b, num_targets, c, h, w)


def context_mean_baseline(context: Tensor, num_targets: int) -> Tensor:
    """The per-pixel mean of each scene's context views, as ``num_targets`` images.

    Args:
        context: ``[B, Va, 3, H, W]`` context views.
        num_targets: how many target images to return per scene.

    Returns:
        ``[B, num_targets, 3, H, W]``.
    """
    mean = context.float().mean(dim=1, keepdim=True)
    return mean.expand(-1, num_targets, -1, -1, -1)


def camera_distance(c2w_a: Tensor, c2w_b: Tensor, scale: Tensor | float = 1.0) -> Tensor:
    """How far apart two cameras are: the angle between their orientations (radians) plus the distance
    between their centres divided by ``scale``. Broadcasts over leading dimensions.

    Args:
        c2w_a: ``[..., 4, 4]`` cameras.
        c2w_b: ``[..., 4, 4]`` cameras.
        scale: the scene's length scale (e.g. the spread of its cameras), broadcastable to ``[...]``.
    """
    angle = rotation_angle(c2w_a[..., :3, :3].transpose(-1, -2) @ c2w_b[..., :3, :3])
    dist = (c2w_a[..., :3, 3] - c2w_b[..., :3, 3]).norm(dim=-1)
    return angle + dist / torch.as_tensor(scale, dtype=dist.dtype, device=dist.device).clamp(min=1e-9)


def nearest_view_index(context_c2w: Tensor, target_c2w: Tensor) -> Tensor:
    """For each target camera, the index of the closest context camera (:func:`camera_distance`, with the
    scene's scale the RMS distance of all its cameras from their mean).

    Args:
        context_c2w: ``[B, Va, 4, 4]``.
        target_c2w: ``[B, Vb, 4, 4]``.

    Returns:
        ``[B, Vb]`` indices into the context views.
    """
    centres = torch.cat([context_c2w, target_c2w], dim=1)[..., :3, 3]
    scale = (centres - centres.mean(1, keepdim=True)).square().sum(-1).mean(-1).sqrt()  # [B]
    dist = camera_distance(target_c2w[:, :, None], context_c2w[:, None, :], scale[:, None, None])  # [B, Vb, Va]
    return dist.argmin(-1)


def nearest_view_baseline(context: Tensor, context_c2w: Tensor, target_c2w: Tensor) -> Tensor:
    """Each target predicted by its nearest context view by true camera (:func:`nearest_view_index`).

    Args:
        context: ``[B, Va, 3, H, W]`` context views.
        context_c2w: ``[B, Va, 4, 4]`` their true cameras.
        target_c2w: ``[B, Vb, 4, 4]`` the targets' true cameras.

    Returns:
        ``[B, Vb, 3, H, W]``.
    """
    idx = nearest_view_index(context_c2w, target_c2w)
    return torch.gather(context, 1, idx[:, :, None, None, None].expand(-1, -1, *context.shape[2:]))
