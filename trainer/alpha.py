"""The merge's alpha: its one validity check, and its JSON and labels (``"inf"``).

JSON has no infinity, so the evaluation reports, the export metadata and the pipeline's
artifacts write ``math.inf`` as the string ``"inf"``; ``alpha_from_json`` (``float``)
reads it back. No imports beyond ``math``: any package's CLI or config may use it.
"""

from __future__ import annotations

import math
from typing import Optional, Union

JsonAlpha = Union[float, str, None]


def alpha_to_json(alpha: Optional[float]) -> JsonAlpha:
    """``alpha`` as a JSON value: ``"inf"`` if infinite, else unchanged (None stays None)."""
    return "inf" if alpha is not None and math.isinf(alpha) else alpha


def alpha_from_json(value: Union[float, int, str]) -> float:
    """The float that ``alpha_to_json`` wrote (``"inf"`` -> ``math.inf``)."""
    return float(value)


def alpha_label(alpha: float) -> str:
    """``alpha`` as a short label for JSON keys and reports: ``"inf"`` or ``f"{alpha:g}"``."""
    return "inf" if math.isinf(alpha) else f"{alpha:g}"


def check_alpha(alpha: Union[float, int, str]) -> float:
    """``alpha`` as a float, checked: a number >= 0 or infinite (``"inf"`` accepted).

    Raises:
        ValueError: naming the bad value (NaN, negative, or not a number).
    """
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        raise ValueError(f"alpha must be a number >= 0 or inf, got {alpha!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"alpha must be a number >= 0 or inf, got {alpha!r}")
    return value
