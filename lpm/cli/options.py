"""Parsing of repeated ``NAME=VALUE`` options shared by the commands (``--set``, ``--context``)."""

from __future__ import annotations

import math
from typing import Any

from lpm.errors import InputError


def parse_pairs(pairs: list[str], option: str, example: str) -> dict[str, Any]:
    """``["week=10", "cases=2300", "trend=rising"]`` -> ``{"week": 10, "cases": 2300, "trend": "rising"}``.

    Values that read as an int or a float become numbers (finite only); anything else stays text. option
    and example name the option in errors (``--set``, ``beta=0.05``).
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"{option} {pair!r}: expected NAME=VALUE, e.g. {option} {example}")
        value: Any = text.strip()
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{option} {pair!r}: the value must be finite")
        out[name] = value
    return out
