"""selfsup3d: 3D-aware self-supervised pretraining of vision encoders with PyTorch Lightning."""

__version__ = "0.1.0"
