"""The shared encoder (a timm ViT of the DINOv2 family), its interface, its weights and its frozen teachers."""

from selfsup3d.encoders.base import Encoder, EncoderOutput
from selfsup3d.encoders.teacher import FrozenTeacher, build_teacher, make_teacher
from selfsup3d.encoders.timm_factory import SIZES, create_vit
from selfsup3d.encoders.vit import ViTEncoder
from selfsup3d.encoders.weights import load_encoder_weights, read_encoder_state_dict

__all__ = [
    "SIZES",
    "Encoder",
    "EncoderOutput",
    "FrozenTeacher",
    "ViTEncoder",
    "build_teacher",
    "create_vit",
    "load_encoder_weights",
    "make_teacher",
    "read_encoder_state_dict",
]
