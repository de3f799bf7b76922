"""Helpers for reports: JSON-safe values, the optional matplotlib, training curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def json_safe(obj: Any) -> Any:
    """Replace NaN/inf (not valid JSON) by None, recursively; tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when the `plots` extra is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_curves(rows: list[dict], keys: list[tuple[str, str]], path: Path, phases: list[tuple[int, int]] = ()) -> bool:
    """One PNG with a panel per (key, label) over steps; `phases`: (first, last) step spans shaded in every panel
    (the reheat phases of a thermostat run). False when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2))
    axes = axes if len(keys) > 1 else [axes]
    for ax, (key, label) in zip(axes, keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None)
        for first, last in phases:
            ax.axvspan(first - 0.5, last + 0.5, color="tab:red", alpha=0.12, lw=0)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
