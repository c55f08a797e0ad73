"""Online probes beside the teacher's numbers: linear and kNN classification, a depth probe, and the
student-teacher similarity. Works with any objective.

During training every batch's features are detached and train the probes, which have their own
optimiser (the encoder never sees their gradients). At the end of each validation epoch the probes are
evaluated on the validation set and logged, for the student (``val/probe/linear_acc``) and, side by side,
for a frozen reference encoder (``val/probe/teacher_linear_acc``):

* the objective's ``teacher`` when it has one (a distillation objective);
* otherwise a frozen copy of the encoder taken when fitting starts (the starting point; after a resume,
  the resumed encoder).

Features come from the objective's step output when it returns them (``features`` and
``teacher_features``, each an :class:`~selfsup3d.encoders.EncoderOutput`), otherwise the callback runs the
encoders itself on ``batch["image"]`` (through ``pl_module.encoder_input`` when the objective has it).

Logged (``val/probe/...``): ``linear_acc``, ``knn_acc`` (labels >= 0 only), ``depth_rmse`` (pixels with
depth), ``teacher_cosine`` (mean cosine similarity of the final class and patch tokens of student and
reference), and the reference's ``teacher_linear_acc``, ``teacher_knn_acc``, ``teacher_depth_rmse``.

The kNN bank holds the most recent ``bank_size`` training features; the student's entries were computed by
slightly older weights (as in a MoCo queue), the reference's are exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from selfsup3d.encoders.teacher import FrozenTeacher, make_teacher
from selfsup3d.eval.probes import (
    DepthProbe,
    DepthTarget,
    FeatureBank,
    FeatureKind,
    LinearProbe,
    Tokens,
    depth_probe_target,
    global_features,
    knn_predict,
    squared_error,
    token_cosine,
)
from selfsup3d.objectives.base import PretrainObjective

_ROLES = ("student", "teacher")


class _Heads(nn.Module):
    """The probes of one encoder (student or reference)."""

    def __init__(self, dim: int, patch_size: int, num_classes: int | None, kind: FeatureKind, depth: bool) -> None:
        super().__init__()
        feat_dim = dim * (2 if kind == "cls_avg" else 1)
        self.linear = LinearProbe(feat_dim, num_classes) if num_classes else None
        self.depth = DepthProbe(dim, patch_size) if depth else None


class OnlineProbes(Callback):
    """Linear, kNN and depth probes of the encoder and of a frozen reference, trained online on detached
    features and evaluated on the validation set.

    Args:
        num_classes: classes of the labels; ``null`` takes ``num_classes`` from the datamodule if it has one,
            otherwise the classification probes are off.
        linear: train and report the linear classification probe.
        knn: report kNN classification from a bank of recent training features.
        depth: train and report the depth probe (needs ``depth`` in the batches).
        similarity: report the student-reference cosine similarity.
        reference: also probe the frozen reference (the objective's teacher, or the initial encoder).
        feature: global feature of the classification probes: ``cls`` or ``cls_avg`` (with the mean patch).
        lr: learning rate of the probes' AdamW.
        weight_decay: weight decay of the probes' AdamW.
        knn_k: neighbours of the kNN vote.
        knn_temperature: temperature of the kNN vote.
        bank_size: training features kept for the kNN vote.
        depth_target: what the depth probe regresses: ``median`` (depth over the image's median) or ``raw``.
        prefix: metrics are logged as ``val/<prefix>/...``.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        linear: bool = True,
        knn: bool = True,
        depth: bool = True,
        similarity: bool = True,
        reference: bool = True,
        feature: FeatureKind = "cls_avg",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        bank_size: int = 4096,
        depth_target: DepthTarget = "median",
        prefix: str = "probe",
    ) -> None:
        self.num_classes = num_classes
        self.linear, self.knn, self.depth, self.similarity = linear, knn, depth, similarity
        self.use_reference = reference
        self.feature: FeatureKind = feature
        self.lr, self.weight_decay = lr, weight_decay
        self.knn_k, self.knn_temperature, self.bank_size = knn_k, knn_temperature, bank_size
        self.depth_target: DepthTarget = depth_target
        self.prefix = prefix
        self.heads: nn.ModuleDict | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.banks = {role: FeatureBank(bank_size) for role in _ROLES}
        self._reference: FrozenTeacher | None = None
        self._pending_state: dict[str, Any] | None = None
        self._sums: dict[str, Tensor] = {}
        self.train_steps = 0
        self.last_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up
    @property
    def state_key(self) -> str:
        return f"OnlineProbes[{self.prefix}]"

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.num_classes is None:
            self.num_classes = getattr(trainer.datamodule, "num_classes", None) if trainer.datamodule else None
        if self.num_classes is None and (self.linear or self.knn):
            rank_zero_warn("OnlineProbes: no num_classes (argument or datamodule.num_classes); classification off")
        encoder = pl_module.encoder
        dim, patch = int(encoder.embed_dim), int(encoder.patch_size)
        n_cls = self.num_classes if self.linear else None
        roles = _ROLES if self.use_reference else _ROLES[:1]
        self.heads = nn.ModuleDict({r: _Heads(dim, patch, n_cls, self.feature, self.depth) for r in roles})
        if self._pending_state is not None:
            self.heads.load_state_dict(self._pending_state["heads"])

    def _ready(self, pl_module: LightningModule) -> nn.ModuleDict:
        assert self.heads is not None, "OnlineProbes.setup was not called"
        self.heads.to(pl_module.device)
        if self.optimizer is None:
            params = [p for p in self.heads.parameters() if p.requires_grad]
            self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay) if params else None
            if self.optimizer is not None and self._pending_state and self._pending_state.get("optimizer"):
                self.optimizer.load_state_dict(self._pending_state["optimizer"])
        return self.heads

    def reference_encoder(self, pl_module: LightningModule) -> nn.Module | None:
        """The frozen reference: the objective's teacher, or a copy of the encoder made at fit start."""
        if not self.use_reference:
            return None
        teacher = pl_module.frozen_teacher() if isinstance(pl_module, PretrainObjective) else None
        if teacher is not None:
            return teacher
        if self._reference is None:
            self._reference = make_teacher(pl_module.encoder)
        return self._reference.to(pl_module.device)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        teacher = pl_module.frozen_teacher() if isinstance(pl_module, PretrainObjective) else None
        if self.use_reference and teacher is None:
            self._reference = make_teacher(pl_module.encoder).to(pl_module.device)

    # ------------------------------------------------------------------ features
    def _features(self, pl_module: LightningModule, outputs: Any, batch: Mapping[str, Any]) -> dict[str, Tokens | None]:
        out = outputs if isinstance(outputs, Mapping) else {}
        found: dict[str, Tokens | None] = {"student": out.get("features"), "teacher": out.get("teacher_features")}
        need_student = found["student"] is None
        reference = self.reference_encoder(pl_module)
        need_teacher = reference is not None and found["teacher"] is None
        if need_student or need_teacher:
            images = batch["image"]
            to_input = getattr(pl_module, "encoder_input", None)
            x = to_input(images) if callable(to_input) else images
            with torch.no_grad():
                if need_student:
                    found["student"] = pl_module.encoder(x)
                if need_teacher and reference is not None:
                    found["teacher"] = reference(x)
        if reference is None:
            found["teacher"] = None
        return found

    # ------------------------------------------------------------------ training
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(batch, Mapping) or "image" not in batch:
            return
        heads = self._ready(pl_module)
        heads.train()
        feats = self._features(pl_module, outputs, batch)
        labels = batch.get("label")
        depth = batch.get("depth") if self.depth else None
        losses = []
        with torch.enable_grad(), torch.autocast(pl_module.device.type, enabled=False):
            for role, f in feats.items():
                if f is None or role not in heads:
                    continue
                head = heads[role]
                if head.linear is not None and labels is not None and (labels >= 0).sum() > 1:
                    logits = head.linear(global_features(f, self.feature))
                    losses.append(F.cross_entropy(logits, labels.long(), ignore_index=-1))
                if head.depth is not None and depth is not None:
                    patches = f.patches.detach().float()
                    pred = head.depth(patches, f.grid)
                    target, valid = depth_probe_target(depth, tuple(pred.shape[-2:]), self.depth_target)
                    if valid.any():
                        sq, n = squared_error(pred, target, valid)
                        losses.append(sq / n)
                if self.knn and self.num_classes and labels is not None:
                    self.banks[role].add(global_features(f, self.feature), labels)
            if losses and self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
                torch.stack(losses).sum().backward()
                self.optimizer.step()
                self.train_steps += 1

    # ------------------------------------------------------------------ evaluation
    def _add(self, name: str, value: Tensor) -> None:
        value = value.detach().float()
        self._sums[name] = self._sums[name] + value if name in self._sums else value

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or not isinstance(batch, Mapping) or "image" not in batch:
            return
        heads = self._ready(pl_module)
        heads.eval()
        feats = self._features(pl_module, outputs, batch)
        labels = batch.get("label")
        depth = batch.get("depth") if self.depth else None
        with torch.no_grad(), torch.autocast(pl_module.device.type, enabled=False):
            for role, f in feats.items():
                if f is None or role not in heads:
                    continue
                head = heads[role]
                has_labels = labels is not None and bool((labels >= 0).any())
                if head.linear is not None and has_labels and self.train_steps > 0:
                    pred = head.linear(global_features(f, self.feature)).argmax(-1)
                    self._add(f"{role}/linear_correct", ((pred == labels) & (labels >= 0)).sum())
                    self._add(f"{role}/linear_count", (labels >= 0).sum())
                if self.knn and self.num_classes and has_labels and len(self.banks[role]) > 0:
                    bank, bank_labels = self.banks[role].get()
                    pred = knn_predict(
                        bank,
                        bank_labels,
                        global_features(f, self.feature),
                        self.num_classes,
                        self.knn_k,
                        self.knn_temperature,
                    )
                    self._add(f"{role}/knn_correct", ((pred == labels) & (labels >= 0)).sum())
                    self._add(f"{role}/knn_count", (labels >= 0).sum())
                if head.depth is not None and depth is not None and self.train_steps > 0:
                    pred = head.depth(f.patches.detach().float(), f.grid)
                    target, valid = depth_probe_target(depth, tuple(pred.shape[-2:]), self.depth_target)
                    sq, n = squared_error(pred, target, valid)
                    self._add(f"{role}/depth_sq", sq)
                    self._add(f"{role}/depth_count", n)
            student, teacher = feats["student"], feats.get("teacher")
            if self.similarity and student is not None and teacher is not None:
                s = torch.cat([student.cls[:, None], student.patches], dim=1)
                t = torch.cat([teacher.cls[:, None], teacher.patches], dim=1)
                if s.shape == t.shape:
                    self._add("cosine_sum", token_cosine(s, t) * s.shape[0])
                    self._add("cosine_count", torch.tensor(float(s.shape[0]), device=s.device))

    def compute(self, trainer: Trainer | None = None) -> dict[str, float]:
        """The metrics of the validation batches seen since the last reset (summed over ranks)."""
        sums = dict(self._sums)
        if trainer is not None and trainer.world_size > 1:
            sums = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in sums.items()}
        metrics: dict[str, float] = {}
        for role in _ROLES:
            name = "" if role == "student" else "teacher_"
            for metric, num, den, fn in (
                ("linear_acc", "linear_correct", "linear_count", float),
                ("knn_acc", "knn_correct", "knn_count", float),
                ("depth_rmse", "depth_sq", "depth_count", lambda v: float(v) ** 0.5),
            ):
                n, d = sums.get(f"{role}/{num}"), sums.get(f"{role}/{den}")
                if n is not None and d is not None and float(d) > 0:
                    metrics[f"{name}{metric}"] = fn(n / d)
        if sums.get("cosine_count") is not None and float(sums["cosine_count"]) > 0:
            metrics["teacher_cosine"] = float(sums["cosine_sum"] / sums["cosine_count"])
        return metrics

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            self._sums = {}
            return
        metrics = self.compute(trainer)
        self._sums = {}
        for name, value in metrics.items():
            pl_module.log(f"val/{self.prefix}/{name}", value, on_step=False, on_epoch=True, sync_dist=False)
        self.last_metrics = metrics

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
        self._pending_state = state_dict
        self.train_steps = int(state_dict.get("train_steps", 0))
        if self.heads is not None:
            self.heads.load_state_dict(state_dict["heads"])
            self.optimizer = None  # rebuilt (with the saved state) at the next use
