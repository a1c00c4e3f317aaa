"""How busy the machine was: the load averages every benchmark report records.

The project's machine is shared, and the same run varies about 1.3x in speed with its load,
so each report states the load average at its start and its end. The module imports only
the standard library, so light benchmark helpers can use it without TensorFlow.
"""

from __future__ import annotations

import os
from typing import List


def load_average() -> List[float]:
    """The machine's 1-, 5- and 15-minute load averages, rounded to two decimals."""
    return [round(x, 2) for x in os.getloadavg()]
