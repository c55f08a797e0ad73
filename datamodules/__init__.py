"""Installed as ``selfsup3d.datamodules`` (see pyproject's package-dir); never a top-level ``datamodules`` module."""

if __name__ != "selfsup3d.datamodules":  # e.g. `import datamodules` from the repository root
    raise ImportError(
        "import selfsup3d.datamodules (install the project: make install), not the top-level 'datamodules' folder"
    )

from selfsup3d.datamodules.combined import CombinedShards
from selfsup3d.datamodules.multiview import MultiViewShards
from selfsup3d.datamodules.pipeline import BadSampleWarning, SkippedSamplesLogger
from selfsup3d.datamodules.singleview import SingleViewShards
from selfsup3d.datamodules.spec import DataSpec

__all__ = [
    "BadSampleWarning",
    "CombinedShards",
    "DataSpec",
    "MultiViewShards",
    "SingleViewShards",
    "SkippedSamplesLogger",
]
