"""Byte sizes as people type them: `2GiB`, `512MB`, `1.5G`, or a share of a total such as `25%`."""
from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str, total: int | None = None) -> int:
    """Bytes for `text`; a percentage needs `total` (the bytes it is a share of)."""
    s = str(text).strip().lower().replace(" ", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)(%|[a-z]*)", s)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 2GiB, 512MB or 25%)")
    value, unit = float(m.group(1)), m.group(2)
    if unit == "%":
        if total is None:
            raise ValueError(f"{text!r} is a share, but there is no total to take it of")
        if not 0 <= value <= 100:
            raise ValueError(f"share out of range: {text!r}")
        return int(total * value / 100.0)
    if unit not in _UNITS:
        raise ValueError(f"unknown size unit in {text!r}")
    return int(value * _UNITS[unit])
