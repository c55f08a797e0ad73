"""Losses as small modules and functions, tested on their own (perceptual, distillation, consensus).
Import from the submodules."""
