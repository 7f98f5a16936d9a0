"""Frames on a shared byte stream: ``RS "GB1" SP crc32-hex SP json LF``.

A serial port also carries kernel console output, boot noise and half-written frames from a
peer that went away, so the decoder must find frames inside garbage and never stall on it.
RS (0x1e) starts a frame because JSON text can never contain it (control characters are
escaped inside strings); LF ends it because compact JSON never contains one either. The
CRC catches what survives that: line noise and frames spliced with console output.

Everything here is sans-IO and bounded: the decoder holds at most ``max_frame`` bytes of one
frame, and looks at every input byte once, however the input is chunked.

For a person at a socket, ``python -m guestbus.wire`` writes and decodes frames.
"""

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

from .events import FrameDropped

RS = b"\x1e"
LF = b"\n"
TAG = b"GB1"
MAX_FRAME = 256 * 1024
HEADER_LEN = len(RS + TAG + b" 00000000 ")  # 14 bytes before the JSON
MIN_MAX_FRAME = 64

# Drop reasons at the framing layer (stable: they name metrics).
BAD_HEADER = "bad_header"
BAD_CHECKSUM = "bad_checksum"
BAD_JSON = "bad_json"
OVERSIZE = "oversize"
TRUNCATED = "truncated"
FRAME_DROP_REASONS = (BAD_HEADER, BAD_CHECKSUM, BAD_JSON, OVERSIZE, TRUNCATED)

_SEP = re.compile(b"[\x1e\n]")
_HEADER = re.compile(rb"GB1 ([0-9a-f]{8}) ")

_NOISE, _FRAME, _DISCARD = 0, 1, 2

DecodedItem = Union[Dict[str, Any], FrameDropped]


class FrameTooLarge(ValueError):
    """The encoded frame would exceed max_frame; nothing was sent."""

    def __init__(self, size: int, max_frame: int) -> None:
        super().__init__(f"frame of {size} bytes exceeds max_frame={max_frame}")
        self.size = size
        self.max_frame = max_frame


_ENCODER = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=True, sort_keys=False, allow_nan=False
)
"""What ``json.dumps`` with these options builds anew on every call: built once."""


def encode_frame(message: Dict[str, Any], max_frame: int = MAX_FRAME) -> bytes:
    """One complete frame for ``message``; TypeError/ValueError if it is not plain JSON."""
    if not isinstance(message, dict):
        raise TypeError(f"a frame carries a JSON object, not {type(message).__name__}")
    body = _ENCODER.encode(message).encode("ascii")
    size = HEADER_LEN + len(body) + 1
    if size > max_frame:
        raise FrameTooLarge(size, max_frame)
    return b"".join((RS, TAG, b" %08x " % zlib.crc32(body), body, LF))


@dataclass
class DecoderStats:
    frames_in: int = 0  # frames that passed framing (header, CRC, JSON object)
    bytes_in: int = 0  # every byte fed, frames and noise alike
    noise_bytes: int = 0  # bytes outside any frame: console output, garbage
    dropped: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(FRAME_DROP_REASONS, 0))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
"""What ``json.loads(..., parse_constant=...)`` builds anew on every call: built once."""


class FrameDecoder:
    """Feed bytes, get decoded JSON objects and FrameDropped records, in stream order.

    States: NOISE (outside a frame, skipping to RS), FRAME (collecting up to LF) and DISCARD
    (an oversize frame: skipping to RS or LF without keeping anything). An RS always starts
    a new frame, whatever the state, which is what makes resynchronisation automatic.
    """

    def __init__(self, max_frame: int = MAX_FRAME, stats: Optional[DecoderStats] = None) -> None:
        if max_frame < MIN_MAX_FRAME:
            raise ValueError(f"max_frame must be at least {MIN_MAX_FRAME}")
        self.max_frame = max_frame
        self.stats = stats if stats is not None else DecoderStats()
        self._state = _NOISE
        self._buf = bytearray()
        # Frame content kept between RS and LF: the frame minus RS and LF, plus one CR that
        # a tty in ONLCR mode may have inserted before the LF.
        self._limit = max_frame - 1

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held right now; never more than max_frame."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        return self._state != _NOISE

    def feed(self, data: bytes) -> List[DecodedItem]:
        out: List[DecodedItem] = []
        n = len(data)
        self.stats.bytes_in += n
        pos = 0
        while pos < n:
            if self._state == _NOISE:
                start = data.find(RS, pos)
                if start < 0:
                    self.stats.noise_bytes += n - pos
                    break
                self.stats.noise_bytes += start - pos
                self._state = _FRAME
                pos = start + 1
                continue
            m = _SEP.search(data, pos)
            end = n if m is None else m.start()
            if self._state == _FRAME:
                if len(self._buf) + (end - pos) > self._limit:
                    self._buf.clear()
                    self._state = _DISCARD
                    out.append(self._drop(OVERSIZE, f"frame exceeds max_frame={self.max_frame}"))
                else:
                    self._buf += data[pos:end]
            if m is None:
                break
            pos = end + 1
            if data[end] == 0x0A:  # LF ends the frame
                if self._state == _FRAME:
                    out.append(self._finish())
                self._state = _NOISE
            else:  # RS: a new frame starts, cutting short any frame in progress
                if self._state == _FRAME:
                    out.append(self._truncated())
                self._buf.clear()
                self._state = _FRAME
        return out

    def reset(self) -> List[FrameDropped]:
        """Forget a partial frame: its rest will never come (the peer reconnected)."""
        dropped = [self._truncated()] if self._state == _FRAME else []
        self._buf.clear()
        self._state = _NOISE
        return dropped

    def _drop(self, reason: str, detail: str) -> FrameDropped:
        self.stats.dropped[reason] = self.stats.dropped.get(reason, 0) + 1
        return FrameDropped(reason, detail)

    def _truncated(self) -> FrameDropped:
        return self._drop(TRUNCATED, f"frame cut after {len(self._buf) + 1} bytes")

    def _finish(self) -> DecodedItem:
        content = bytes(self._buf)
        self._buf.clear()
        if content.endswith(b"\r"):
            content = content[:-1]
        if len(content) + 2 > self.max_frame:
            return self._drop(OVERSIZE, f"frame exceeds max_frame={self.max_frame}")
        m = _HEADER.match(content)
        if m is None:
            return self._drop(BAD_HEADER, f"header {content[: HEADER_LEN - 1]!r}")
        body = content[m.end() :]
        crc = zlib.crc32(body)
        if crc != int(m.group(1), 16):
            return self._drop(BAD_CHECKSUM, f"crc32 {crc:08x}, header says {m.group(1).decode()}")
        try:
            obj = _DECODER.decode(body.decode("ascii"))
        except (ValueError, RecursionError) as exc:
            return self._drop(BAD_JSON, f"{type(exc).__name__}: {exc}"[:200])
        if not isinstance(obj, dict):
            return self._drop(BAD_JSON, f"JSON {type(obj).__name__} is not an object")
        self.stats.frames_in += 1
        return obj
