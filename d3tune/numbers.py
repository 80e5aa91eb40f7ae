"""How d3tune writes numbers in tables: one formatter for reports, summaries and statistics.

Why a base module: statistics (``stats``) describe comparisons in words and reports render
tables; both must print 32 as 32 and a radius of 2.0 as 2.0, and statistics must not reach up
into the report layer to do it.
"""
from __future__ import annotations

from typing import Any

import pandas as pd


def fmt(v: Any) -> str:
    """Integers as integers (32, not 32.0), floats as short decimals that stay recognisably
    floats (a radius of 2.0), missing as an empty cell."""
    if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) or (hasattr(v, "dtype") and getattr(v.dtype, "kind", "") in "iu"):
        return str(int(v))
    if isinstance(v, float) or hasattr(v, "dtype"):
        text = f"{float(v):.4g}"
        return text if any(c in text for c in ".enai") else text + ".0"  # 2.0 stays a float
    return str(v)


def fixed(v: Any, digits: int = 3) -> str:
    """A figure with a fixed number of decimals (0.903), missing as '-': the robust and
    leaderboard reports' tables."""
    if v is None or v is pd.NA or (isinstance(v, float) and v != v):
        return "-"
    return f"{v:.{digits}f}"


__all__ = ["fmt", "fixed"]
