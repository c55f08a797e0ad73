"""Installed as ``selfsup3d.callbacks`` (see pyproject's package-dir); never a top-level ``callbacks`` module."""

if __name__ != "selfsup3d.callbacks":  # e.g. `import callbacks` from the repository root
    raise ImportError(
        "import selfsup3d.callbacks (install the project: make install), not the top-level 'callbacks' folder"
    )

from selfsup3d.callbacks.export import EncoderExport
from selfsup3d.callbacks.masked_view import MaskedViewPictures
from selfsup3d.callbacks.probe import ProbeCallback
from selfsup3d.callbacks.probes import OnlineProbes
from selfsup3d.callbacks.triplane import TriplaneImages

__all__ = ["EncoderExport", "MaskedViewPictures", "OnlineProbes", "ProbeCallback", "TriplaneImages"]
