"""Scenes for the probes: read multi-view shards (depth and cameras required) and split them, fixed.

Splits are asset-disjoint and do not depend on any seed: each scene belongs to a *group*, its
``meta.json`` ``asset`` (the object it shows; scenes of one asset share a group), else its ``scene_id``,
else its key; groups are ordered by a hash of their name (SHA-1), and

* **test**: whole groups are taken in that order from ``--data`` until ``test_scenes`` scenes are reached
  (the last group may be cut; its other scenes are used nowhere);
* **probe-train** (the split that trains the probe heads and fills the kNN bank): the scenes of
  ``--probe-data`` (or, without it, the rest of ``--data``) whose group is not a test group, taken in the
  order of a hash of their key up to ``probe_scenes``.

So a probe never sees a test object. Views are the scene's views evenly spread
(:func:`~selfsup3d.datamodules.multiview.eval_view_order`), resized and centre-cropped to the common
resolution with the intrinsics following, as the validation loader does.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from webdataset.tariterators import group_by_keys

from selfsup3d.datamodules.format import SampleError, is_multiview, parse_cameras, parse_meta
from selfsup3d.datamodules.multiview import MultiViewDecoder
from selfsup3d.datamodules.pipeline import BadSampleHandler, SkipCounter, expand_tars, expand_urls, open_shards
from selfsup3d.errors import ConfigError, require
from selfsup3d.eval.features import Views


def stable_hash(text: str) -> int:
    """A hash of ``text`` that is the same in every process and on every machine (SHA-1, 60 bits)."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:15], 16)


@dataclass
class RawScene:
    """A scene as read from a shard, not yet decoded."""

    key: str
    group: str
    label: int
    num_views: int
    size: tuple[int, int]  # (height, width)
    raw: dict[str, Any]


@dataclass
class SceneSet:
    """Decoded scenes, ``S`` scenes of ``V`` views at ``H × W``.

    Attributes:
        images: uint8 ``[S, V, 3, H, W]``.
        depth: float32 ``[S, V, 1, H, W]`` z-depth, 0 = unknown.
        K: float32 ``[S, V, 3, 3]``.
        c2w: float32 ``[S, V, 4, 4]``.
        labels: int64 ``[S]``, -1 = unknown.
        keys: scene keys.
        groups: scene groups (assets).
    """

    images: Tensor
    depth: Tensor
    K: Tensor
    c2w: Tensor
    labels: Tensor
    keys: list[str]
    groups: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_views(self) -> int:
        return int(self.images.shape[1])

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.images.shape[-2]), int(self.images.shape[-1])

    def views(self, start: int, stop: int) -> Views:
        """The views of scenes ``start .. stop - 1``, scene-major, images as float in ``[0, 1]``."""
        sl = slice(start, stop)
        return Views(
            self.images[sl].flatten(0, 1).float() / 255.0,
            self.depth[sl].flatten(0, 1),
            self.K[sl].flatten(0, 1),
            self.c2w[sl].flatten(0, 1),
        )

    def summary(self) -> dict[str, Any]:
        return {"scenes": len(self), "groups": len(set(self.groups)), "views": self.num_views, "keys": self.keys}


def read_raw_scenes(urls: str | Sequence[str], arg: str) -> list[RawScene]:
    """Every multi-view scene of the shards (bad samples are skipped with a warning naming them).

    Raises:
        ConfigError: no shard matches, a sample is single-view, or the shards hold no scene with depth.
    """
    shards = expand_urls(list(urls) if not isinstance(urls, str) else urls, arg)
    counter = SkipCounter()
    handler = BadSampleHandler(counter, strict=False, split=arg)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards),
        functools.partial(open_shards, handler=handler),
        functools.partial(expand_tars, handler=handler),
        functools.partial(group_by_keys, handler=handler),
    )
    scenes: list[RawScene] = []
    for raw in pipeline:
        key = raw.get("__key__", "?")
        if not is_multiview(raw):
            raise ConfigError(
                f"{arg}: sample {key} in {raw.get('__url__')} is single-view; the probes need multi-view shards "
                "with depth and cameras (selfsup3d data render|convert)"
            )
        try:
            cameras = parse_cameras(raw)
            meta = parse_meta(raw, required=False)
            if cameras.depth_scale is None:
                raise SampleError(raw.get("__url__"), key, "cameras.json", "no depth (depth_scale is null)")
        except SampleError as err:
            handler(err)
            continue
        group = str(meta.get("asset") or meta.get("scene_id") or key)
        scenes.append(RawScene(key, group, int(meta["label"]), cameras.num_views, (cameras.height, cameras.width), raw))
    if not scenes:
        raise ConfigError(f"{arg}: no usable multi-view scene with depth in {shards[:3]}")
    return scenes


@dataclass
class Split:
    """The chosen scenes and how they were chosen (for the report)."""

    test: list[RawScene]
    probe: list[RawScene]
    info: dict[str, Any]


def split_scenes(
    data: list[RawScene], probe_data: list[RawScene] | None, test_scenes: int, probe_scenes: int | None = None
) -> Split:
    """The fixed, asset-disjoint test and probe-train splits (see the module docstring).

    Args:
        data: scenes of ``--data`` (the test split comes from these).
        probe_data: scenes of ``--probe-data``; ``None`` takes the probe-train split from the rest of ``data``.
        test_scenes: scenes in the test split (fewer when the data has fewer).
        probe_scenes: at most this many probe-train scenes (``None``: all).

    Raises:
        ConfigError: nothing left to train the probes on.
    """
    require(test_scenes >= 1, "--test-scenes", ">= 1", test_scenes)
    by_group: dict[str, list[RawScene]] = {}
    for s in data:
        by_group.setdefault(s.group, []).append(s)
    test: list[RawScene] = []
    test_groups: set[str] = set()
    for group in sorted(by_group, key=lambda g: (stable_hash(g), g)):
        if len(test) >= test_scenes:
            break
        test_groups.add(group)
        test.extend(sorted(by_group[group], key=lambda s: s.key)[: test_scenes - len(test)])
    test_keys = {s.key for s in test}
    pool = data if probe_data is None else probe_data
    candidates = [s for s in pool if s.group not in test_groups and s.key not in test_keys]
    shared = sum(1 for s in pool if s.group in test_groups) if probe_data is not None else 0
    candidates.sort(key=lambda s: (stable_hash(s.key), s.key))
    probe = candidates[:probe_scenes] if probe_scenes else candidates
    if not probe:
        hint = (
            "give separate probe-training shards with --probe-data (e.g. the embedded train shards)"
            if probe_data is None
            else "--probe-data shows only objects of the test split"
        )
        raise ConfigError(
            f"no scenes left to train the probes on ({len(data)} scenes, {len(test)} for the test); {hint}"
        )
    info = {
        "rule": "groups (meta asset, else scene_id, else key) in SHA-1 order; independent of --seed",
        "test": {"scenes": len(test), "groups": len(test_groups)},
        "probe": {
            "scenes": len(probe),
            "groups": len({s.group for s in probe}),
            "from": "probe_data" if probe_data is not None else "data",
            "dropped_shared_groups": shared,
        },
    }
    return Split(test, probe, info)


def decode_scenes(scenes: list[RawScene], num_views: int, image_hw: tuple[int, int]) -> SceneSet:
    """Decode scenes to tensors: ``num_views`` views evenly spread, at ``image_hw`` (see module docstring)."""
    decoder = MultiViewDecoder(num_views, 1, image_hw, with_depth=True, with_masks=False)
    items = []
    for s in scenes:
        try:
            items.append((s, decoder(s.raw, None)[0]))
        except SampleError as err:
            warnings.warn(f"probe: skipping {err}", stacklevel=2)
    if not items:
        raise ConfigError("no scene could be decoded for the probes")

    def stack(name: str) -> Tensor:
        return torch.from_numpy(np.stack([item[name] for _, item in items]))

    return SceneSet(
        images=stack("images"),
        depth=stack("depth").float(),
        K=stack("K").float(),
        c2w=stack("c2w").float(),
        labels=torch.tensor([item["label"] for _, item in items], dtype=torch.int64),
        keys=[s.key for s, _ in items],
        groups=[s.group for s, _ in items],
    )
