from typing import Any

import pytest

from guestbus.wire import errors
from guestbus.wire.events import (
    DuplicateRequest,
    ErrorReceived,
    Event,
    EventReceived,
    FrameDropped,
    HandshakeComplete,
    HelloFailed,
    HelloReceived,
    PeerHelloRejected,
    RequestReceived,
    RequestTimedOut,
    ResponseReceived,
)
from guestbus.wire.framing import FrameDecoder, FrameTooLarge, encode_frame
from guestbus.wire.messages import parse_message
from guestbus.wire.session import (
    PROTOCOL_VERSION,
    TRANSITIONS,
    LocalProtocolError,
    Session,
    SessionState,
    Trigger,
)

from ._support import HELLO_PARAMS, FakeClock

READY = SessionState.READY
IDLE = SessionState.IDLE


def make_pair(**kwargs: Any) -> tuple[Session, Session, FakeClock]:
    clock = FakeClock()
    agent = Session(clock=clock, id_prefix="agent", **kwargs)
    host = Session(clock=clock, id_prefix="host", **kwargs)
    return agent, host, clock


def handshake(agent: Session, host: Session) -> list[Event]:
    """Agent says hello, host accepts; returns the agent's events."""
    _, data = agent.send_hello(HELLO_PARAMS, 5.0)
    [hello] = host.receive_data(data)
    assert isinstance(hello, HelloReceived)
    return agent.receive_data(host.send_response(hello.request_id, {"vm": "vm-1"}))


def ready_pair(**kwargs: Any) -> tuple[Session, Session, FakeClock]:
    agent, host, clock = make_pair(**kwargs)
    handshake(agent, host)
    assert agent.state is READY and host.state is READY
    return agent, host, clock


def decode_all(data: bytes) -> list[dict[str, Any]]:
    items = FrameDecoder().feed(data)
    assert all(isinstance(i, dict) for i in items)
    return items  # type: ignore[return-value]


# --- handshake ----------------------------------------------------------------------------


def test_hello_handshake_both_ends() -> None:
    agent, host, clock = make_pair()
    params = dict(HELLO_PARAMS)
    rid, data = agent.send_hello(params, 5.0)
    assert params == HELLO_PARAMS  # the caller's dict is not touched
    assert agent.state is SessionState.HELLO_SENT and host.state is IDLE
    [hello] = host.receive_data(data)
    assert hello == HelloReceived(rid, dict(HELLO_PARAMS, protocol=1), clock.now + 5.0)
    assert host.state is IDLE  # accepting is the owner's decision
    clock.advance(0.5)
    events = agent.receive_data(host.send_response(rid, {"vm": "vm-1"}))
    assert host.state is READY and agent.state is READY
    assert events == [
        ResponseReceived(rid, "hello", {"vm": "vm-1"}, 0.5),
        HandshakeComplete({"vm": "vm-1"}),
    ]
    assert agent.pending_count() == 0


def test_protocol_mismatch_rejected() -> None:
    agent, host, _ = make_pair()
    rid, data = agent.send_hello(dict(HELLO_PARAMS, protocol=PROTOCOL_VERSION + 1), 5.0)
    [drop] = host.receive_data(data)
    assert isinstance(drop, PeerHelloRejected)
    assert drop.code == errors.UNSUPPORTED_PROTOCOL and drop.request_id == rid
    assert host.state is IDLE
    reply = host.data_to_send()
    [obj] = decode_all(reply)
    assert obj["error"]["details"] == {"supported": [PROTOCOL_VERSION]}
    events = agent.receive_data(reply)
    assert [type(e) for e in events] == [ErrorReceived, HelloFailed]
    assert events[1] == HelloFailed(errors.UNSUPPORTED_PROTOCOL, obj["error"]["message"])
    assert agent.state is IDLE
    assert host.stats.auto_replies == 1


@pytest.mark.parametrize("protocol", [None, "1", True, 1.0])
def test_hello_without_integer_protocol_is_a_bad_request(protocol: Any) -> None:
    host = Session()
    params: dict[str, Any] = {} if protocol is None else {"protocol": protocol}
    frame = encode_frame(
        {"kind": "req", "id": "h1", "method": "hello", "params": params, "deadline_ms": 100}
    )
    [event] = host.receive_data(frame)
    assert event == PeerHelloRejected("h1", errors.BAD_REQUEST, event.message)  # type: ignore[union-attr]
    [obj] = decode_all(host.data_to_send())
    assert obj["id"] == "h1" and obj["error"]["code"] == errors.BAD_REQUEST


def test_malformed_hello_rejects_the_peer_hello() -> None:
    _, host, _ = ready_pair()
    frame = encode_frame({"kind": "req", "id": "h2", "method": "hello", "params": []})
    events = host.receive_data(frame)
    assert [type(e) for e in events] == [FrameDropped, PeerHelloRejected]
    assert host.state is IDLE  # the peer's handshake failed, so ours is gone too


def test_hello_refused_by_owner() -> None:
    agent, host, _ = make_pair()
    rid, data = agent.send_hello(HELLO_PARAMS, 5.0)
    host.receive_data(data)
    reply = host.send_error(rid, errors.IDENTITY_MISMATCH, "this port belongs to vm-2")
    assert host.state is IDLE
    events = agent.receive_data(reply)
    assert events[-1] == HelloFailed(errors.IDENTITY_MISMATCH, "this port belongs to vm-2")
    assert agent.state is IDLE


def test_hello_timeout() -> None:
    agent, _, clock = make_pair()
    rid, _ = agent.send_hello(HELLO_PARAMS, 2.0)
    assert agent.next_deadline() == clock.now + 2.0
    clock.advance(2.0)
    assert agent.tick() == [
        RequestTimedOut(rid, "hello"),
        HelloFailed(errors.TIMEOUT, "no answer to hello before its deadline"),
    ]
    assert agent.state is IDLE
    agent.send_hello(HELLO_PARAMS, 2.0)  # and it can try again


def test_second_hello_in_flight_is_local_misuse() -> None:
    agent, _, _ = make_pair()
    agent.send_hello(HELLO_PARAMS, 5.0)
    with pytest.raises(LocalProtocolError):
        agent.send_hello(HELLO_PARAMS, 5.0)
    with pytest.raises(LocalProtocolError):
        agent.send_request("hello", {}, 5.0)


def test_rehello_from_ready() -> None:
    # A serial line has no carrier: the agent re-checks the host by saying hello again.
    agent, host, _ = ready_pair()
    handshake(agent, host)
    assert agent.state is READY and host.state is READY


def test_peer_hello_while_ready_means_peer_restarted() -> None:
    agent, host, clock = ready_pair()
    host = Session(clock=clock, id_prefix="host2")  # the host bridge restarted
    rid, data = host.send_hello({"bridge": "b1"}, 5.0)
    [hello] = agent.receive_data(data)
    assert isinstance(hello, HelloReceived)
    events = host.receive_data(agent.send_response(rid, {}))
    assert isinstance(events[-1], HandshakeComplete)
    assert agent.state is READY and host.state is READY


def test_crossing_hellos() -> None:
    a, b, _ = make_pair()
    _, hello_a = a.send_hello(HELLO_PARAMS, 5.0)
    _, hello_b = b.send_hello(HELLO_PARAMS, 5.0)
    [ev_b] = b.receive_data(hello_a)
    [ev_a] = a.receive_data(hello_b)
    assert isinstance(ev_a, HelloReceived) and isinstance(ev_b, HelloReceived)
    to_a = b.send_response(ev_b.request_id, {})
    to_b = a.send_response(ev_a.request_id, {})
    assert a.state is READY and b.state is READY
    assert isinstance(a.receive_data(to_a)[-1], HandshakeComplete)
    assert isinstance(b.receive_data(to_b)[-1], HandshakeComplete)
    assert a.state is READY and b.state is READY


# --- before the handshake -----------------------------------------------------------------


def test_request_before_hello_gets_hello_required() -> None:
    agent, host, _ = make_pair()
    rid, data = agent.send_request("ping", {}, 5.0)  # allowed: readiness may change any time
    events = host.receive_data(data)
    assert [type(e) for e in events] == [FrameDropped]
    assert events[0].reason == "not_ready"  # type: ignore[union-attr]
    reply = host.data_to_send()
    assert host.data_to_send() == b""  # data_to_send clears the outbox
    [err] = agent.receive_data(reply)
    assert isinstance(err, ErrorReceived)
    assert (err.request_id, err.method, err.code) == (rid, "ping", errors.HELLO_REQUIRED)
    assert agent.state is IDLE and host.stats.dropped["not_ready"] == 1


def test_event_before_hello_is_dropped() -> None:
    agent, host, _ = make_pair()
    events = host.receive_data(agent.send_event("boot", {}))
    assert [e.reason for e in events] == ["not_ready"]  # type: ignore[union-attr]
    assert host.data_to_send() == b""


def test_hello_required_resets_to_idle() -> None:
    agent, host, clock = ready_pair()
    host = Session(clock=clock, id_prefix="host2")  # bridge restarted, lost its state
    rid, data = agent.send_request("report", {"uptime": 1}, 5.0)
    host.receive_data(data)
    events = agent.receive_data(host.data_to_send())
    assert events == [ErrorReceived(rid, "report", errors.HELLO_REQUIRED, events[0].message, None)]  # type: ignore[union-attr]
    assert agent.state is IDLE
    handshake(agent, host)
    assert agent.state is READY and host.state is READY


def test_hello_required_for_an_older_handshake_keeps_ready() -> None:
    agent, host, clock = ready_pair()
    rid, stale = agent.send_request("ping", {}, 5.0)  # on its way when the bridge restarts
    host = Session(clock=clock, id_prefix="host2")
    hid, hello = host.send_hello({}, 5.0)
    host.receive_data(stale)  # not READY yet: answered hello_required
    refusal = host.data_to_send()
    [event] = agent.receive_data(hello)
    assert isinstance(event, HelloReceived)
    accept = agent.send_response(hid, {})
    # The refusal concerns a request from before the new handshake: it must not undo it.
    [err] = agent.receive_data(refusal)
    assert isinstance(err, ErrorReceived)
    assert (err.request_id, err.code) == (rid, errors.HELLO_REQUIRED)
    assert agent.state is READY
    host.receive_data(accept)
    assert host.state is READY


# --- requests and answers -----------------------------------------------------------------


def test_request_response_matching() -> None:
    agent, host, clock = ready_pair()
    r1, d1 = agent.send_request("ping", {"n": 1}, 5.0)
    r2, d2 = agent.send_request("info", {}, 5.0, request_id="explicit.id:2")
    assert r2 == "explicit.id:2" and r1 != r2
    assert agent.pending_count() == 2
    got = host.receive_data(d1 + d2)
    assert got == [
        RequestReceived(r1, "ping", {"n": 1}, clock.now + 5.0),
        RequestReceived(r2, "info", {}, clock.now + 5.0),
    ]
    clock.advance(0.25)
    answers = host.send_response(r2, {"os": "linux"}) + host.send_response(r1, {"pong": 1})
    assert agent.receive_data(answers) == [
        ResponseReceived(r2, "info", {"os": "linux"}, 0.25),
        ResponseReceived(r1, "ping", {"pong": 1}, 0.25),
    ]
    assert agent.pending_count() == 0 and agent.next_deadline() is None


def test_error_response() -> None:
    agent, host, _ = ready_pair()
    rid, data = agent.send_request("exec", {"cmd": "rm"}, 5.0)
    host.receive_data(data)
    reply = host.send_error(rid, errors.NOT_ALLOWED, "exec is not allow-listed", {"m": "exec"})
    assert agent.receive_data(reply) == [
        ErrorReceived(rid, "exec", errors.NOT_ALLOWED, "exec is not allow-listed", {"m": "exec"})
    ]
    assert agent.state is READY


def test_events_both_ways() -> None:
    agent, host, _ = ready_pair()
    assert host.receive_data(agent.send_event("agent.boot", {"t": 1})) == [
        EventReceived("agent.boot", {"t": 1})
    ]
    assert agent.receive_data(host.send_event("host.note", {})) == [EventReceived("host.note", {})]


def test_received_deadline_is_local_time() -> None:
    _, host, clock = ready_pair()
    frame = encode_frame(
        {"kind": "req", "id": "x", "method": "ping", "params": {}, "deadline_ms": 1500}
    )
    [event] = host.receive_data(frame)
    assert isinstance(event, RequestReceived) and event.deadline == clock.now + 1.5


def test_deadline_expiry_with_fake_clock() -> None:
    agent, host, clock = ready_pair()
    rid, data = agent.send_request("slow", {}, 2.0)
    host.receive_data(data)
    assert agent.next_deadline() == clock.now + 2.0
    clock.advance(1.999)
    assert agent.tick() == []
    clock.advance(0.001)
    assert agent.tick() == [RequestTimedOut(rid, "slow")]
    assert agent.pending_count() == 0 and agent.stats.timeouts == 1
    assert agent.next_deadline() is None
    # The answer comes anyway (the host sends it past the deadline) and is dropped.
    late = host.send_response(rid, {})
    [drop] = agent.receive_data(late)
    assert isinstance(drop, FrameDropped) and drop.reason == "unknown_response"
    assert agent.stats.dropped["unknown_response"] == 1


def test_next_deadline_is_the_earliest_live_one() -> None:
    agent, host, clock = ready_pair()
    r1, d1 = agent.send_request("a", {}, 1.0)
    agent.send_request("b", {}, 3.0)
    host.receive_data(d1)
    agent.receive_data(host.send_response(r1, {}))
    assert agent.next_deadline() == clock.now + 3.0


def test_many_answered_requests_do_not_pile_up() -> None:
    agent, host, _ = ready_pair()
    for _ in range(1000):
        rid, data = agent.send_request("ping", {}, 60.0)
        host.receive_data(data)
        agent.receive_data(host.send_response(rid, {}))
    assert agent.pending_count() == 0
    assert len(agent._heap) <= 64 + 1  # stale deadline entries get compacted


# --- de-duplication -----------------------------------------------------------------------


def test_dedup_same_id_runs_once_and_replays_identical_bytes() -> None:
    agent, host, _ = ready_pair()
    rid, data = agent.send_request("fs.freeze", {}, 5.0)
    assert [type(e) for e in host.receive_data(data)] == [RequestReceived]
    answer = host.send_response(rid, {"frozen": 2})
    assert host.receive_data(data) == [DuplicateRequest(rid, True)]
    assert host.data_to_send() == answer
    assert host.stats.duplicates == 1 and host.stats.auto_replies == 1
    with pytest.raises(LocalProtocolError):
        host.send_response(rid, {"frozen": 3})  # answering twice is a bug


def test_dedup_replays_errors_too() -> None:
    agent, host, _ = ready_pair()
    rid, data = agent.send_request("exec", {}, 5.0)
    host.receive_data(data)
    answer = host.send_error(rid, errors.NOT_ALLOWED, "no")
    assert host.receive_data(data) == [DuplicateRequest(rid, True)]
    assert host.data_to_send() == answer


def test_dedup_in_progress_is_not_replayed() -> None:
    agent, host, _ = ready_pair()
    rid, data = agent.send_request("backup", {}, 5.0)
    host.receive_data(data)
    assert host.receive_data(data) == [DuplicateRequest(rid, False)]
    assert host.data_to_send() == b""
    answer = host.send_response(rid, {})  # the real answer serves both copies
    assert agent.receive_data(answer)[0] == ResponseReceived(rid, "backup", {}, 0.0)


def test_dedup_survives_connection_lost() -> None:
    agent, host, _ = ready_pair()
    rid, data = agent.send_request("fs.freeze", {}, 30.0)
    assert [type(e) for e in host.receive_data(data)] == [RequestReceived]
    lost_answer = host.send_response(rid, {"frozen": 2})  # never reaches the agent
    # The host's connection drops; the agent keeps its pending request.
    assert host.connection_lost() == []
    assert agent.connection_lost() == []
    assert host.state is IDLE and agent.state is IDLE and agent.pending_count() == 1
    handshake(agent, host)
    retry = agent.resend_pending()
    assert [type(e) for e in host.receive_data(retry)] == [DuplicateRequest]
    assert agent.receive_data(host.data_to_send()) == [
        ResponseReceived(rid, "fs.freeze", {"frozen": 2}, 0.0)
    ]
    assert host.data_to_send() == b"" and lost_answer


def test_dedup_expires_after_ttl() -> None:
    agent, host, clock = ready_pair(dedup_ttl=10.0)
    rid, data = agent.send_request("ping", {}, 5.0)
    host.receive_data(data)
    host.send_response(rid, {})
    clock.advance(9.0)
    assert host.receive_data(data) == [DuplicateRequest(rid, True)]  # refreshes the entry
    clock.advance(9.0)
    assert host.receive_data(data) == [DuplicateRequest(rid, True)]
    clock.advance(10.0)
    assert [type(e) for e in host.receive_data(data)] == [RequestReceived]


def test_dedup_is_bounded_by_count() -> None:
    agent, host, _ = ready_pair(dedup_size=2)
    frames = [agent.send_request("ping", {}, 5.0) for _ in range(3)]
    for rid, data in frames:
        host.receive_data(data)
        host.send_response(rid, {})
    _first_id, first = frames[0]
    assert [type(e) for e in host.receive_data(first)] == [RequestReceived]  # evicted
    last_id, last = frames[2]
    assert host.receive_data(last) == [DuplicateRequest(last_id, True)]


def test_requests_refused_before_hello_are_not_remembered() -> None:
    agent, host, _ = make_pair()
    _rid, data = agent.send_request("ping", {}, 5.0)
    host.receive_data(data)
    host.data_to_send()
    handshake(agent, host)
    assert [type(e) for e in host.receive_data(data)] == [RequestReceived]


# --- malformed input ----------------------------------------------------------------------


def test_malformed_request_with_readable_id_gets_bad_request() -> None:
    _, host, _ = ready_pair()
    frame = encode_frame(
        {"kind": "req", "id": "q1", "method": "Not Valid", "params": {}, "deadline_ms": 10}
    )
    [drop] = host.receive_data(frame)
    assert isinstance(drop, FrameDropped) and drop.reason == "bad_message"
    [obj] = decode_all(host.data_to_send())
    assert obj["kind"] == "err" and obj["id"] == "q1"
    assert obj["error"]["code"] == errors.BAD_REQUEST


def test_malformed_messages_are_dropped_silently() -> None:
    _, host, _ = ready_pair()
    bad: list[dict[str, Any]] = [
        {"kind": "req", "id": "not valid", "method": "ping", "params": {}, "deadline_ms": 10},
        {"kind": "what"},
        {"kind": "res", "id": "x", "result": "no"},
        {"kind": "evt", "method": "x"},
    ]
    events = host.receive_data(b"".join(encode_frame(o) for o in bad))
    assert [e.reason for e in events] == ["bad_message"] * 4  # type: ignore[union-attr]
    assert host.data_to_send() == b""
    assert host.stats.dropped["bad_message"] == 4


def test_framing_drops_surface_as_events() -> None:
    _, host, _ = ready_pair()
    events = host.receive_data(b"\x1eGB1 zz\n")
    assert events == [FrameDropped("bad_header", events[0].detail)]  # type: ignore[union-attr]


# --- sending ------------------------------------------------------------------------------


def test_send_raises_frame_too_large_and_changes_nothing() -> None:
    agent, host, _ = ready_pair(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        agent.send_request("put", {"blob": "x" * 2000}, 5.0)
    assert agent.pending_count() == 0
    with pytest.raises(FrameTooLarge):
        agent.send_event("e", {"blob": "x" * 2000})
    rid, data = agent.send_request("get", {}, 5.0)
    host.receive_data(data)
    with pytest.raises(FrameTooLarge):
        host.send_response(rid, {"blob": "x" * 2000})
    answer = host.send_error(rid, errors.TOO_LARGE, "result exceeds 1024 bytes")
    assert host.receive_data(data) == [DuplicateRequest(rid, True)]
    assert host.data_to_send() == answer


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.send_request("Bad", {}, 1.0),
        lambda s: s.send_request("ok", [], 1.0),
        lambda s: s.send_request("ok", {}, 0),
        lambda s: s.send_request("ok", {}, -1.0),
        lambda s: s.send_request("ok", {}, float("nan")),
        lambda s: s.send_request("ok", {}, 1e12),
        lambda s: s.send_request("ok", {}, 1.0, request_id="bad id"),
        lambda s: s.send_request("ok", {"x": object()}, 1.0),
        lambda s: s.send_request("ok", {"x": float("inf")}, 1.0),
        lambda s: s.send_event("Bad", {}),
        lambda s: s.send_response("bad id", {}),
        lambda s: s.send_response("ok", None),
        lambda s: s.send_error("ok", "", "m"),
        lambda s: s.send_hello([], 1.0),
    ],
)
def test_local_misuse_raises(call: Any) -> None:
    session = Session()
    with pytest.raises(LocalProtocolError):
        call(session)
    assert session.pending_count() == 0 and session.stats.frames_out == 0


def test_explicit_id_already_in_flight_is_refused() -> None:
    agent, _, _ = ready_pair()
    agent.send_request("a", {}, 1.0, request_id="same")
    with pytest.raises(LocalProtocolError):
        agent.send_request("b", {}, 1.0, request_id="same")


def test_generated_ids_skip_explicit_ones() -> None:
    agent, _, _ = ready_pair()
    agent.send_request("a", {}, 1.0, request_id="agent-2")
    assert agent.send_request("a", {}, 1.0)[0] == "agent-3"  # agent-1 was the hello


def test_default_id_prefix_is_random() -> None:
    a, b = Session(), Session()
    assert a.send_request("x", {}, 1.0)[0] != b.send_request("x", {}, 1.0)[0]


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError):
        Session(max_frame=100)
    with pytest.raises(ValueError):
        Session(dedup_size=-1)
    with pytest.raises(ValueError):
        Session(id_prefix="has space")


# --- connection loss and close ------------------------------------------------------------


def test_connection_lost_keeps_or_fails_pending() -> None:
    agent, _, _ = ready_pair()
    agent.send_request("a", {}, 5.0)
    assert agent.connection_lost() == [] and agent.pending_count() == 1
    rid, _ = agent.send_request("b", {}, 5.0)
    events = agent.connection_lost(fail_pending=True)
    assert {e.request_id for e in events} == {"agent-2", rid}  # type: ignore[union-attr]
    assert all(isinstance(e, ErrorReceived) and e.code == errors.LINK_LOST for e in events)
    assert agent.pending_count() == 0 and agent.next_deadline() is None


def test_connection_lost_fails_the_hello_and_partial_frame() -> None:
    agent, host, _ = make_pair()
    _rid, data = agent.send_hello(HELLO_PARAMS, 5.0)
    assert host.receive_data(data[:20]) == []
    assert [e.reason for e in host.connection_lost()] == ["truncated"]  # type: ignore[union-attr]
    events = agent.connection_lost()
    assert [type(e) for e in events] == [ErrorReceived, HelloFailed]
    assert events[1].code == errors.LINK_LOST  # type: ignore[union-attr]
    assert agent.state is IDLE and agent.pending_count() == 0
    handshake(agent, host)  # the next connection starts clean
    assert host.state is READY


def test_connection_lost_discards_unsent_auto_replies() -> None:
    agent, host, _ = make_pair()
    host.receive_data(agent.send_request("ping", {}, 1.0)[1])
    host.connection_lost()
    assert host.data_to_send() == b""


def test_pending_answer_after_reconnect_still_matches() -> None:
    agent, host, _ = ready_pair()
    rid, data = agent.send_request("ping", {}, 5.0)
    host.receive_data(data)
    agent.connection_lost()
    # Answers are matched in any state: the request was served.
    assert agent.receive_data(host.send_response(rid, {}))[0].request_id == rid  # type: ignore[union-attr]


def test_closed_session_ignores_input_and_refuses_sending() -> None:
    agent, host, _ = ready_pair()
    _rid, _data = agent.send_request("ping", {}, 5.0)
    agent.close()
    assert agent.state is SessionState.CLOSED
    assert agent.receive_data(host.send_event("x", {})) == []
    assert agent.tick() == [] and agent.pending_count() == 0
    for call in (
        lambda: agent.send_request("ping", {}, 1.0),
        lambda: agent.send_event("x", {}),
        lambda: agent.send_response("r", {}),
        lambda: agent.send_error("r", "c", "m"),
        lambda: agent.send_hello({}, 1.0),
        agent.resend_pending,
    ):
        with pytest.raises(LocalProtocolError):
            call()
    agent.close()  # idempotent
    assert agent.connection_lost() == []


# --- the table ----------------------------------------------------------------------------


def test_peer_caused_triggers_never_raise_in_an_open_state() -> None:
    peer = (
        Trigger.HELLO_ACCEPTED,
        Trigger.HELLO_REJECTED,
        Trigger.ACCEPT_PEER_HELLO,
        Trigger.REJECT_PEER_HELLO,
        Trigger.PEER_LOST_STATE,
        Trigger.CONNECTION_LOST,
        Trigger.CLOSE,
    )
    for state in SessionState:
        for trigger in peer:
            if state is not SessionState.CLOSED or trigger in (
                Trigger.CONNECTION_LOST,
                Trigger.CLOSE,
            ):
                assert (state, trigger) in TRANSITIONS, (state, trigger)


def test_illegal_transition_is_local_protocol_error() -> None:
    agent, _, _ = make_pair()
    agent.send_hello({}, 1.0)
    assert (SessionState.HELLO_SENT, Trigger.SEND_HELLO) not in TRANSITIONS
    with pytest.raises(LocalProtocolError, match="SEND_HELLO"):
        agent.send_hello({}, 1.0)


def test_stats() -> None:
    agent, host, _ = make_pair()
    _, hello = agent.send_hello(HELLO_PARAMS, 5.0)
    rid, ping = agent.send_request("ping", {}, 5.0)
    [ev] = host.receive_data(b"noise\n" + hello)
    accept = host.send_response(ev.request_id, {})  # type: ignore[union-attr]
    host.receive_data(ping)
    pong = host.send_response(rid, {})
    agent.receive_data(accept + pong + b"\x1e\n")
    assert (agent.stats.frames_out, agent.stats.bytes_out) == (2, len(hello + ping))
    assert (agent.stats.frames_in, agent.stats.bytes_in) == (2, len(accept + pong) + 2)
    assert (host.stats.frames_in, host.stats.bytes_in) == (2, 6 + len(hello + ping))
    assert (host.stats.frames_out, host.stats.bytes_out) == (2, len(accept + pong))
    assert host.stats.noise_bytes == 6 and agent.stats.noise_bytes == 0
    assert agent.stats.dropped["bad_header"] == 1
    assert agent.stats.auto_replies == 0 and host.stats.auto_replies == 0
    assert set(agent.stats.dropped) >= {"bad_checksum", "bad_message", "unknown_response"}


def test_auto_reply_frames_parse_as_messages() -> None:
    _, host, _ = make_pair()
    frame = encode_frame({"kind": "req", "id": "z", "method": "x", "params": {}, "deadline_ms": 1})
    host.receive_data(frame)
    [obj] = decode_all(host.data_to_send())
    parse_message(obj)


def test_dedup_can_be_disabled() -> None:
    agent, host, _ = ready_pair(dedup_size=0)
    rid, data = agent.send_request("ping", {}, 5.0)
    host.receive_data(data)
    host.send_response(rid, {})
    assert [type(e) for e in host.receive_data(data)] == [RequestReceived]


def test_resend_pending_skips_the_hello_and_expired_requests() -> None:
    agent, _host, clock = ready_pair()
    agent.send_request("short", {}, 1.0)
    rid, _ = agent.send_request("long", {"n": 1}, 10.0)
    agent.send_hello(HELLO_PARAMS, 5.0)
    clock.advance(2.0)
    [obj] = decode_all(agent.resend_pending())
    assert obj == {
        "kind": "req",
        "id": rid,
        "method": "long",
        "params": {"n": 1},
        "deadline_ms": 8000,
    }


def test_tick_ignores_answered_requests() -> None:
    agent, host, clock = ready_pair()
    rid, data = agent.send_request("ping", {}, 1.0)
    host.receive_data(data)
    agent.receive_data(host.send_response(rid, {}))
    clock.advance(5.0)
    assert agent.tick() == [] and agent.stats.timeouts == 0
