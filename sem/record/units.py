"""How durations read in logs, reports and the dry-run calendar."""

from __future__ import annotations

import math
from typing import Any


def fmt_duration(seconds: Any) -> str:
    """``12.3 s``, ``4m05s``, ``2h03m``; ``-`` for anything that is not a finite number."""
    if not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"
