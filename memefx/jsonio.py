"""JSON that strict parsers accept: non-finite floats (NaN, inf: an AUROC of a one-class split, an
undefined SE) are written as ``null``. Python's ``json`` writes bare ``NaN`` tokens, which jq, JavaScript
and most other readers reject."""

from __future__ import annotations

import json
import math


def finite(obj):
    """``obj`` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of ``finite(obj)``; refuses (ValueError) anything else non-finite it would write."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
