"""The probes of ``selfsup3d probe``, online: how 3D-aware the encoder is while it pretrains, beside a frozen
reference. Works with any objective and with multi-view batches, single-view batches and dicts of named
batches (multi-task runs); it reads ``pl_module.encoder`` only.

Reference: the objective's ``teacher`` when it has one, otherwise a frozen copy of ``pl_module.encoder``
taken when fitting starts (the starting point; after a resume, the resumed encoder).

A cheap subset of the offline probes (same metric classes, same names, see :mod:`selfsup3d.eval.suite`):

* ``correspondence`` (validation batches with depth and cameras, i.e. multi-view): recall of cosine
  nearest-neighbour matches between views at thresholds relative to the image side, ``corr@0.05`` ...;
* ``depth`` (batches with depth): a per-pixel head trained online on detached features regresses log
  depth over the image's median; ``depth_rmse``, ``depth_absrel``, ``depth_delta1`` (median-aligned);
* ``normals`` (batches with depth and intrinsics): the same for normals of the true depth, ``normal_deg``;
* ``linear`` and ``knn`` (batches with labels >= 0): ``linear_acc``, ``knn_acc``.

Heads train on every ``train_every_n_steps``-th training batch (their own AdamW; the encoder never gets
their gradients) and are evaluated on the validation batches. Sums and the DDP reduction are torchmetrics
``Metric`` states. Logged at the end of each validation epoch as ``val/<prefix>/<source/>metric`` for the
encoder and ``val/<prefix>/<source/>ref_<metric>`` for the reference (``source`` is the name of a batch in
a dict of named batches, ``dataloader<k>`` for the k-th validation loader when there are several, else
nothing), plus a bar chart (encoder vs reference) in TensorBoard (``<prefix>/bars``).

Features are computed with ``torch.no_grad`` and the encoder's current mode; images are resized to the
nearest multiple of each encoder's patch size. Under DDP every rank trains its own heads on its own
batches; the metrics are summed over ranks. Every rank must see every validation source.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric

from selfsup3d.callbacks.base import ValidationCallback
from selfsup3d.callbacks.images import tensorboard
from selfsup3d.datamodules.spec import data_specs
from selfsup3d.encoders.base import Encoder
from selfsup3d.encoders.teacher import FrozenTeacher, make_teacher
from selfsup3d.errors import require
from selfsup3d.eval.correspondence import ROTATION_BINS, THRESHOLDS, CorrespondenceRecall, batch_correspondence
from selfsup3d.eval.dense import (
    DepthMetrics,
    NormalMetrics,
    PixelHead,
    log_depth_loss,
    normal_loss,
    normals_from_depth,
)
from selfsup3d.eval.features import Features, Views, encoder_features, pixel_uv, sample_at
from selfsup3d.eval.probes import FeatureBank, LinearProbe, knn_predict
from selfsup3d.eval.report import bar_chart
from selfsup3d.eval.suite import named_metrics
from selfsup3d.metrics.depth import median_scale
from selfsup3d.objectives.base import PretrainObjective

ONLINE_PROBES: tuple[str, ...] = ("correspondence", "depth", "normals", "linear", "knn")
_ROLES = ("student", "reference")


class _Batch:
    """One batch as flat views: ``views`` (N images), ``num_views`` per scene (1 for single-view), labels."""

    def __init__(self, views: Views, num_views: int, labels: Tensor | None) -> None:
        self.views, self.num_views, self.labels = views, num_views, labels

    @property
    def multiview(self) -> bool:
        v = self.views
        return self.num_views > 1 and v.depth is not None and v.K is not None and v.c2w is not None


def flatten_batch(batch: Any, name: str = "") -> list[tuple[str, _Batch]]:
    """``(source name, views)`` of a multi-view batch (``images [B, V, 3, H, W]`` ...), a single-view batch
    (``image [B, 3, H, W]``, ``depth``, ``label``) or a dict of named batches (recursively); others give
    nothing."""
    if not isinstance(batch, Mapping):
        return []
    images = batch.get("images")
    if isinstance(images, Tensor) and images.ndim == 5:
        b, v = images.shape[:2]

        def flat(key: str) -> Tensor | None:
            t = batch.get(key)
            return t.flatten(0, 1) if isinstance(t, Tensor) and t.shape[:2] == (b, v) else None

        labels = batch.get("label")
        labels = labels.repeat_interleave(v) if isinstance(labels, Tensor) else None
        return [(name, _Batch(Views(images.flatten(0, 1), flat("depth"), flat("K"), flat("c2w")), v, labels))]
    image = batch.get("image")
    if isinstance(image, Tensor) and image.ndim == 4:
        depth, K = batch.get("depth"), batch.get("K")
        labels = batch.get("label")
        views = Views(
            image,
            depth if isinstance(depth, Tensor) else None,
            K if isinstance(K, Tensor) and K.ndim == 3 else None,
        )
        return [(name, _Batch(views, 1, labels if isinstance(labels, Tensor) else None))]
    out: list[tuple[str, _Batch]] = []
    for key, value in batch.items():
        if isinstance(value, Mapping):
            out.extend(flatten_batch(value, f"{name}/{key}" if name else str(key)))
    return out


def _embed_dim(encoder: Encoder | FrozenTeacher) -> int:
    return int(encoder.encoder.embed_dim if isinstance(encoder, FrozenTeacher) else encoder.embed_dim)


class _Heads(nn.Module):
    def __init__(self, dim: int, num_classes: int | None, probes: Sequence[str]) -> None:
        super().__init__()
        self.depth = PixelHead(nn.BatchNorm1d(dim, affine=False), dim, 1) if "depth" in probes else None
        self.normal = PixelHead(nn.BatchNorm1d(dim, affine=False), dim, 3) if "normals" in probes else None
        self.linear = LinearProbe(2 * dim, num_classes) if "linear" in probes and num_classes else None


class _Metrics(nn.Module):
    def __init__(self, thresholds: Sequence[float], bins: Sequence[float]) -> None:
        super().__init__()
        self.corr = CorrespondenceRecall(thresholds, bins)
        self.depth = DepthMetrics()
        self.normal = NormalMetrics()
        self.linear = MeanMetric()
        self.knn = MeanMetric()

    def reset(self) -> None:
        for m in (self.corr, self.depth, self.normal, self.linear, self.knn):
            m.reset()


def _key(source: str, role: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", f"{source or 'all'}__{role}")


class ProbeCallback(ValidationCallback):
    """Online 3D-awareness probes of the encoder beside a frozen reference (see the module docstring).

    Args:
        probes: which probes run, a subset of ``correspondence``, ``depth``, ``normals``, ``linear``, ``knn``.
        num_classes: classes of the labels; ``null`` takes the datamodule's ``num_classes`` when it has one,
            otherwise ``linear`` and ``knn`` are off.
        reference: also probe the frozen reference.
        thresholds: correspondence thresholds, fractions of the image's longer side.
        rotation_bins: edges (degrees) of the relative-rotation bins (logged as ``corr@0.05/rot0-15`` ...).
        num_queries: correspondence queries per pair.
        num_matches: matches kept per pair by the ratio test.
        max_pairs: pairs per scene in validation (the first ones, ``(0, 1), (0, 2), ...``).
        pixels_per_image: pixels per training image for the dense heads.
        max_train_images: images of a training batch the heads see (the first ones).
        train_every_n_steps: train the heads on every n-th training batch.
        lr: learning rate of the heads' AdamW.
        knn_k: neighbours of the kNN vote.
        bank_size: training features kept for the kNN vote.
        prefix: metrics are logged as ``val/<prefix>/...``.
        chart: log the bar chart to TensorBoard.
    """

    def __init__(
        self,
        probes: Sequence[str] = ("correspondence", "depth", "linear", "knn"),
        num_classes: int | None = None,
        reference: bool = True,
        thresholds: Sequence[float] = THRESHOLDS,
        rotation_bins: Sequence[float] = ROTATION_BINS,
        num_queries: int = 256,
        num_matches: int = 128,
        max_pairs: int = 6,
        pixels_per_image: int = 64,
        max_train_images: int = 32,
        train_every_n_steps: int = 1,
        lr: float = 1e-3,
        knn_k: int = 20,
        bank_size: int = 4096,
        prefix: str = "probe3d",
        chart: bool = True,
    ) -> None:
        unknown = set(probes) - set(ONLINE_PROBES)
        if unknown:
            raise ValueError(f"ProbeCallback: unknown probes {sorted(unknown)}; choose from {', '.join(ONLINE_PROBES)}")
        require(train_every_n_steps >= 1, "ProbeCallback: train_every_n_steps", ">= 1", train_every_n_steps, ValueError)
        self.probes = tuple(probes)
        self.num_classes = num_classes
        self.use_reference = reference
        self.thresholds, self.rotation_bins = tuple(thresholds), tuple(rotation_bins)
        self.num_queries, self.num_matches, self.max_pairs = num_queries, num_matches, max_pairs
        self.pixels_per_image, self.max_train_images = pixels_per_image, max_train_images
        self.train_every_n_steps = train_every_n_steps
        self.lr, self.knn_k, self.bank_size = lr, knn_k, bank_size
        self.prefix, self.chart = prefix, chart
        self.heads: nn.ModuleDict | None = None
        self.metrics = nn.ModuleDict()
        self.optimizer: torch.optim.Optimizer | None = None
        self.banks = {role: FeatureBank(bank_size) for role in _ROLES}
        self._reference: FrozenTeacher | None = None
        self._pending: dict[str, Any] | None = None
        self._sources: dict[str, str] = {}
        self.train_steps = 0
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    @property
    def state_key(self) -> str:
        return f"ProbeCallback[{self.prefix}]"

    def reference_encoder(self, pl_module: LightningModule) -> nn.Module | None:
        """The frozen reference: the objective's teacher, or the copy of the encoder made at fit start."""
        if not self.use_reference:
            return None
        teacher = pl_module.frozen_teacher() if isinstance(pl_module, PretrainObjective) else None
        if teacher is not None:
            return teacher
        if self._reference is None:
            self._reference = make_teacher(pl_module.encoder)
        return self._reference.to(pl_module.device)

    def _encoders(self, pl_module: LightningModule) -> dict[str, nn.Module]:
        encoders = {"student": pl_module.encoder}
        reference = self.reference_encoder(pl_module)
        if reference is not None:
            encoders["reference"] = reference
        return encoders

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.num_classes is None:
            known = [spec.num_classes for spec in data_specs(trainer.datamodule).values() if spec.num_classes]
            self.num_classes = known[0] if known else None
        if self.num_classes is None and {"linear", "knn"} & set(self.probes):
            rank_zero_warn("ProbeCallback: no num_classes (argument or the data's info.json); classification off")

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        teacher = pl_module.frozen_teacher() if isinstance(pl_module, PretrainObjective) else None
        if self.use_reference and teacher is None:
            self._reference = make_teacher(pl_module.encoder).to(pl_module.device)
        self._build(pl_module)

    def _build(self, pl_module: LightningModule) -> nn.ModuleDict:
        if self.heads is None:
            encoders = self._encoders(pl_module)
            self.heads = nn.ModuleDict(
                {role: _Heads(_embed_dim(enc), self.num_classes, self.probes) for role, enc in encoders.items()}
            )
            if self._pending is not None:
                self.heads.load_state_dict(self._pending["heads"])
        self.heads.to(pl_module.device)
        if self.optimizer is None:
            params = [p for p in self.heads.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=self.lr) if params else None
            if self.optimizer is not None and self._pending and self._pending.get("optimizer"):
                self.optimizer.load_state_dict(self._pending["optimizer"])
        return self.heads

    def _metrics_for(self, source: str, role: str, device: torch.device) -> _Metrics:
        key = _key(source, role)
        if key not in self.metrics:
            self.metrics[key] = _Metrics(self.thresholds, self.rotation_bins)
            self._sources[key] = source
        return self.metrics[key].to(device)

    # ------------------------------------------------------------------ training
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx % self.train_every_n_steps:
            return
        parts = flatten_batch(batch)
        if not parts:
            return
        heads = self._build(pl_module)
        heads.train()
        g = torch.Generator().manual_seed(int(trainer.global_step))
        losses: list[Tensor] = []
        with torch.enable_grad(), torch.autocast(pl_module.device.type, enabled=False):
            for _, part in parts:
                n = min(part.views.images.shape[0], self.max_train_images)
                views = part.views.select(torch.arange(n, device=part.views.images.device))
                labels = part.labels[:n] if part.labels is not None else None
                draw = self._draw(views, g)
                for role, encoder in self._encoders(pl_module).items():
                    feats = encoder_features(encoder, views.images)
                    losses.extend(self._train_losses(heads[role], feats, views, draw, labels))
                    if "knn" in self.probes and self.num_classes and labels is not None:
                        self.banks[role].add(feats.vector, labels)
            if losses and self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
                torch.stack(losses).sum().backward()
                self.optimizer.step()
                self.train_steps += 1

    def _draw(self, views: Views, g: torch.Generator) -> dict[str, Tensor] | None:
        """Pixels with depth drawn per image, their relative depth and (with intrinsics) normals."""
        if views.depth is None or not ({"depth", "normals"} & set(self.probes)):
            return None
        depth = views.depth.float()
        n, _, h, w = depth.shape
        flat = depth.flatten(1).cpu()
        rows, uvs, rel, normal, nvalid = [], [], [], [], []
        normals, valid_n = normals_from_depth(depth, views.K) if views.K is not None else (None, None)
        for k in range(n):
            valid = (flat[k] > 0).nonzero()[:, 0]
            if valid.numel() < 2:
                continue
            pick = valid[torch.randint(valid.numel(), (self.pixels_per_image,), generator=g)]
            rows.append(torch.full((pick.numel(),), k))
            uvs.append(pixel_uv(pick, w))
            rel.append(flat[k, pick] / flat[k, valid].median())
            if normals is not None and valid_n is not None:
                normal.append(normals[k].flatten(1)[:, pick.to(depth.device)].T.cpu())
                nvalid.append(valid_n[k, 0].flatten()[pick.to(depth.device)].cpu())
        if not rows:
            return None
        out = {"image": torch.cat(rows), "uv": torch.cat(uvs), "rel_depth": torch.cat(rel)}
        if normal:
            out["normal"], out["normal_valid"] = torch.cat(normal), torch.cat(nvalid)
        return {k: v.to(depth.device) for k, v in out.items()}

    def _train_losses(
        self, head: _Heads, feats: Features, views: Views, draw: dict[str, Tensor] | None, labels: Tensor | None
    ) -> list[Tensor]:
        losses = []
        if draw is not None and (head.depth is not None or head.normal is not None):
            per = [
                sample_at(feats.dense[k : k + 1], draw["uv"][draw["image"] == k][None], views.hw)[0]
                for k in range(views.images.shape[0])
            ]
            x = torch.cat(per).detach()
            if head.depth is not None:
                losses.append(log_depth_loss(head.depth(x), draw["rel_depth"]))
            if head.normal is not None and "normal" in draw and draw["normal_valid"].any():
                nv = draw["normal_valid"]
                losses.append(normal_loss(head.normal(x[nv]), draw["normal"][nv]))
        if head.linear is not None and labels is not None and int((labels >= 0).sum()) > 1:
            losses.append(F.cross_entropy(head.linear(feats.vector.detach()), labels.long(), ignore_index=-1))
        return losses

    # ------------------------------------------------------------------ evaluation
    def on_validation(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, loader: int
    ) -> None:
        parts = flatten_batch(batch)
        if not parts:
            return
        several = len(trainer.num_val_batches) > 1 if isinstance(trainer.num_val_batches, list) else False
        heads = self._build(pl_module)
        heads.eval()
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            for name, part in parts:
                source = name or (f"dataloader{loader}" if several else "")
                for role, encoder in self._encoders(pl_module).items():
                    feats = encoder_features(encoder, part.views.images)
                    metrics = self._metrics_for(source, role, pl_module.device)
                    self._evaluate(heads[role], feats, part, metrics, role, seed=batch_idx)

    def _evaluate(self, head: _Heads, feats: Features, part: _Batch, metrics: _Metrics, role: str, seed: int) -> None:
        views, v = part.views, part.num_views
        if "correspondence" in self.probes and part.multiview:
            seeds = [seed * 1009 + s for s in range(views.images.shape[0] // v)]
            batch_correspondence(feats.dense, views, seeds, metrics.corr, self.num_queries, self.num_matches,
                                 max_pairs=self.max_pairs)  # fmt: skip
        if views.depth is not None and self.train_steps > 0 and (head.depth is not None or head.normal is not None):
            h, w = views.hw
            all_uv = pixel_uv(torch.arange(h * w, device=views.images.device), w)
            normals, valid_n = normals_from_depth(views.depth, views.K) if views.K is not None else (None, None)
            for k in range(views.images.shape[0]):
                valid = views.depth[k, 0].flatten() > 0
                if int(valid.sum()) < 2:
                    continue
                x = sample_at(feats.dense[k : k + 1], all_uv[valid][None], (h, w))[0]
                if head.depth is not None:
                    target = views.depth[k, 0].flatten()[valid]
                    metrics.depth.update(median_scale(head.depth(x)[:, 0].clamp(-10, 10).exp(), target), target)
                if head.normal is not None and normals is not None and valid_n is not None:
                    nv = valid_n[k, 0].flatten()[valid]
                    if nv.any():
                        metrics.normal.update(head.normal(x[nv]), normals[k].flatten(1).T[valid][nv])
        labels = part.labels
        if labels is not None and bool((labels >= 0).any()):
            known = labels >= 0
            if head.linear is not None and self.train_steps > 0:
                pred = head.linear(feats.vector).argmax(-1)
                metrics.linear.update((pred == labels)[known].float())
            if "knn" in self.probes and self.num_classes and len(self.banks[role]) > 0:
                bank, bank_labels = self.banks[role].get()
                pred = knn_predict(bank, bank_labels, feats.vector[known], self.num_classes, self.knn_k)
                metrics.knn.update((pred == labels[known]).float())

    def compute(self) -> dict[str, float]:
        """The metrics of the validation batches since the last reset, reduced over ranks, by logged name
        (without the ``val/<prefix>/`` part)."""
        out: dict[str, float] = {}
        with warnings.catch_warnings():  # a metric no batch fed is NaN, which is what we want
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            for key in sorted(self.metrics):
                out.update(self._compute_one(key))
        return out

    def _compute_one(self, key: str) -> dict[str, float]:
        m: _Metrics = self.metrics[key]  # type: ignore[assignment]
        source, role = self._sources[key], key.rsplit("__", 1)[1]
        # every rank computes every metric (torchmetrics synchronises inside compute)
        corr, depth, normal = m.corr.compute(), m.depth.compute(), m.normal.compute()
        values = named_metrics(
            self.thresholds,
            self.rotation_bins,
            corr if float(corr["matches"]) > 0 else None,
            depth=depth if bool(torch.isfinite(depth["rmse"])) else None,
            normal=normal if bool(torch.isfinite(normal["mean_deg"])) else None,
        )
        for name, metric in (("linear_acc", m.linear), ("knn_acc", m.knn)):
            value = metric.compute()
            if bool(torch.isfinite(value)):
                values[name] = float(value)
        prefix = f"{source}/" if source else ""
        tag = "" if role == "student" else "ref_"
        return {f"{prefix}{tag}{k}": v for k, v in values.items() if not k.startswith("corr_matches")}

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.validating(trainer, pl_module):
            return
        metrics = self.compute()
        for m in self.metrics.values():
            m.reset()  # type: ignore[operator]
        for name, value in metrics.items():
            pl_module.log(f"val/{self.prefix}/{name}", value, on_step=False, on_epoch=True, sync_dist=False)
        self.last_metrics = metrics
        writer = tensorboard(trainer)
        if self.chart and writer is not None and trainer.is_global_zero and metrics:
            writer.add_figure(f"{self.prefix}/bars", self.figure(metrics), global_step=trainer.global_step)

    def figure(self, metrics: Mapping[str, float]) -> Any:
        """Bar chart of the encoder beside the reference for the headline metrics (one panel per metric)."""
        rows: dict[str, dict[str, float]] = {}
        for name, value in metrics.items():
            if "/rot" in name:
                continue
            head, _, metric = name.rpartition("/")
            role = "reference" if metric.startswith("ref_") else "encoder"
            rows.setdefault(f"{head + ' ' if head else ''}{role}", {})[metric.removeprefix("ref_")] = value
        return bar_chart(sorted(rows.items()))

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if self.heads is None:
            return {}
        return {
            "heads": self.heads.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "train_steps": self.train_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._pending = state_dict
        self.train_steps = int(state_dict.get("train_steps", 0))
        if self.heads is not None:
            self.heads.load_state_dict(state_dict["heads"])
            self.optimizer = None  # rebuilt with the saved state at the next use
