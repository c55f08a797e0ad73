"""A VGG19 perceptual loss whose weights come from a local file or a torchvision weights id.

The loss compares the activations of a frozen VGG19 after ReLU ``1_2, 2_2, 3_4, 4_4, 5_4`` (the layers LVSM
and RayZer use); the first ``num_layers`` of those are used and the network is cut after the last one.
Each layer's mean absolute difference is averaged with equal weights.

Weights (nothing is downloaded unless asked for):

* a local file holding a torchvision VGG19 state dict (``vgg19-dcbb9e9d.pth``): keys ``features.N.*``, or
  the feature extractor's own keys ``N.*``; only the layers that are used need to be present;
* a torchvision weights id such as ``VGG19_Weights.IMAGENET1K_V1``: read from torch hub's cache, downloaded
  there when the network allows.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models import get_weight
from torchvision.models.vgg import cfgs, make_layers

from selfsup3d.errors import CheckpointMismatchError, ConfigError, require

# Index in vgg19.features of the ReLU after conv1_2, conv2_2, conv3_4, conv4_4, conv5_4.
VGG19_LAYERS = (3, 8, 17, 26, 35)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg19_features(num_modules: int) -> nn.Sequential:
    """The first ``num_modules`` modules of torchvision's ``vgg19().features`` (randomly initialised), built
    without the rest of the network."""
    cfg: list[int | str] = []
    count = 0
    for entry in cfgs["E"]:
        if count >= num_modules:
            break
        cfg.append(entry)
        count += 1 if entry == "M" else 2
    return make_layers(cfg)[:num_modules]


def load_vgg19_features(source: str, num_layers: int = 5) -> nn.Sequential:
    """VGG19's feature extractor up to the ``num_layers``-th perceptual layer, with weights from ``source``.

    Args:
        source: a local state-dict file or a torchvision weights id (see the module docstring).
        num_layers: how many of the five perceptual layers the network must reach (1 to 5).
    """
    require(1 <= num_layers <= len(VGG19_LAYERS), "perceptual num_layers", f"in [1, {len(VGG19_LAYERS)}]", num_layers)
    features = vgg19_features(VGG19_LAYERS[num_layers - 1] + 1)
    path = Path(source).expanduser()
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    elif "." in source and not path.suffix:
        try:
            weights = get_weight(source)
        except (ValueError, KeyError) as err:
            raise ConfigError(f"perceptual weights {source!r} is neither a file nor a torchvision weights id") from err
        try:
            state = weights.get_state_dict(progress=False)
        except OSError as err:
            raise RuntimeError(
                f"could not fetch {source} ({err}); without network access download {weights.url} elsewhere and "
                "pass its local path as perceptual_weights"
            ) from err
    else:
        raise FileNotFoundError(f"perceptual weights file not found: {source}")
    state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
    wanted = features.state_dict()
    missing = sorted(set(wanted) - set(state))
    mis_shaped = sorted(k for k in wanted if k in state and state[k].shape != wanted[k].shape)
    if missing or mis_shaped:
        raise CheckpointMismatchError(
            f"perceptual weights {source} do not fit VGG19 up to layer {num_layers}: "
            f"missing {missing}, mis-shaped {mis_shaped}"
        )
    features.load_state_dict({k: state[k] for k in wanted})
    return features.requires_grad_(False).eval()


class PerceptualLoss(nn.Module):
    """Mean over VGG19 layers of the mean absolute feature difference between two image batches.

    The VGG weights are kept out of ``state_dict`` (they are a fixed, external asset, not part of the
    model), and the network stays frozen and in eval mode.

    Args:
        weights: a local VGG19 state-dict file or a torchvision weights id.
        num_layers: how many of the five perceptual layers to compare (1 to 5).
    """

    def __init__(self, weights: str, num_layers: int = 5) -> None:
        super().__init__()
        # a list hides the network from state_dict, parameters() and the optimiser
        self._net = [load_vgg19_features(weights, num_layers)]
        self.taps = set(VGG19_LAYERS[:num_layers])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def net(self) -> nn.Sequential:
        return self._net[0]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # follow .to(device/dtype) of the owning module although the network is not registered
        self._net[0] = self._net[0]._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.net.eval()
        return self

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Loss between ``[N, 3, H, W]`` images in ``[0, 1]`` (a 0-dim tensor)."""
        x = torch.cat([pred, target]).sub(self.mean.to(pred.dtype)).div(self.std.to(pred.dtype))
        loss = pred.new_zeros((), dtype=torch.float32)
        n = pred.shape[0]
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in self.taps:
                loss = loss + F.l1_loss(x[:n].float(), x[n:].float())
        return loss / len(self.taps)
