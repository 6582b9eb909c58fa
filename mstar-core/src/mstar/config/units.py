"""Human units for settings: sizes (`50GB`, `512MiB`) and durations (`7d`, `1h`).

Cache limits are written by people, in YAML, environment variables and flags; these
parsers turn them into bytes and seconds, and name the accepted forms when a value is not
one of them, so a typo is an error at start rather than a limit nobody meant.
"""

from __future__ import annotations

import math
import re

_SIZE_UNITS = {"": 1, "B": 1,
               "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_DURATION_UNITS = {"": 1, "S": 1, "M": 60, "H": 3600, "D": 86400, "W": 7 * 86400}
_NUMBER_UNIT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")

SIZE_FORMS = "a byte count or a number with B, KB, MB, GB, TB (x1000) or KiB, MiB, GiB, TiB (x1024)"
DURATION_FORMS = "seconds or a number with s, m, h, d or w (e.g. 90s, 30m, 1h, 7d)"


def _number_and_unit(value: object, units: dict[str, int], forms: str,
                     what: str) -> tuple[float, int]:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a {what}; expected {forms}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{value!r} is not a {what}; expected {forms}")
        return float(value), 1
    match = _NUMBER_UNIT.fullmatch(str(value))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in units:
        raise ValueError(f"{value!r} is not a {what}; expected {forms}")
    return float(match.group(1)), units[unit]


def parse_size(value: str | int | float) -> int:
    """Bytes in `value`: a plain (non-negative) number of bytes, or a number with a
    decimal (KB, MB, GB, TB) or binary (KiB, MiB, GiB, TiB) unit, any case, e.g. `50GB`,
    `1.5 GiB`. Raises `ValueError` naming the value and the accepted forms."""
    number, scale = _number_and_unit(value, _SIZE_UNITS, SIZE_FORMS, "size")
    return round(number * scale)


def parse_duration(value: str | int | float) -> float:
    """Seconds in `value`: a plain (non-negative) number of seconds, or a number with s, m,
    h, d or w, any case, e.g. `7d`, `1.5h`. Raises `ValueError` naming the value and the
    accepted forms."""
    number, scale = _number_and_unit(value, _DURATION_UNITS, DURATION_FORMS, "duration")
    return number * scale


def format_size(count: int) -> str:
    """`count` bytes for people, in the decimal units `parse_size` reads back (`1.5GB`)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if count >= scale:
            return f"{count / scale:.1f}{unit}"
    return f"{count}B"
