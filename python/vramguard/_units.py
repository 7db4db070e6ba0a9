"""Byte sizes: parsing user input ("8GB", "512MiB", 1.5) and printing it.

GB means 2**30 bytes here, as in ComfyUI's --reserve-vram and in how cards are sold
("an 8 GB card" has 8192 MiB).
"""
from __future__ import annotations

import math
import re
import sys

__all__ = ["parse_size", "fmt_bytes", "short_repr", "GiB", "MiB"]

MiB = 1 << 20
GiB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB,
          "mib": MiB, "g": GiB, "gb": GiB, "gib": GiB, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
_RX = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def short_repr(value: object, limit: int = 80) -> str:
    """repr(value) cut to `limit` characters: error messages never echo a huge value."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"<int of {len(str(abs(value)))} digits>" if value.bit_length() < 40000 else "<huge int>"
    try:
        r = repr(value)
    except Exception:
        r = f"<{type(value).__name__}>"
    return r if len(r) <= limit else r[:limit - 3] + "..."


_MAX_BYTES = 9 * 10 ** 18  # below 2**63: every size fits the C core's int64


def parse_size(value: int | float | str, what: str = "size", default_unit: int = 1) -> int:
    """Bytes from an int, a float or a string with an optional unit.

    A bare number means `default_unit` bytes each (the CLI passes GiB).  Rejects negative,
    non-finite, absurdly large (> 9e18 bytes) and non-numeric values with a ValueError or
    TypeError that names the value (cut to 80 characters).
    """
    if isinstance(value, (bool, _np_bool_types())):
        raise TypeError(f"{what} must be a size, got bool {value!r}")
    if isinstance(value, int) or _is_np_int(value):
        v = int(value)
        if v < 0:
            raise ValueError(f"{what} must be a finite size >= 0, got {short_repr(value)}")
        # exact integer arithmetic: a 400-digit int must not reach float() (OverflowError)
        if v > _MAX_BYTES // max(default_unit, 1):
            raise ValueError(f"{what} is absurdly large (more than 9e18 bytes): {short_repr(value)}")
        return v * default_unit
    if isinstance(value, float) or _is_np_float(value):
        x = float(value) * default_unit
    elif isinstance(value, str):
        if len(value) > 64:
            raise ValueError(f"{what}: cannot parse {short_repr(value)} as a size (e.g. '8GB', '512MiB', '1.5')")
        m = _RX.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"{what}: cannot parse {short_repr(value)} as a size (e.g. '8GB', '512MiB', '1.5')")
        unit = _UNITS[m.group(2).lower()] if m.group(2) else default_unit
        x = float(m.group(1)) * unit
    else:
        raise TypeError(f"{what} must be an int, float or str, got {type(value).__name__} {short_repr(value)}")
    if not math.isfinite(x) or x < 0:
        raise ValueError(f"{what} must be a finite size >= 0, got {short_repr(value)}")
    if x > _MAX_BYTES:
        raise ValueError(f"{what} is absurdly large (more than 9e18 bytes): {short_repr(value)}")
    return int(x)


def _np_bool_types() -> tuple:
    np = sys.modules.get("numpy")
    return (np.bool_,) if np is not None else ()


def _is_np_int(value: object) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.integer)


def _is_np_float(value: object) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.floating)


def fmt_bytes(n: int | None) -> str:
    """'7.93 GiB' style; '-' for unknown."""
    if n is None:
        return "-"
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
