"""What the shards of a split hold, read at set-up from the tar headers alone (no image is decoded).

A run says how much data it has before it trains (``training data: 4 shards, 512 samples``) and refuses a
training stream that is nearly all broken: resampling would otherwise train on the few readable samples
over and over while the skip counter grows. Local shards are inventoried (a header walk: milliseconds per
shard); ``pipe:`` and remote shards are counted as unknown and left to the stream's bad-sample handling.

It also counts the multi-view scenes and how many of them carry ``cameras.json`` (unposed scenes, e.g. from
video, have none), so a run says whether its cameras come from the data.

A sample is *intact* when every member of it lies wholly inside the file. A shard is *damaged* when a
member runs past the end of the file, a header cannot be read, or the file stops without tar's end-of-archive
blocks (cut exactly between two members). ``info.json`` beside the shards (written by ``selfsup3d data``)
lists how many samples each split had when it was written; where it matches the shards, the inventory
compares against it (``6 of 16 samples``).
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import braceexpand

from selfsup3d.datamodules.pipeline import _is_local as is_local_url
from selfsup3d.datamodules.pipeline import _local_path as local_path
from selfsup3d.errors import ConfigError

MIN_READABLE = 0.5
"""Training refuses shards holding fewer than this fraction of the samples ``info.json`` lists."""
TAR_END = 2 * tarfile.BLOCKSIZE
"""tar ends with two zero blocks; a file without them was cut."""
_SCENE_FIELD = re.compile(r"^(\d{3,}\.(png|jpg|jpeg|webp)|cameras\.json)$")
"""A member field that makes its sample a multi-view scene (a numbered view or cameras)."""


@dataclass(frozen=True)
class ShardInventory:
    """One local shard: its intact samples, the multi-view scenes among them and those with ``cameras.json``, and,
    when damaged, what is wrong (``None`` when whole)."""

    url: str
    samples: int
    damage: str | None = None
    scenes: int = 0
    with_cameras: int = 0
    keys: frozenset[str] = frozenset()
    """The keys of its intact samples."""


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's sample key of a member (the path up to the first dot of its file name) and its field."""
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field


def inventory_shard(url: str) -> ShardInventory:
    """Walk the headers of the local shard ``url`` (see the module docstring)."""
    path = local_path(url)
    size = os.path.getsize(path)
    keys: dict[str, bool] = {}  # key -> all of its members intact
    scenes: set[str] = set()
    posed: set[str] = set()
    damage: str | None = None
    end = 0
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isreg() or member.name.startswith("__"):
                    continue
                member_end = member.offset_data + member.size
                end = max(end, member_end)
                key, field = _sample_key(member.name)
                if _SCENE_FIELD.match(field):
                    scenes.add(key)
                    if field == "cameras.json":
                        posed.add(key)
                intact = member_end <= size
                keys[key] = keys.get(key, True) and intact
                if not intact:
                    damage = f"truncated inside sample {key!r}"
                    break
    except (tarfile.TarError, OSError, EOFError) as err:
        damage = f"unreadable after {len(keys)} sample(s): {type(err).__name__}: {err}"
    if damage is None and keys and size < end + TAR_END:
        damage = "ends without tar's end-of-archive blocks (cut between two members)"
    whole = sum(keys.values())
    if damage is not None:
        damage = f"{damage}; {whole} intact sample(s) before it"
    intact = {key for key, ok in keys.items() if ok}
    return ShardInventory(url, whole, damage, len(scenes & intact), len(posed & intact), frozenset(intact))


def listed_samples(urls: list[str], split: str) -> int | None:
    """How many samples ``info.json`` beside the shards lists for ``split``, when its shard pattern names
    exactly these shards (by file name); ``None`` otherwise."""
    local = [local_path(u) for u in urls if is_local_url(u)]
    if not local or len(local) != len(urls):
        return None
    folder = Path(local[0]).parent
    try:
        info = json.loads((folder / "info.json").read_text())
        entry = info["splits"][split]
        listed = {Path(u).name for u in braceexpand.braceexpand(entry["url"])}
        count = int(entry.get("scenes", entry.get("samples")))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    same = listed == {Path(p).name for p in local} and all(Path(p).parent == folder for p in local)
    return count if same else None


@dataclass(frozen=True)
class SplitInventory:
    """The shards of one split: the local ones inventoried, the others (``pipe:``, remote) counted only."""

    split: str
    shards: list[ShardInventory]
    unknown: int
    listed: int | None

    @classmethod
    def of(cls, urls: list[str], split: str) -> SplitInventory:
        shards = [inventory_shard(u) for u in urls if is_local_url(u)]
        return cls(split, shards, len(urls) - len(shards), listed_samples(urls, split))

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def damaged(self) -> list[ShardInventory]:
        return [s for s in self.shards if s.damage is not None]

    @property
    def scenes(self) -> int:
        """Intact multi-view scenes in the local shards."""
        return sum(s.scenes for s in self.shards)

    @property
    def with_cameras(self) -> int:
        """Intact multi-view scenes in the local shards that carry ``cameras.json``."""
        return sum(s.with_cameras for s in self.shards)

    @property
    def keys(self) -> frozenset[str]:
        """The keys of the intact samples in the local shards."""
        return frozenset().union(*(s.keys for s in self.shards))

    def cameras_note(self) -> str:
        """How many scenes carry cameras, e.g. ``12 scene(s), none with cameras (unposed)``; empty without scenes."""
        if not self.scenes:
            return ""
        if self.with_cameras == self.scenes:
            return f"{self.scenes} scene(s), all with cameras"
        if self.with_cameras == 0:
            return f"{self.scenes} scene(s), none with cameras (unposed)"
        return f"{self.scenes} scene(s), {self.with_cameras} with cameras"

    def summary(self, name: str) -> str:
        """One line, e.g. ``training data: 4 shards, 512 samples`` (+ what is damaged or unknown)."""
        total = len(self.shards) + self.unknown
        of = f" of the {self.listed} info.json lists" if self.listed is not None and self.listed != self.samples else ""
        line = f"{name} data: {total} shard(s), {self.samples} intact sample(s){of}"
        if self.unknown:
            line += f" in {len(self.shards)} local shard(s), {self.unknown} not local (counted as they stream)"
        if self.cameras_note():
            line += f"; {self.cameras_note()}"
        for shard in self.damaged[:3]:
            line += f"; {shard.url} is damaged: {shard.damage}"
        if len(self.damaged) > 3:
            line += f"; {len(self.damaged) - 3} more damaged shard(s)"
        return line

    def refusal(self, batch_size: int) -> str | None:
        """Why training on these shards would mostly repeat a few samples, or ``None`` when it is fine."""
        if self.unknown or not self.damaged:
            return None
        if self.listed and self.samples < MIN_READABLE * self.listed:
            return f"only {self.samples} of the {self.listed} samples info.json lists are intact"
        if len(self.damaged) == len(self.shards) and self.samples < batch_size:
            return (
                f"every shard is damaged and the {self.samples} intact sample(s) do not fill one batch of {batch_size}"
            )
        return None


def check_training_data(inventory: SplitInventory, batch_size: int, strict: bool, arg_name: str) -> None:
    """Refuse a nearly broken training split (any damage when ``strict``), naming the shards."""
    reason = inventory.refusal(batch_size)
    if strict and inventory.damaged and reason is None:
        reason = f"{len(inventory.damaged)} shard(s) are damaged and strict=true"
    if reason is not None:
        raise ConfigError(
            f"{arg_name}: refusing to train: {reason} ({inventory.summary('training')}); the run would resample "
            "the few readable samples over and over. Repair or re-write the shards (selfsup3d data ...)"
        )
