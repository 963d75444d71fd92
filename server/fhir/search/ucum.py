"""UCUM units brought to a canonical form, so `mg/dL` and `g/L` compare as one dimension.

The conversion itself is ucumvert's (a maintained UCUM grammar over pint's unit
registry); this module only caches, per unit code, the linear map to base units
(`base = value * factor + offset`, offset being non-zero for Cel and [degF]) and the name
of the base unit, because pint's arithmetic is far too slow to run per indexed value.
"""

from __future__ import annotations

import math
from functools import lru_cache

from terminology.builtin import ucum_bounded, ucum_registry


@lru_cache(maxsize=4096)
def _linear(code: str) -> tuple[float, float, str] | None:
    """(factor, offset, canonical unit) for a UCUM code, or None if it is not UCUM."""
    if not code or len(code) > 64 or not ucum_bounded(code):
        return None
    ucum = ucum_registry()
    try:
        parsed = ucum.from_ucum(code)
        units = getattr(parsed, "units", None)
        if units is None:  # a bare annotation such as {score} is the unity
            return 1.0, 0.0, "1"
        zero = ucum.Quantity(0.0, units).to_base_units()
        one = ucum.Quantity(1.0, units).to_base_units()
    except Exception:  # ucumvert and pint raise many kinds of parse and dimension errors
        return None
    factor = float(one.magnitude) - float(zero.magnitude)
    offset = float(zero.magnitude)
    if not math.isfinite(factor) or factor == 0:
        return None
    name = str(one.units) or "1"
    return factor, offset, "1" if name == "dimensionless" else name


def canonical(value: float, code: str) -> tuple[float, str] | None:
    """The value in canonical base units and the name of that unit (None: not UCUM)."""
    linear = _linear(code)
    if linear is None:
        return None
    factor, offset, unit = linear
    return value * factor + offset, unit


def canonical_range(low: float, high: float, code: str) -> tuple[float, float, str] | None:
    linear = _linear(code)
    if linear is None:
        return None
    factor, offset, unit = linear
    a, b = low * factor + offset, high * factor + offset
    return (min(a, b), max(a, b), unit)
