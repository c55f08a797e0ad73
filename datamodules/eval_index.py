"""The papers' test protocols: an evaluation index names, per scene, the context and target views to score.

pixelSplat's ``assets/evaluation_index_re10k.json`` (and ``_acid``), which LVSM and the works after it reuse, is
``{scene_key: {"context": [i, j], "target": [k, l, m]} | null}``: view indices are frames of the source scene (view
``i`` of a scene converted by ``selfsup3d data convert re10k`` is its frame ``i``), ``null`` marks a scene left out
of the protocol. :class:`~selfsup3d.datamodules.MultiViewShards` with ``eval_index`` validates exactly those scenes
and views, context first, and says how many entries it found in the validation shards.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from selfsup3d.datamodules.format import make_key
from selfsup3d.errors import ConfigError


@dataclass(frozen=True)
class EvalIndex:
    """An evaluation index: ``views[key]`` = context then target view indices; ``nulls`` entries were ``null``."""

    path: str
    views: dict[str, list[int]]
    num_context: int
    num_target: int
    nulls: int

    @property
    def num_views(self) -> int:
        return self.num_context + self.num_target

    def report(self, keys: frozenset[str] | None) -> tuple[str, int | None]:
        """One line saying what the index holds and how many of its scenes ``keys`` (the validation shards' scene
        keys; ``None`` when they are not known, e.g. remote shards) hold, and how many are missing."""
        line = f"evaluation index {self.path}: {len(self.views) + self.nulls} entries, {len(self.views)} scored"
        line += f" ({self.num_context} context + {self.num_target} target views)"
        line += f", {self.nulls} null skipped" if self.nulls else ""
        if keys is None:
            return line + "; the validation shards are not local, so missing scenes are not counted", None
        missing = sorted(set(self.views) - keys)
        line += f"; {len(self.views) - len(missing)} found in the validation shards, {len(missing)} missing"
        if missing:
            line += f" (e.g. {', '.join(missing[:3])})"
        return line, len(missing)


def _view_list(value: object, where: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(v, int) and v >= 0 for v in value):
        raise ConfigError(f"{where} must be a non-empty list of view indices (integers >= 0), got {value!r}")
    return list(value)


def read_eval_index(path: str, arg: str) -> EvalIndex:
    """Read and check an evaluation index (keys normalised with :func:`~selfsup3d.datamodules.format.make_key`, as
    the converters name scenes).

    Raises:
        ConfigError: naming ``arg`` and the problem: a missing file, bad JSON, an entry without ``context`` or
            ``target`` lists, entries with different view counts, views both context and target, or no entry.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{arg}: {path} does not exist") from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"{arg}: {path} is not a readable JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{arg}: {path} must map scene keys to {{'context': [...], 'target': [...]}} or null")
    views: dict[str, list[int]] = {}
    counts: set[tuple[int, int]] = set()
    nulls = 0
    for key, entry in data.items():
        if entry is None:
            nulls += 1
            continue
        where = f"{arg}: {path}, scene {key!r}"
        if not isinstance(entry, dict) or "context" not in entry or "target" not in entry:
            raise ConfigError(f"{where}: an entry must be {{'context': [...], 'target': [...]}} or null")
        context, target = (
            _view_list(entry["context"], f"{where}: context"),
            _view_list(entry["target"], f"{where}: target"),
        )
        if set(context) & set(target):
            raise ConfigError(f"{where}: views {sorted(set(context) & set(target))} are both context and target")
        counts.add((len(context), len(target)))
        views[make_key(key)] = context + target
    if not views:
        raise ConfigError(f"{arg}: {path} has no scene to score (every entry is null)")
    if len(counts) > 1:
        raise ConfigError(f"{arg}: {path} mixes view counts (context, target) {sorted(counts)}; a batch needs one")
    (num_context, num_target) = counts.pop()
    return EvalIndex(str(path), views, num_context, num_target, nulls)
