"""Installed as ``selfsup3d.callbacks`` (see pyproject's package-dir); never a top-level ``callbacks`` module."""

if __name__ != "selfsup3d.callbacks":  # e.g. `import callbacks` from the repository root
    raise ImportError(
        "import selfsup3d.callbacks (install the project: make install), not the top-level 'callbacks' folder"
    )

from selfsup3d.callbacks.camera_token_probe import CameraTokenProbe
from selfsup3d.callbacks.consensus import ConsensusPictures, SceneRetrieval
from selfsup3d.callbacks.export import EncoderExport
from selfsup3d.callbacks.lr import LearningRates
from selfsup3d.callbacks.masked_view import MaskedViewPictures, OracleComparison
from selfsup3d.callbacks.probe import ProbeCallback
from selfsup3d.callbacks.progress import RichProgress, TQDMProgress, default_progress_bar
from selfsup3d.callbacks.requeue import StepBoundaryRequeue
from selfsup3d.callbacks.triplane import TriplaneImages

__all__ = [
    "CameraTokenProbe",
    "ConsensusPictures",
    "EncoderExport",
    "LearningRates",
    "MaskedViewPictures",
    "OracleComparison",
    "ProbeCallback",
    "RichProgress",
    "SceneRetrieval",
    "StepBoundaryRequeue",
    "TQDMProgress",
    "TriplaneImages",
    "default_progress_bar",
]
