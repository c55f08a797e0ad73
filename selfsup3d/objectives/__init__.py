"""Objectives: one LightningModule per file on the shared :class:`PretrainObjective` base."""

from selfsup3d.objectives.base import PretrainObjective

__all__ = ["PretrainObjective"]
