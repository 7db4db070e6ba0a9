"""Byte sizes: parsing user input ("8GB", "512MiB", 1.5) and printing it.

GB means 2**30 bytes here, as in ComfyUI's --reserve-vram and in how cards are sold
("an 8 GB card" has 8192 MiB).
"""
from __future__ import annotations

import math
import re

__all__ = ["parse_size", "fmt_bytes", "GiB", "MiB"]

MiB = 1 << 20
GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB,
          "mib": MiB, "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_RX = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str, what: str = "size", default_unit: int = 1) -> int:
    """Bytes from an int, a float or a string with an optional unit.

    A bare number means `default_unit` bytes each (the CLI passes GiB).  Rejects negative,
    non-finite and non-numeric values with an error that names the value.
    """
    if isinstance(value, bool):
        raise TypeError(f"{what} must be a size, got bool {value!r}")
    if isinstance(value, (int, float)):
        x = float(value) * default_unit
    elif isinstance(value, str):
        m = _RX.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: cannot parse {value!r} as a size (e.g. '8GB', '512MiB', '1.5')")
        unit = _UNITS[m.group(2).lower()] if m.group(2) else default_unit
        x = float(m.group(1)) * unit
    else:
        raise TypeError(f"{what} must be an int, float or str, got {type(value).__name__} {value!r}")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{what} must be a finite size >= 0, got {value!r}")
    if x > 9e18:
        raise ValueError(f"{what} is absurdly large: {value!r}")
    return int(x)


def fmt_bytes(n: int | None) -> str:
    """'7.93 GiB' style; '-' for unknown."""
    if n is None:
        return "-"
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
