"""The shared encoder (a timm ViT of the DINOv2 family), its weights and its frozen teacher copies."""

from selfsup3d.encoders.checkpoint import load_encoder_weights, read_encoder_state_dict
from selfsup3d.encoders.vit import SIZES, EncoderOutput, FrozenTeacher, ViTEncoder, create_vit, make_teacher

__all__ = [
    "SIZES",
    "EncoderOutput",
    "FrozenTeacher",
    "ViTEncoder",
    "create_vit",
    "load_encoder_weights",
    "make_teacher",
    "read_encoder_state_dict",
]
