"""Reading loosely typed values (table cells, JSON fields, query parameters) the one way every stage does."""

from __future__ import annotations

import math
from typing import Any


def finite_float(value: Any) -> float | None:
    """``value`` as a finite float, else None: missing, text that is not a number, NaN, ±inf and booleans
    (a flag is not a number, although Python's ``float(True)`` is 1.0) all give None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
