"""The probe report: a Markdown table (encoders side by side, with the chance row), the JSON, the bar chart.

The report is a plain dict (what ``selfsup3d probe --out`` writes)::

    {"format": "selfsup3d-probe", "version": 1, "protocol": {...}, "split": {...},
     "chance": {metric: value}, "encoders": [{"label", "spec", "kind", "info", "metrics", "seconds"}]}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from selfsup3d.eval.suite import METRICS

HEADERS: dict[str, str] = {
    "corr@0.025": "corr@2.5%",
    "corr@0.05": "corr@5%",
    "corr@0.1": "corr@10%",
    "depth_rmse": "depth RMSE↓",
    "depth_absrel": "AbsRel↓",
    "depth_delta1": "δ<1.25",
    "normal_deg": "normal°↓",
    "pose_rot_auc30": "rot AUC30",
    "pose_trans_auc30": "transl AUC30",
    "linear_acc": "linear",
    "knn_acc": "kNN",
    "retrieval_top1": "retrieval@1",
}
_HIGHER = {key: higher for key, _, higher in METRICS}


def _fmt(value: float | None, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in ("normal_deg",):
        return f"{value:.1f}"
    return f"{value:.3f}"


def table_keys(report: dict[str, Any]) -> list[str]:
    """The table's metric keys that at least one row has."""
    rows = [e["metrics"] for e in report["encoders"]] + [report.get("chance", {})]
    return [key for key, _, _ in METRICS if any(key in r for r in rows)]


def markdown_table(report: dict[str, Any], seconds: bool = True) -> str:
    """Encoders side by side (one row each, then ``chance``); ↓ marks metrics where lower is better."""
    keys = table_keys(report)
    header = ["encoder"] + [HEADERS.get(k, k) for k in keys] + (["s"] if seconds else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for enc in report["encoders"]:
        cells = [enc["label"]] + [_fmt(enc["metrics"].get(k), k) for k in keys]
        if seconds:
            cells.append(f"{enc.get('seconds', float('nan')):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    chance = report.get("chance")
    if chance:
        cells = ["*chance*"] + [_fmt(chance.get(k), k) for k in keys] + ([""] if seconds else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rotation_table(report: dict[str, Any], threshold: str = "0.05") -> str:
    """Correspondence recall at one threshold per relative-rotation bin (columns), encoders as rows."""
    bins = [k.split("/", 1)[1] for k in report["encoders"][0]["metrics"] if k.startswith(f"corr@{threshold}/")]
    if not bins:
        return ""
    header = ["encoder"] + [b.replace("rot", "").replace("-", "–") + "°" for b in bins]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(bins)) + "|"]
    for enc in report["encoders"]:
        cells = [enc["label"]] + [_fmt(enc["metrics"].get(f"corr@{threshold}/{b}"), "") for b in bins]
        lines.append("| " + " | ".join(cells) + " |")
    counts = report["encoders"][0]["metrics"]
    lines.append("| *matches* | " + " | ".join(f"{counts.get(f'corr_matches/{b}', 0):.0f}" for b in bins) + " |")
    return "\n".join(lines)


def protocol_text(report: dict[str, Any]) -> str:
    """The header printed above the table: resolution, thresholds, inputs, splits."""
    p, s = report["protocol"], report["split"]
    h, w = p["image_size"]
    px = ", ".join(f"{t * 100:g}% = {t * max(h, w):.1f} px" for t in p["thresholds"])
    inputs = "; ".join(
        f"{e['label']}: {'x'.join(map(str, e['info']['input_size'])) if e['info'].get('input_size') else 'native'}"
        for e in report["encoders"]
    )
    return "\n".join(
        [
            f"probes at {h}x{w} pixels (every encoder's dense features sampled bilinearly at pixel centres); "
            f"{p['views']} views per scene",
            f"correspondence thresholds (fractions of the longer side): {px}; {p['num_queries']} queries, top "
            f"{p['num_matches']} kept per pair",
            f"encoder input sizes: {inputs}",
            f"depth: {'scale-free (median-aligned)' if p['depth_align'] == 'median' else 'metric'}; seed {p['seed']}",
            f"split ({s['rule']}): test {s['test']['scenes']} scenes / {s['test']['groups']} objects from --data; "
            f"probe-train {s['probe']['scenes']} scenes / {s['probe']['groups']} objects from "
            f"--{s['probe']['from'].replace('_', '-')} ({s['probe']['dropped_shared_groups']} dropped: their "
            "object is in the test split)",
        ]
    )


def write_json(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as indented JSON (NaN written as null)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean(report), indent=2) + "\n")
    return path


def bar_chart(
    rows: Sequence[tuple[str, dict[str, float]]], chance: dict[str, float] | None = None, keys: Sequence[str] = ()
) -> Any:
    """One panel per metric, a bar per encoder side by side, chance as a dashed line.

    Args:
        rows: ``(label, metrics)`` per encoder.
        chance: chance level per metric (optional).
        keys: metrics to draw (default: every table metric that a row has).

    Returns:
        a matplotlib ``Figure`` (Agg backend; the caller saves or logs it).
    """
    from matplotlib.figure import Figure

    keys = list(keys) or [k for k, _, _ in METRICS if any(k in m for _, m in rows)]
    cols = min(4, max(1, len(keys)))
    nrows = max(1, math.ceil(len(keys) / cols))
    fig = Figure(figsize=(3.2 * cols, 2.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, cols, squeeze=False).flatten()
    colours = [f"C{i % 10}" for i in range(len(rows))]
    for ax, key in zip(axes, keys):
        values = [m.get(key, float("nan")) for _, m in rows]
        ax.bar(range(len(rows)), [0 if math.isnan(v) else v for v in values], color=colours)
        if chance and key in chance and not math.isnan(chance[key]):
            ax.axhline(chance[key], color="k", linestyle="--", linewidth=1)
        title = HEADERS.get(key, key)
        ax.set_title(title if not _HIGHER.get(key, True) else f"{title} ↑", fontsize=9)
        ax.set_xticks([])
        ax.tick_params(labelsize=7)
    for ax in axes[len(keys) :]:
        ax.axis("off")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    legend = [Patch(color=c, label=label) for c, (label, _) in zip(colours, rows)]
    if chance:
        legend.append(Line2D([0], [0], color="k", linestyle="--", label="chance"))
    fig.legend(handles=legend, loc="outside lower center", ncols=min(len(legend), 4), fontsize=8)
    return fig


def save_chart(report: dict[str, Any], path: str | Path) -> Path:
    """The report's bar chart as a PNG."""
    rows = [(e["label"], e["metrics"]) for e in report["encoders"]]
    fig = bar_chart(rows, report.get("chance"), table_keys(report))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
