"""Objectives: one LightningModule per file on the shared :class:`PretrainObjective` base."""

from selfsup3d.objectives.base import PretrainObjective
from selfsup3d.objectives.masked_view import MaskedViewPrediction
from selfsup3d.objectives.triplane import TriplaneReconstruction

__all__ = ["MaskedViewPrediction", "PretrainObjective", "TriplaneReconstruction"]
