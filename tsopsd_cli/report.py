"""Helpers for machine-readable reports."""

from __future__ import annotations

import math
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
