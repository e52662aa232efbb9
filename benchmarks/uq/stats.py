"""Summary statistics of the report: mean and sample standard deviation over seeds."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple


def mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample std (n − 1; 0 for one value) of the finite values, ``(None, None)``
    when there is none."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    m = sum(v) / len(v)
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, s
