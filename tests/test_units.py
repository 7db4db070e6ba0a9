"""_units.parse_size: every hostile size is a ValueError/TypeError naming it, never an
OverflowError, never a huge echo."""
import math

import numpy as np
import pytest

from vramguard._units import GiB, fmt_bytes, parse_size, short_repr


@pytest.mark.parametrize("value,exc", [
    (float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError), (-1, ValueError),
    (-0.5, ValueError), (10 ** 400, ValueError), (-(10 ** 400), ValueError), (2 ** 63, ValueError),
    ("nan", ValueError), ("inf", ValueError), ("1e400", ValueError), ("9" * 400, ValueError),
    ("-1GB", ValueError), ("8 parsecs", ValueError), ("", ValueError), ("1" * 10_000_000, ValueError),
    (True, TypeError), (np.bool_(True), TypeError), (None, TypeError), ([1], TypeError), (1j, TypeError),
    (np.float64("nan"), ValueError), (np.int64(-3), ValueError),
])
def test_parse_size_rejects(value, exc):
    with pytest.raises(exc) as ei:
        parse_size(value, "reserve")
    msg = str(ei.value)
    assert msg.startswith("reserve") and len(msg) < 300, msg[:400]


def test_parse_size_bare_numbers_use_the_default_unit():
    assert parse_size(1.5, default_unit=GiB) == int(1.5 * GiB)
    assert parse_size(3, default_unit=GiB) == 3 * GiB
    assert parse_size(np.int64(2), default_unit=GiB) == 2 * GiB
    assert parse_size(np.float32(0.5), default_unit=GiB) == GiB // 2
    assert parse_size("512MiB") == 512 << 20 and parse_size("8GB") == 8 * GiB
    assert parse_size(10 ** 18) == 10 ** 18
    with pytest.raises(ValueError, match="absurdly large"):
        parse_size(10 ** 10, default_unit=GiB)  # exact: no float rounding below the limit


def test_nan_reserve_gb_like_the_set_reserve_node():
    """The Set Reserve node passes a float in GB: NaN must fail at validation."""
    with pytest.raises(ValueError, match="reserve_gb"):
        parse_size(float("nan"), "reserve_gb", default_unit=GiB)
    assert not math.isnan(parse_size(0.0, "reserve_gb", default_unit=GiB))


def test_short_repr_and_fmt_bytes():
    assert len(short_repr("x" * 10_000_000)) == 80
    assert "digits" in short_repr(10 ** 400)
    assert fmt_bytes(905216) == "884.00 KiB" and fmt_bytes(None) == "-"
