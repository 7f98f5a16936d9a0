import re
import zlib
from typing import Any, Optional

import pytest

from guestbus.wire import framing
from guestbus.wire.events import FrameDropped
from guestbus.wire.framing import (
    BAD_CHECKSUM,
    BAD_HEADER,
    BAD_JSON,
    HEADER_LEN,
    MAX_FRAME,
    OVERSIZE,
    TRUNCATED,
    FrameDecoder,
    FrameTooLarge,
    encode_frame,
)

from ._support import raw_frame, split

PING = {"kind": "req", "id": "a1f3-1", "method": "ping", "params": {}, "deadline_ms": 5000}
PONG = {"kind": "res", "id": "a1f3-1", "result": {"pong": True}}
CONSOLE = b"[   12.345678] EXT4-fs (vda1): mounted filesystem\r\n"


def reasons(items: list[Any]) -> list[str]:
    return [i.reason if isinstance(i, FrameDropped) else "msg" for i in items]


def test_encode_layout_matches_the_spec_example() -> None:
    body = b'{"kind":"req","id":"a1f3-1","method":"ping","params":{},"deadline_ms":5000}'
    assert zlib.crc32(body) == 0x7596DB29
    assert encode_frame(PING) == b"\x1eGB1 7596db29 " + body + b"\n"
    assert HEADER_LEN == 14


def test_encode_is_compact_ascii_and_escapes_separators() -> None:
    data = encode_frame({"kind": "evt", "method": "x", "params": {"s": "é\x1e\n", "n": [1, 2]}})
    assert data.count(b"\x1e") == 1 and data.startswith(b"\x1e")
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    assert all(b < 0x80 for b in data)
    assert b'"s":"\\u00e9\\u001e\\n","n":[1,2]' in data


def test_encode_refuses_non_json() -> None:
    with pytest.raises(TypeError):
        encode_frame([1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        encode_frame({"x": float("nan")})
    with pytest.raises(TypeError):
        encode_frame({"x": object()})


def _sized(size: int) -> dict[str, Any]:
    """An event whose frame is exactly ``size`` bytes."""
    base = len(encode_frame({"kind": "evt", "method": "x", "params": {"p": ""}}))
    return {"kind": "evt", "method": "x", "params": {"p": "a" * (size - base)}}


def test_encode_enforces_max_frame_exactly() -> None:
    assert len(encode_frame(_sized(4096), max_frame=4096)) == 4096
    with pytest.raises(FrameTooLarge) as info:
        encode_frame(_sized(4097), max_frame=4096)
    assert info.value.size == 4097 and info.value.max_frame == 4096
    assert isinstance(info.value, ValueError)


def test_decoder_accepts_exactly_max_frame_and_drops_one_more() -> None:
    dec = FrameDecoder(max_frame=4096)
    fits = encode_frame(_sized(4096), max_frame=4096)
    assert dec.feed(fits) == [_sized(4096)]
    # A tty in ONLCR mode adds CR before LF; the limit does not count it.
    assert dec.feed(fits[:-1] + b"\r\n") == [_sized(4096)]
    too_big = encode_frame(_sized(4097), max_frame=8192)
    assert reasons(dec.feed(too_big + fits)) == [OVERSIZE, "msg"]


def test_decodes_many_frames_in_one_chunk_and_byte_by_byte() -> None:
    stream = encode_frame(PING) + encode_frame(PONG)
    assert FrameDecoder().feed(stream) == [PING, PONG]
    dec = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += dec.feed(stream[i : i + 1])
    assert out == [PING, PONG]
    assert dec.stats.frames_in == 2
    assert dec.stats.bytes_in == len(stream)
    assert dec.stats.noise_bytes == 0


def test_resync_after_garbage() -> None:
    garbage = b"\x00\xff\xfe binary junk\n{not a frame}\nGB1 00000000 {}\n\r\n\x07"
    dec = FrameDecoder()
    assert dec.feed(garbage + encode_frame(PING)) == [PING]
    assert dec.stats.noise_bytes == len(garbage)
    assert sum(dec.stats.dropped.values()) == 0


def test_resync_after_truncated_frame() -> None:
    dec = FrameDecoder()
    out = dec.feed(encode_frame(PING)[:30] + encode_frame(PONG))
    assert out == [FrameDropped(TRUNCATED, "frame cut after 30 bytes"), PONG]
    assert dec.stats.dropped[TRUNCATED] == 1


def test_resync_after_kernel_console_line() -> None:
    dec = FrameDecoder()
    frame = encode_frame(PING)
    # Between frames: console output is noise.
    assert dec.feed(CONSOLE + frame + CONSOLE + CONSOLE + frame) == [PING, PING]
    assert dec.stats.noise_bytes == 3 * len(CONSOLE)
    # Spliced into a frame: the console line's LF ends that frame, the CRC rejects it, the
    # frame's tail is noise, and the next frame decodes.
    out = dec.feed(frame[:40] + CONSOLE + frame[40:] + encode_frame(PONG))
    assert reasons(out) == [BAD_CHECKSUM, "msg"]
    assert out[-1] == PONG


def test_resync_after_host_reconnect_mid_frame() -> None:
    frame = encode_frame(PING)
    # The reader sees the old connection end, resets, and the new connection starts clean.
    dec = FrameDecoder()
    assert dec.feed(frame[:50]) == []
    assert dec.reset() == [FrameDropped(TRUNCATED, "frame cut after 50 bytes")]
    assert dec.feed(encode_frame(PONG)) == [PONG]
    # Nobody told the reader: the new peer's first RS cuts the partial frame short.
    dec = FrameDecoder()
    assert reasons(dec.feed(frame[:50])) == []
    assert reasons(dec.feed(CONSOLE[:10] + encode_frame(PONG))) == [TRUNCATED, "msg"]
    assert dec.stats.dropped[TRUNCATED] == 1
    # A reset outside a frame drops nothing.
    assert dec.reset() == []


def test_bad_checksum_counted_and_dropped() -> None:
    frame = encode_frame(PING).replace(b'"ping"', b'"pong"')
    dec = FrameDecoder()
    out = dec.feed(frame + encode_frame(PONG))
    assert reasons(out) == [BAD_CHECKSUM, "msg"]
    assert dec.stats.dropped[BAD_CHECKSUM] == 1
    assert dec.stats.frames_in == 1


@pytest.mark.parametrize(
    "frame",
    [
        b"\x1e\n",
        b"\x1eGB2 00000000 {}\n",
        b"\x1eGB1 0000000A {}\n",  # hex must be lowercase
        b"\x1eGB1 0000000 {}\n",
        b"\x1eGB1  00000000 {}\n",
        b"\x1egb1 00000000 {}\n",
    ],
)
def test_bad_header(frame: bytes) -> None:
    dec = FrameDecoder()
    assert reasons(dec.feed(frame + encode_frame(PING))) == [BAD_HEADER, "msg"]
    assert dec.stats.dropped[BAD_HEADER] == 1


@pytest.mark.parametrize(
    "body",
    [
        b"[1,2]",
        b'"text"',
        b"{bad",
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":"\xc3\xa9"}',  # JSON on the wire is ASCII only
        b"",
        b"[" * 100_000,  # nesting deep enough to exhaust the parser's recursion
    ],
)
def test_bad_json(body: bytes) -> None:
    dec = FrameDecoder()
    assert reasons(dec.feed(raw_frame(body) + encode_frame(PING))) == [BAD_JSON, "msg"]
    assert dec.stats.dropped[BAD_JSON] == 1


def test_oversize_dropped_while_reading() -> None:
    dec = FrameDecoder(max_frame=4096)
    flood = b"\x1e" + b"a" * (1 << 20)
    out = []
    for chunk in split(flood, range(0, len(flood), 1000)):
        out += dec.feed(chunk)
        assert dec.buffered <= 4096
    assert out == [FrameDropped(OVERSIZE, "frame exceeds max_frame=4096")]
    assert dec.buffered == 0  # discarding, not buffering
    assert dec.feed(b"aaaa\n" + encode_frame(PING)) == [PING]
    assert dec.stats.dropped[OVERSIZE] == 1
    assert dec.stats.noise_bytes == 0


def test_oversize_in_a_single_chunk_and_cut_by_rs() -> None:
    dec = FrameDecoder(max_frame=4096)
    flood = b"\x1e" + b"a" * 10_000
    assert reasons(dec.feed(flood + b"\n" + encode_frame(PING))) == [OVERSIZE, "msg"]
    assert reasons(dec.feed(flood + encode_frame(PING))) == [OVERSIZE, "msg"]
    assert dec.buffered == 0


def test_flood_without_separators_stays_small() -> None:
    # Bounded memory is what makes the scan linear: nothing is ever rescanned because
    # nothing beyond one frame is ever kept.
    dec = FrameDecoder()
    block = (bytes(range(0x20, 0x7F)) * 700)[:65536]  # 64 KiB, no RS, no LF
    for _ in range(128):  # 8 MiB of noise
        assert dec.feed(block) == []
        assert dec.buffered == 0
    for b in block[:65536]:
        dec.feed(bytes((b,)))
    assert dec.buffered == 0
    assert dec.stats.noise_bytes == 128 * len(block) + 65536
    # The same flood inside a frame: kept up to max_frame, then discarded.
    assert dec.feed(b"\x1e") == []
    dropped = []
    for _ in range(128):
        dropped += dec.feed(block)
        assert dec.buffered <= MAX_FRAME
    for b in block[:65536]:
        dropped += dec.feed(bytes((b,)))
        assert dec.buffered <= MAX_FRAME
    assert reasons(dropped) == [OVERSIZE]
    assert dec.feed(encode_frame(PING)) == [PING]


_REAL_SEP = framing._SEP


class _CountingSep:
    """Stands in for the separator regex and counts the bytes each search may look at."""

    def __init__(self) -> None:
        self.scanned = 0

    def search(self, data: bytes, pos: int) -> "Optional[re.Match[bytes]]":
        m = _REAL_SEP.search(data, pos)
        self.scanned += (m.end() if m is not None else len(data)) - pos
        return m


def test_every_byte_is_scanned_once(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = _CountingSep()
    monkeypatch.setattr(framing, "_SEP", counter)
    dec = FrameDecoder(max_frame=4096)
    frame = encode_frame(PING)
    stream = (b"\x1e" + b"x" * 20_000 + frame + CONSOLE) * 3 + frame * 5
    fed = 0
    for chunk in split(stream, range(0, len(stream), 7)):
        dec.feed(chunk)
        fed += len(chunk)
    assert counter.scanned <= fed


def test_max_frame_has_a_floor() -> None:
    with pytest.raises(ValueError):
        FrameDecoder(max_frame=10)


def test_in_frame_tracks_the_scanner_state() -> None:
    dec = FrameDecoder()
    assert not dec.in_frame
    dec.feed(encode_frame(PING)[:5])
    assert dec.in_frame
    dec.feed(b"\n")
    assert not dec.in_frame
