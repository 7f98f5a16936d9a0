"""Timestamp probes for ``bench/link_hops.py``: where one guest RPC spends its time.

:func:`install` wraps a few functions of guestbus and nats-py so that each records
``time.perf_counter()`` under a point name before calling the original; nothing else
changes. On Linux ``perf_counter`` reads CLOCK_MONOTONIC, one clock for every process of the
machine, so the points of one call line up across the processes it crosses. A process
writes its points as JSON to ``path`` when it exits.

Some wrapped functions are nats-py internals (its message dispatch, its publish, its socket
write): pinned by the project's lock on nats-py, and checked at install so that a nats-py
that moved them fails with a message instead of measuring nothing.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Marks = dict[str, list[float]]

HEARTBEAT_SUBJECT = "gb.rpc.heartbeat"


def _subject(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, (bytes, bytearray)) else str(value)


class Probes:
    def __init__(self) -> None:
        self.marks: Marks = {}

    def mark(self, point: str) -> None:
        self.marks.setdefault(point, []).append(time.perf_counter())

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.marks), encoding="utf-8")

    def wrap(
        self,
        owner: Any,
        name: str,
        point: str | Callable[..., str | None],
        *,
        after: str | None = None,
    ) -> None:
        """Record ``point`` (or what ``point(*args)`` names; None: nothing) when
        ``owner.name`` is called, and ``after`` when it returns (coroutines: when awaited)."""
        original = getattr(owner, name, None)
        if original is None:
            raise RuntimeError(
                f"cannot probe {getattr(owner, '__qualname__', owner)}.{name}: not there "
                "(a nats-py or guestbus change?); update bench/_hop_probes.py"
            )

        def name_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
            return point(*args, **kwargs) if callable(point) else point

        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def probed_async(*args: Any, **kwargs: Any) -> Any:
                where = name_of(args, kwargs)
                if where is not None:
                    self.mark(where)
                result = await original(*args, **kwargs)
                if after is not None:
                    self.mark(after)
                return result

            setattr(owner, name, probed_async)
        else:

            @functools.wraps(original)
            def probed(*args: Any, **kwargs: Any) -> Any:
                where = name_of(args, kwargs)
                if where is not None:
                    self.mark(where)
                result = original(*args, **kwargs)
                if after is not None:
                    self.mark(after)
                return result

            setattr(owner, name, probed)


def install(role: str, path: Path | None = None) -> Probes:
    """Probes of ``role`` (``guest``: this benchmark's agent and lab relay; ``bridge``;
    ``router``), written to ``path`` at exit (if given)."""
    import nats.aio.client as nats_client
    import nats.aio.transport as nats_transport

    from guestbus.wire.session import Session

    probes = Probes()
    if path is not None:
        atexit.register(probes.dump, path)
    prefix = {"guest": "x", "bridge": "b", "router": "r"}[role]
    # What a session received: the agent's answers (guest), the guest's requests (bridge).
    if role in ("guest", "bridge"):
        probes.wrap(Session, "receive_data", f"{prefix}_read")
    if role == "guest":
        from guestbus.lab.relay import SerialRelay

        probes.wrap(SerialRelay, "_on_client_readable", "x_relay_h2g")
        return probes
    probes.wrap(nats_transport.TcpTransport, "writelines", f"{prefix}_tcp_write")
    if role == "bridge":
        from guestbus.terminator import Terminator

        probes.wrap(Terminator, "forward", "b_fwd", after="b_fwd_done")
        probes.wrap(Session, "send_response", "b_encode")
        probes.wrap(
            nats_client.Client,
            "_send_publish",
            lambda self, subject, *rest: "b_pub" if subject == HEARTBEAT_SUBJECT else None,
        )
        probes.wrap(
            nats_client.Client,
            "_process_msg",
            lambda self, sid, subject, *rest: (
                "b_reply_in" if _subject(subject).startswith("_INBOX.") else None
            ),
        )
    elif role == "router":
        from guestbus.runtime.service import ServiceContext

        probes.wrap(
            nats_client.Client,
            "_process_msg",
            lambda self, sid, subject, *rest: (
                "r_in" if _subject(subject) == HEARTBEAT_SUBJECT else None
            ),
        )
        probes.wrap(
            ServiceContext,
            "_invoke_endpoint",
            lambda self, name, *rest: "r_handler" if name == "heartbeat" else None,
        )
        probes.wrap(
            ServiceContext,
            "_respond",
            lambda self, request, *rest: (
                "r_respond" if request.subject == HEARTBEAT_SUBJECT else None
            ),
        )
    return probes


def service_main(role: str, path: str) -> None:
    """Run a service with its probes: ``python -c 'from bench._hop_probes import
    service_main; service_main("bridge", OUT)'``."""
    install(role, Path(path))
    if role == "bridge":
        from guestbus_serial_bridge.main import main
    else:
        from guestbus_rpc_router.main import main
    main()
