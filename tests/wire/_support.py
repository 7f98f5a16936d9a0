"""Helpers shared by the wire tests (no conftest: these run on bare CPython 3.9 too)."""

import zlib
from collections.abc import Sequence
from typing import Optional

from guestbus.wire.framing import RS, TAG

HELLO_PARAMS = {"agent_version": "0.1.0", "capabilities": ["ping", "info"]}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def raw_frame(body: bytes, crc: Optional[int] = None) -> bytes:
    """A frame around arbitrary body bytes, with a correct CRC unless one is given."""
    value = zlib.crc32(body) if crc is None else crc
    return RS + TAG + b" %08x " % value + body + b"\n"


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    """``data`` cut at the given offsets (clamped, sorted, deduplicated)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]
