"""The merge's alpha in JSON and in labels: an infinite alpha is written ``"inf"``.

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
