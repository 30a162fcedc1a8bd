"""Rate limits and annotation budgets per upload group: `GROUP=N/minute`, `N/hour`, `N/day`.

Limits count deliveries recorded in the outbox (`delivered`), so they hold across uploader
restarts. `*` as the group applies a limit to every group without its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from triton_al.config import validate_group_name

WINDOWS = {"s": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}
_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")


@dataclass(frozen=True)
class RateLimit:
    count: int
    window_s: float

    def __str__(self) -> str:
        unit = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}.get(int(self.window_s), f"{self.window_s}s")
        return f"{self.count}/{unit}"


def parse_limit(text: str) -> RateLimit:
    m = _LIMIT.match(text.lower())
    if not m or m.group(2) not in WINDOWS:
        raise ValueError(f"rate limit {text!r}: expected N/second, N/minute, N/hour or N/day")
    return RateLimit(int(m.group(1)), float(WINDOWS[m.group(2)]))


def parse_limits(specs: Iterable[str]) -> dict[str, list[RateLimit]]:
    """Parse `GROUP=N/unit[,N/unit...]` options (repeatable) into limits per group."""
    limits: dict[str, list[RateLimit]] = {}
    for spec in specs:
        group, sep, rest = spec.partition("=")
        if not sep or not rest.strip():
            raise ValueError(f"--rate-limit {spec!r}: expected GROUP=N/minute (or N/hour, N/day; several comma-separated)")
        group = group.strip()
        if group != "*":
            validate_group_name(group)
        limits.setdefault(group, []).extend(parse_limit(part) for part in rest.split(","))
    return limits


def limits_for(limits: dict[str, list[RateLimit]], group: str) -> list[RateLimit]:
    return limits.get(group, limits.get("*", []))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `12h`, `7d`, `2w` -> seconds."""
    m = _DURATION.match(str(text).lower())
    if not m or m.group(2) not in _DURATION_UNITS:
        raise ValueError(f"duration {text!r}: expected a number with s, m, h, d or w (e.g. 7d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str) -> int:
    """`1048576`, `512KiB`, `32MiB`, `2GiB` (or kB, MB, GB) -> bytes."""
    m = _SIZE.match(str(text).lower())
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"size {text!r}: expected bytes, or a number with KiB, MiB, GiB (or kB, MB, GB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
