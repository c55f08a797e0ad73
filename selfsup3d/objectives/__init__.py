"""Objectives: one LightningModule per file on the shared :class:`PretrainObjective` base, and
:class:`MultiTask`, which trains several of them over one encoder."""

from selfsup3d.objectives.base import PretrainObjective, component_outputs
from selfsup3d.objectives.consensus import FeatureConsensus
from selfsup3d.objectives.masked_view import MaskedViewPrediction
from selfsup3d.objectives.multitask import MultiTask
from selfsup3d.objectives.triplane import TriplaneReconstruction

__all__ = [
    "FeatureConsensus",
    "MaskedViewPrediction",
    "MultiTask",
    "PretrainObjective",
    "TriplaneReconstruction",
    "component_outputs",
]
