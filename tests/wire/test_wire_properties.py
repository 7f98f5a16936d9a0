"""Properties: round trips, no input ever raises, resynchronisation, chunking invariance."""

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from guestbus.wire.events import FrameDropped
from guestbus.wire.framing import FrameDecoder, encode_frame
from guestbus.wire.messages import ErrorMsg, EventMsg, RequestMsg, ResponseMsg, parse_message
from guestbus.wire.session import Session, SessionState

from ._support import HELLO_PARAMS, FakeClock, split

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-"
ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=64)
methods = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_.-", min_size=1, max_size=64)

messages = st.one_of(
    st.builds(RequestMsg, ids, methods, json_objects, st.integers(1, 2**31 - 1)),
    st.builds(ResponseMsg, ids, json_objects),
    st.builds(ErrorMsg, ids, st.text(min_size=1, max_size=30), st.text(), st.none() | json_objects),
    st.builds(EventMsg, methods, json_objects),
)
small_objects = st.dictionaries(st.text(max_size=4), json_scalars, max_size=3)
small_messages = st.one_of(
    st.builds(
        RequestMsg,
        st.sampled_from(["r1", "r2", "x.y:z-9"]),
        methods,
        small_objects,
        st.integers(1, 10**6),
    ),
    st.builds(ResponseMsg, st.sampled_from(["r1", "me-1", "me-2"]), small_objects),
    st.builds(
        ErrorMsg,
        st.sampled_from(["r1", "me-1"]),
        st.sampled_from(["hello_required", "x"]),
        st.text(max_size=10),
    ),
    st.builds(EventMsg, st.sampled_from(["boot", "hello"]), small_objects),
)
frames = small_messages.map(lambda m: encode_frame(m.to_dict()))

# Shapes that look like messages but are often not: exercise every validation branch.
loose_messages = st.fixed_dictionaries(
    {"kind": st.sampled_from(["req", "res", "err", "evt", "hello", 3])},
    optional={
        "id": ids | st.text(max_size=3) | st.integers(),
        "method": st.sampled_from(["hello", "ping", "Bad"]) | methods,
        "params": small_objects | json_scalars,
        "result": small_objects | json_scalars,
        "error": st.fixed_dictionaries(
            {}, optional={"code": st.text(max_size=5) | st.integers(), "message": st.text()}
        )
        | json_scalars,
        "deadline_ms": st.integers(-5, 10_000) | json_scalars,
    },
)

tokens = st.sampled_from(
    [b"\x1e", b"\n", b"\r\n", b"GB1 ", b"00000000 ", b"{}", b"[   1.000000] console\r\n"]
)
pieces = st.one_of(
    st.binary(max_size=40),
    tokens,
    frames,
    frames.flatmap(lambda f: st.integers(0, len(f)).map(lambda n: f[:n])),  # truncated
    loose_messages.map(encode_frame),
)
streams = st.lists(pieces, max_size=8).map(b"".join)
cuts = st.lists(st.integers(0, 4000), max_size=20)


def feed_all(decoder: FrameDecoder, chunks: list[bytes]) -> list[Any]:
    out: list[Any] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    return out


@given(messages)
def test_round_trip(msg: Any) -> None:
    [obj] = FrameDecoder().feed(encode_frame(msg.to_dict()))
    assert isinstance(obj, dict) and obj == msg.to_dict()
    assert parse_message(obj) == msg


@given(st.binary(max_size=3000), cuts)
def test_arbitrary_bytes_never_raise_in_the_decoder(data: bytes, at: list[int]) -> None:
    decoder = FrameDecoder(max_frame=256)
    feed_all(decoder, split(data, at))
    assert decoder.buffered <= 256
    assert decoder.stats.bytes_in == len(data)


@given(streams, cuts)
def test_structured_garbage_never_raises_in_the_decoder(data: bytes, at: list[int]) -> None:
    decoder = FrameDecoder(max_frame=128)
    feed_all(decoder, split(data, at))
    assert decoder.buffered <= 128


@given(streams, cuts, messages)
def test_garbage_then_a_valid_frame_decodes(data: bytes, at: list[int], msg: Any) -> None:
    decoder = FrameDecoder()
    out = feed_all(decoder, split(data + encode_frame(msg.to_dict()), at))
    assert out[-1] == msg.to_dict()


@given(streams, cuts)
def test_decoder_chunking_invariance(data: bytes, at: list[int]) -> None:
    whole = FrameDecoder(max_frame=128)
    chunked = FrameDecoder(max_frame=128)
    assert whole.feed(data) == feed_all(chunked, split(data, at))
    assert whole.stats == chunked.stats


def _session(ready: bool) -> Session:
    session = Session(clock=FakeClock(), id_prefix="me", max_frame=512)
    session.send_request("ping", {}, 5.0, request_id="r1")
    if ready:
        rid, _ = session.send_hello(HELLO_PARAMS, 5.0)
        session.receive_data(encode_frame({"kind": "res", "id": rid, "result": {}}))
        assert session.state is SessionState.READY
    return session


def _check_outbox(session: Session) -> None:
    for item in FrameDecoder().feed(session.data_to_send()):
        assert not isinstance(item, FrameDropped)
        parse_message(item)


@given(st.booleans(), st.binary(max_size=2000), cuts)
def test_arbitrary_bytes_never_raise_in_the_session(
    ready: bool, data: bytes, at: list[int]
) -> None:
    session = _session(ready)
    for chunk in split(data, at):
        session.receive_data(chunk)
    session.tick()
    _check_outbox(session)


@given(
    st.booleans(), st.lists(st.one_of(pieces, loose_messages.map(encode_frame)), max_size=8), cuts
)
def test_message_garbage_never_raises_in_the_session(
    ready: bool, parts: list[bytes], at: list[int]
) -> None:
    session = _session(ready)
    for chunk in split(b"".join(parts), at):
        session.receive_data(chunk)
    assert session.state is not SessionState.CLOSED
    _check_outbox(session)


@given(
    st.booleans(), st.lists(st.one_of(pieces, loose_messages.map(encode_frame)), max_size=8), cuts
)
def test_session_chunking_invariance(ready: bool, parts: list[bytes], at: list[int]) -> None:
    data = b"".join(parts)
    whole, chunked = _session(ready), _session(ready)
    events = whole.receive_data(data)
    chunked_events = []
    for chunk in split(data, at):
        chunked_events += chunked.receive_data(chunk)
    assert events == chunked_events
    assert whole.data_to_send() == chunked.data_to_send()
    assert whole.state is chunked.state
