"""What a datamodule delivers, said once: the one documented path from the data to the objectives.

Every selfsup3d datamodule describes its batches with :class:`DataSpec` (``data_specs()``, one per named
source). At start-up (``setup``) the objective reads them and checks that it can train on them
(``PretrainObjective.check_data``), naming the keys to change, instead of reaching into the datamodule's
attributes. A multi-view source can feed a single-view objective: :meth:`DataSpec.as_images` is the spec of
its views delivered as single images (:func:`selfsup3d.datamodules.views.views_as_images`).

Kinds of batches (``docs/shard-format.md``, "Datamodules and their batches"):

* ``multi_view``: ``images [B, V, 3, H, W]``, ``K``, ``c2w``, optional ``depth``/``mask``, ``num_context``;
* ``single_view``: ``image [B, 3, H, W]``, optional ``depth``/``mask``.

Both carry ``label [B]`` (-1 unknown) and ``key``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from lightning.pytorch import LightningDataModule

BatchKind = Literal["multi_view", "single_view"]


@dataclass(frozen=True)
class DataSpec:
    """The batches of one data source.

    Attributes:
        kind: ``multi_view`` or ``single_view`` (see the module docstring).
        image_hw: ``(height, width)`` of the delivered images.
        num_views: views per scene (``multi_view``).
        num_context_views: context views, the first ``num_context_views`` of each scene (``multi_view``).
        num_classes: classes of ``label`` when known (the data's ``info.json``), else ``None``.
        with_depth: batches carry ``depth``.
        with_masks: batches carry ``mask``.
        has_cameras: batches carry ``K`` and ``c2w``.
        key_prefix: where this source is configured, for messages (``data.init_args`` or
            ``data.init_args.sources.<name>.init_args``).
    """

    kind: BatchKind
    image_hw: tuple[int, int]
    num_views: int | None = None
    num_context_views: int | None = None
    num_classes: int | None = None
    with_depth: bool = False
    with_masks: bool = False
    has_cameras: bool = False
    key_prefix: str = "data.init_args"

    def key(self, name: str) -> str:
        """The YAML key of this source's argument ``name``."""
        return f"{self.key_prefix}.{name}"

    def as_images(self) -> DataSpec:
        """The spec of this multi-view source's views delivered as single images."""
        if self.kind == "single_view":
            return self
        return replace(self, kind="single_view", num_views=None, num_context_views=None, has_cameras=False)


def data_specs(datamodule: LightningDataModule | None) -> dict[str, DataSpec]:
    """The named sources of ``datamodule`` (empty for a datamodule that does not describe itself)."""
    describe = getattr(datamodule, "data_specs", None)
    return dict(describe()) if callable(describe) else {}
