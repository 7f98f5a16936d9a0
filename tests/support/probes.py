"""A service's HTTP probe server (``/readyz``, ``/metrics``) as the tests read it, and free
loopback ports to give services."""

from __future__ import annotations

import asyncio
import socket

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def http_request(port: int, raw: bytes, host: str = "127.0.0.1") -> tuple[int, str, bytes]:
    """Send ``raw`` and read the whole response: (status, head, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5.0)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5.0)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1"), body


async def http_get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    raw = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    status, _, body = await http_request(port, raw.encode())
    return status, body


async def http_status(port: int, path: str) -> int:
    return (await http_get(port, path))[0]


async def scrape(port: int) -> Samples:
    """GET /metrics, parsed into samples."""
    status, body = await http_get(port, "/metrics")
    assert status == 200, f"/metrics answered {status}"
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
