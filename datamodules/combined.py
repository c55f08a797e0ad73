"""``CombinedShards``: named data sources for several objectives, through Lightning's ``CombinedLoader``.

Each source is a datamodule of its own (``MultiViewShards``, ``SingleViewShards``, or any other), configured
under ``data.init_args.sources.<name>``; a :class:`~selfsup3d.objectives.MultiTask` objective names the
source it reads (``model.init_args.sources``). Ranks and workers split each source as they do alone, and
validation stays equal across ranks (each source's pass is).

Batches reach the model as ``{source name: that source's batch}``:

* training: one batch of every source per step, combined by ``mode``: ``max_size_cycle`` (the default: an
  epoch lasts as long as the longest source, shorter ones start again), ``min_size`` (as long as the
  shortest), ``max_size`` (as long as the longest, exhausted sources give ``None``: their objectives sit
  that step out). The shard datamodules stream endlessly with ``batches_per_epoch`` batches per epoch, so
  with equal ``batches_per_epoch`` every mode gives every source every step;
* validation: the sources one after the other (``sequential``), each batch as ``{its source: batch}``.

In YAML::

    data:
      class_path: selfsup3d.datamodules.CombinedShards
      init_args:
        mode: max_size_cycle
        sources:
          scenes: {class_path: selfsup3d.datamodules.MultiViewShards, init_args: {...}}
          images: {class_path: selfsup3d.datamodules.SingleViewShards, init_args: {...}}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import CombinedLoader

from selfsup3d.datamodules.spec import DataSpec, data_specs
from selfsup3d.errors import ConfigError, config_prefix, current_prefix, require

TrainMode = Literal["max_size_cycle", "min_size", "max_size"]


class CombinedShards(LightningDataModule):
    """Several named datamodules, one batch of each per training step (see the module docstring).

    Args:
        sources: the data sources by name, each a datamodule (``class_path`` + ``init_args``).
        mode: how training batches of sources of different lengths combine: ``max_size_cycle``, ``min_size``
            or ``max_size`` (Lightning's ``CombinedLoader`` modes).
    """

    def __init__(
        self, sources: dict[str, Callable[[], LightningDataModule]], mode: TrainMode = "max_size_cycle"
    ) -> None:
        super().__init__()
        self.key_prefix = current_prefix("data")
        if not sources:
            raise ConfigError(f"{self.key_prefix}.sources is empty: name at least one data source")
        require(
            mode in ("max_size_cycle", "min_size", "max_size"),
            f"{self.key_prefix}.mode",
            "max_size_cycle, min_size or max_size",
            mode,
        )
        self.mode = mode
        self.sources: dict[str, LightningDataModule] = {}
        for name, factory in sources.items():
            with config_prefix(f"{self.key_prefix}.sources.{name}.init_args", "data"):
                self.sources[name] = factory()
        self._val_names: list[str] = []

    def data_specs(self) -> dict[str, DataSpec]:
        """One spec per source, by source name."""
        specs: dict[str, DataSpec] = {}
        for name, source in self.sources.items():
            inner = data_specs(source)
            if len(inner) != 1:
                raise ConfigError(f"{self.key_prefix}.sources.{name} must describe one source, it has {len(inner)}")
            specs[name] = next(iter(inner.values()))
        return specs

    def setup(self, stage: str) -> None:
        for source in self.sources.values():
            source.trainer = self.trainer
            source.setup(stage)

    def teardown(self, stage: str) -> None:
        for source in self.sources.values():
            source.teardown(stage)

    def train_dataloader(self) -> CombinedLoader:
        return CombinedLoader({name: s.train_dataloader() for name, s in self.sources.items()}, self.mode)

    def val_dataloader(self) -> CombinedLoader | list[Any]:
        loaders = {name: s.val_dataloader() for name, s in self.sources.items()}
        loaders = {name: loader for name, loader in loaders.items() if not (isinstance(loader, list) and not loader)}
        self._val_names = list(loaders)
        return CombinedLoader(loaders, "sequential") if loaders else []

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Each source prepares its own batches; validation batches come back as ``{source: batch}``."""
        if self.trainer.training:
            return {
                name: None if part is None else self.sources[name].on_after_batch_transfer(part, 0)
                for name, part in batch.items()
            }
        name = self._val_names[dataloader_idx]
        return {name: self.sources[name].on_after_batch_transfer(batch, 0)}

    def _summed(self, what: str) -> dict[str, int]:
        total: dict[str, int] = {}
        for source in self.sources.values():
            for split, count in getattr(source, what, {}).items():
                total[split] = total.get(split, 0) + count
        return total

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped bad samples per split, summed over the sources (see ``SkippedSamplesLogger``)."""
        return self._summed("skipped")

    @property
    def read(self) -> dict[str, int]:
        """Samples read per split, summed over the sources."""
        return self._summed("read")

    @property
    def distinct(self) -> dict[str, int]:
        """Intact samples per split, summed over the sources (splits some source cannot count left out)."""
        known = [getattr(source, "distinct", {}) for source in self.sources.values()]
        splits = set.intersection(*(set(k) for k in known)) if known else set()
        return {split: sum(k[split] for k in known) for split in splits}
