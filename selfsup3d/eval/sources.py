"""What an ENCODER argument of ``selfsup3d probe`` can be, and how it becomes a :class:`FeatureSource`.

Accepted forms (``LABEL=`` in front of any of them names its row in the report)::

    runs/x/encoder.safetensors      an exported encoder (its config is in the file's metadata)
    runs/x/checkpoints/last.ckpt    a Lightning checkpoint of any objective (hyper_parameters["encoder"])
    configs/demo/triplane.yaml      a config's model.init_args.encoder, randomly initialised (the floor)
    vit_small_patch14_dinov2        a timm model name (or tiny/small/base/large): --pretrained weights, else random
    vit_small_patch14_dinov2@w.pth  a timm model name with a local weights file (timm state dict, .safetensors,
                                    selfsup3d .ckpt)
    colour                          each pixel's 5x5 window of colours (the no-learning baseline)
    oracle | constant               sanity checks: the true 3D position of each pixel / one constant feature

An encoder built from a config or a class path only has to be a module whose forward gives an
:class:`~selfsup3d.encoders.EncoderOutput` and that has ``embed_dim`` and ``patch_size``.
Random initialisations are seeded (``torch.manual_seed(seed)`` right before construction).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selfsup3d.encoders.export import load_exported_encoder, read_export_config
from selfsup3d.encoders.timm_factory import SIZES
from selfsup3d.encoders.vit import ViTEncoder
from selfsup3d.errors import ConfigError, require
from selfsup3d.eval.features import (
    ColourFeatures,
    ConstantFeatures,
    EncoderFeatures,
    FeatureSource,
    OracleFeatures,
)

BASELINES: dict[str, type[FeatureSource]] = {
    "colour": ColourFeatures,
    "color": ColourFeatures,
    "oracle": OracleFeatures,
    "constant": ConstantFeatures,
}
_RUN_FOLDERS = {"lightning_logs", "checkpoints"}


@dataclass
class LoadedSource:
    """A source ready to probe, with what the report says about it."""

    label: str
    spec: str
    kind: str
    source: FeatureSource
    info: dict[str, Any] = field(default_factory=dict)


def split_label(text: str) -> tuple[str | None, str]:
    """``LABEL=SPEC`` -> ``(LABEL, SPEC)``; a plain spec (or a path containing ``=`` after a slash) has no label."""
    head, sep, tail = text.partition("=")
    if sep and head and "/" not in head and tail:
        return head, tail
    return None, text


def _is_timm_name(name: str) -> bool:
    import timm

    return name in SIZES or name in timm.list_models()


def _run_name(path: Path) -> str:
    """A readable default label for a file inside a run folder: ``demo_triplane/encoder``."""
    parents = [
        p.name for p in path.parents if p.name and p.name not in _RUN_FOLDERS and not p.name.startswith("version_")
    ]
    if path.stem in ("encoder", "last") and parents:
        return f"{parents[0]}/{path.stem}"
    return path.stem


def _class(class_path: str) -> type:
    if "." not in class_path:
        class_path = f"selfsup3d.encoders.{class_path}"
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"cannot import the encoder class {class_path!r}: {err}") from None


def build_encoder(config: Mapping[str, Any], seed: int, where: str) -> nn.Module:
    """A randomly initialised encoder from a ``{class_path, init_args}`` entry (``pretrained`` and
    ``checkpoint_path`` switched off), seeded.

    Raises:
        ConfigError: the entry is malformed or the class cannot be built from it.
    """
    require(isinstance(config, Mapping), f"{where}: the encoder entry", "a mapping with class_path/init_args", config)
    cls = _class(str(config.get("class_path", "selfsup3d.encoders.ViTEncoder")))
    args = dict(config.get("init_args") or {})
    params = inspect.signature(cls).parameters
    for key, value in (("pretrained", False), ("checkpoint_path", None)):
        if key in params:
            args[key] = value
    torch.manual_seed(seed)
    try:
        return cls(**args)
    except TypeError as err:
        raise ConfigError(f"{where}: cannot build {cls.__name__} from init_args {args}: {err}") from None


def _config_encoder(path: Path) -> Mapping[str, Any]:
    import yaml

    with path.open() as f:
        cfg = yaml.safe_load(f) or {}
    model = cfg.get("model", {}) if isinstance(cfg, Mapping) else {}
    encoder = (model.get("init_args") or {}).get("encoder") if isinstance(model, Mapping) else None
    if encoder is None and isinstance(model, Mapping):
        encoder = model.get("encoder")
    if encoder is None:
        raise ConfigError(f"{path}: no model.init_args.encoder entry (a selfsup3d fit config names its encoder there)")
    return encoder


def _checkpoint_encoder(path: Path, seed: int) -> nn.Module:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or "state_dict" not in obj:
        raise ConfigError(f"{path} is not a Lightning checkpoint (no state_dict)")
    hparams = obj.get("hyper_parameters") or {}
    config = hparams.get("encoder") if isinstance(hparams, Mapping) else None
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"{path}: its hyper_parameters hold no encoder config; give the architecture as NAME@{path} "
            "(e.g. vit_small_patch14_dinov2@...) or export it with selfsup3d export"
        )
    if "class_path" not in config and "init_args" not in config:
        config = {"init_args": dict(config)}
    encoder = build_encoder(config, seed, str(path))
    weights = {k[len("encoder.") :]: v for k, v in obj["state_dict"].items() if k.startswith("encoder.")}
    if not weights:
        raise ConfigError(f"{path} has no encoder.* weights")
    missing, unexpected = encoder.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{path}: the encoder weights do not fit its config: missing {sorted(missing)[:8]}, "
            f"unexpected {sorted(unexpected)[:8]}"
        )
    return encoder


def load_source(
    text: str,
    pretrained: bool = False,
    seed: int = 0,
    input_size: int | None = None,
    batch_size: int = 64,
) -> LoadedSource:
    """Turn one ENCODER argument into a source (see the module docstring for the forms).

    Args:
        text: the argument, optionally ``LABEL=SPEC``.
        pretrained: timm names without ``@weights`` load timm's pretrained weights (needs the network or
            a filled Hugging Face cache).
        seed: seed of random initialisations.
        input_size: feed every encoder images of this size (default: its training ``img_size``).
        batch_size: images per forward pass.

    Raises:
        ConfigError: naming the argument and what is wrong with it.
        FileNotFoundError: a path that does not exist.
    """
    label, spec = split_label(text)
    hw = (input_size, input_size) if input_size else None
    name = spec.lower()
    if name in BASELINES:
        source = BASELINES[name]()
        return LoadedSource(label or ("colour" if name == "color" else name), spec, source.kind, source)
    arch, at, weights = spec.partition("@")
    path = Path(spec)
    if at and _is_timm_name(arch):
        if not Path(weights).is_file():
            raise FileNotFoundError(f"encoder weights file not found: {weights} (in {text!r})")
        encoder = ViTEncoder(arch, img_size=input_size or 224, checkpoint_path=weights)
        kind, default = "timm+weights", f"{arch}@{Path(weights).name}"
    elif path.suffix == ".safetensors" and path.is_file():
        if not read_export_config(path):
            raise ConfigError(
                f"{path} has no selfsup3d encoder metadata; give its architecture as NAME@{path} "
                "(a timm model name such as vit_small_patch14_dinov2)"
            )
        encoder = load_exported_encoder(path)
        kind, default = "exported", _run_name(path)
    elif path.suffix == ".ckpt" and path.is_file():
        encoder, kind, default = _checkpoint_encoder(path, seed), "checkpoint", _run_name(path)
    elif path.suffix in (".yaml", ".yml") and path.is_file():
        encoder = build_encoder(_config_encoder(path), seed, str(path))
        kind, default = "config (random init)", f"{path.stem} (random)"
    elif path.suffix in (".pth", ".pt", ".bin") and path.is_file():
        raise ConfigError(f"{path}: a bare weights file; give its architecture as NAME@{path}")
    elif _is_timm_name(spec):
        torch.manual_seed(seed)
        encoder = ViTEncoder(spec, img_size=input_size or 224, pretrained=pretrained)
        kind, default = ("timm pretrained", spec) if pretrained else ("timm (random init)", f"{spec} (random)")
    elif path.suffix in (".safetensors", ".ckpt", ".yaml", ".yml") or "/" in spec:
        raise FileNotFoundError(f"encoder file not found: {spec}")
    else:
        known = ", ".join(sorted(set(BASELINES) - {"color"}))
        raise ConfigError(
            f"unknown encoder {spec!r}: give an exported .safetensors, a .ckpt, a config .yaml, a timm model "
            f"name (optionally NAME@weights), or one of {known}"
        )
    for attr in ("embed_dim", "patch_size"):
        if not hasattr(encoder, attr):
            raise ConfigError(f"encoder {spec!r} ({type(encoder).__name__}) has no {attr}")
    source = EncoderFeatures(encoder, input_hw=hw, batch_size=batch_size)
    return LoadedSource(label or default, spec, kind, source, source.describe())
