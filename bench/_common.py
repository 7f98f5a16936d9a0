"""Helpers shared by the benchmarks in ``bench/``.

- statistics: :func:`percentile`, :func:`summarize` (latency samples → rate, p50, p99);
- output: :func:`emit_json` (the one machine-readable line), :func:`render_table`;
- machine: :func:`machine_info` (CPU model, cores, Python, event loop, versions),
  :func:`wait_quiet` (wait for an idle machine, say how busy it was);
- a benchmark's frame: :func:`result_header`, :func:`stepper`, :func:`workdir`,
  :func:`interrupted` (what every ``main()`` shares);
- processes: :class:`Children` (every child a benchmark starts, stopped at the end even on
  Ctrl-C, SIGTERM or an error), :func:`start_nats` (a throwaway ``nats-server`` with
  JetStream), :func:`service_env` (environment of a guestbus service child);
- probes: :func:`rss_bytes` / :func:`cpu_seconds` (from ``/proc``), :func:`http_get`,
  :func:`scrape` (Prometheus text → samples), :func:`wait_ready`.

Benchmarks measure their peers in the same run (the machines are noisy) and report ratios;
see docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

from guestbus.broker import EmbeddedBroker, find_nats_server
from guestbus.runtime.procs import child_preexec

# --------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summarize(latencies: Sequence[float], elapsed: float, errors: int = 0) -> dict[str, Any]:
    """Latency samples (seconds) measured over ``elapsed`` seconds → a figures dict.

    ``rate`` counts successful calls per second of wall time; latencies are in µs.
    """
    values = sorted(latencies)
    n = len(values)
    return {
        "n": n,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rate": round(n / elapsed, 1) if elapsed > 0 else math.nan,
        "p50_us": round(percentile(values, 50) * 1e6, 1),
        "p99_us": round(percentile(values, 99) * 1e6, 1),
        "mean_us": round(sum(values) / n * 1e6, 1) if n else math.nan,
        "max_us": round(values[-1] * 1e6, 1) if n else math.nan,
    }


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    """``a / b`` rounded, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, digits)


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def emit_json(result: Mapping[str, Any], stream: IO[str] | None = None) -> None:
    """Print ``result`` as ONE JSON line (NaN → null) and flush."""
    out = stream or sys.stdout
    out.write(json.dumps(_clean(result), default=_json_default, separators=(",", ":")) + "\n")
    out.flush()


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], *, right: Sequence[int] = ()
) -> str:
    """A plain-text table; columns whose index is in ``right`` are right-aligned.

    A row of one element is a section title spanning the table.
    """
    cells = [[_cell(c) for c in row] for row in rows]
    ncol = len(headers)
    widths = [len(h) for h in headers]
    for row in cells:
        if len(row) == ncol:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    for row in cells:
        out.append(row[0] if len(row) == 1 else line(row))
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """The same rows as a Markdown table (section-title rows become bold rows)."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) == 1:
            out.append("| **" + _cell(row[0]) + "** |" + " |" * (len(headers) - 1))
        else:
            out.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(out)


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


# --------------------------------------------------------------------------------------
# machine
# --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def nats_server_version() -> str:
    try:
        out = subprocess.run(
            [str(find_nats_server()), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or out.stderr.strip()
    except Exception as exc:
        return f"unknown ({type(exc).__name__})"


def machine_info(loop: str) -> dict[str, Any]:
    from nats.aio.client import __version__ as nats_py_version

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "os": f"{platform.system()} {platform.release()}",
        "loop": loop,
        "nats_py": nats_py_version,
        "nats_server": nats_server_version(),
    }
    if loop == "uvloop":
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info["uvloop"] = importlib.metadata.version("uvloop")
    return info


# --------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------


class Children:
    """Every child process a benchmark starts; :meth:`stop_all` ends them.

    Children run in their own session (a terminal's Ctrl-C reaches only the benchmark,
    which then stops them in order) with a parent-death signal (Linux), so they do not
    outlive a benchmark that was killed outright. Use as a context manager around the
    whole run: leaving it stops whatever is still running.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.brokers: list[EmbeddedBroker] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout+stderr in ``log_dir/<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(self.log_path(name), "wb") as log:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                start_new_session=True,
                preexec_fn=child_preexec(),
            )
        self.procs.append((name, proc))
        return proc

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self.log_path(name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def start_nats(self, state_dir: Path) -> EmbeddedBroker:
        """A ``nats-server`` with JetStream on a free loopback port (no monitor port)."""
        broker = EmbeddedBroker(state_dir, port=0, monitor_port=None, stop_timeout=10.0)
        self.brokers.append(broker)
        broker.start_sync()
        return broker

    def stop(self, *procs: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """SIGTERM all of ``procs`` at once, wait up to ``timeout`` s, then SIGKILL."""
        live = [p for p in procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        self.procs = [(n, p) for n, p in self.procs if p.poll() is None]

    async def stop_async(self, *procs: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        """Like :meth:`stop` without blocking the event loop."""
        live = [p for p in procs if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in live) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for p in live:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        self.procs = [(n, p) for n, p in self.procs if p.poll() is None]

    def stop_all(self) -> None:
        """Stop every child (services first, all at once), then the brokers."""
        self.stop(*(p for _, p in self.procs))
        for broker in self.brokers:
            with contextlib.suppress(Exception):
                broker.stop_sync()
        self.brokers.clear()


def machine_busy(seconds: float) -> float | None:
    """Percent of one core the whole machine is busy over ``seconds``."""
    before = cpu_snapshot({})
    time.sleep(seconds)
    return cpu_percent(before, cpu_snapshot({}), seconds).get("machine")


def wait_quiet(seconds: float, what: str = "benchmark") -> float | None:
    """Wait up to ``seconds`` for the machine to be idle (< 20 % of a core busy); return how
    busy it was at the start (warn when it was busy)."""
    busy = machine_busy(1.0)
    quiet_by = time.monotonic() + seconds
    while busy is not None and busy > 20 and time.monotonic() < quiet_by:
        print(f"waiting for a quiet machine ({busy:.0f}% busy)", file=sys.stderr)
        busy = machine_busy(2.0)
    if busy is not None and busy > 25:
        print(
            f"warning: the machine was {busy:.0f}% busy (of one core) before the {what} "
            "started: expect noisy figures",
            file=sys.stderr,
        )
    return busy


def result_header(bench: str, options: Any) -> dict[str, Any]:
    """The start of every benchmark's JSON line: name, date, machine, options (a dataclass
    or a mapping; paths as text)."""
    raw = (
        asdict(options)
        if is_dataclass(options) and not isinstance(options, type)
        else dict(options)
    )
    return {
        "bench": bench,
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": {**machine_info("uvloop"), "loadavg": os.getloadavg()},
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in raw.items()},
    }


def stepper(started: float) -> Callable[[str], None]:
    """Progress lines on stderr, stamped with the seconds since ``started``."""

    def step(what: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {what}", file=sys.stderr, flush=True)

    return step


@contextlib.contextmanager
def workdir(bench: str, keep: bool) -> Iterator[Path]:
    """A temporary directory for a run's state and logs, removed afterwards unless ``keep``."""
    tmp = Path(tempfile.mkdtemp(prefix=f"guestbus-bench-{bench}-"))
    try:
        yield tmp
    finally:
        if keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def interrupted() -> int:
    """Ctrl-C or SIGTERM: everything was stopped on the way out; exit status 130."""
    print("interrupted: every process this benchmark started was stopped", file=sys.stderr)
    return 130


def sigterm_as_interrupt() -> None:
    """Make SIGTERM behave like Ctrl-C: asyncio.Runner cancels the main task (its
    ``finally`` blocks stop what it started), then KeyboardInterrupt reaches the caller.

    A shell starts background jobs with SIGINT ignored; restore Python's handler so that
    ``kill -INT`` stops the benchmark cleanly too.
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)


def service_env(nats_url: str, http_port: int, state_dir: Path, **extra: str) -> dict[str, str]:
    """Environment of a guestbus service child (uvloop, warnings-only logs)."""
    env = {
        "GUESTBUS_NATS_URL": nats_url,
        "GUESTBUS_HTTP_HOST": "127.0.0.1",
        "GUESTBUS_HTTP_PORT": str(http_port),
        "GUESTBUS_LOG_LEVEL": "WARNING",
        "GUESTBUS_EVENT_LOOP": "uvloop",
        "GUESTBUS_STATE_DIR": str(state_dir),
        "GUESTBUS_SHUTDOWN_TIMEOUT": "10",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def free_port() -> int:
    """A free loopback TCP port (may race with other processes; fine for a benchmark)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------
# probes
# --------------------------------------------------------------------------------------


def _proc_status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


def rss_bytes(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of ``pid`` in bytes: current and peak resident set size."""
    status = _proc_status(pid)

    def kib(key: str) -> int:
        return int(status.get(key, "0 kB").split()[0]) * 1024

    return kib("VmRSS"), kib("VmHWM")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def system_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process (missing ones are left out), and by
    the whole machine under ``"machine"``: what others on the machine used shows as
    ``machine`` minus the named processes in :func:`cpu_percent`."""
    snap: dict[str, float] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        snap["machine"] = system_busy_seconds()
    for name, pid in pids.items():
        with contextlib.suppress(OSError, ValueError, IndexError):
            snap[name] = cpu_seconds(pid)
    return snap


def cpu_percent(
    before: Mapping[str, float], after: Mapping[str, float], seconds: float
) -> dict[str, float]:
    """Per process: percent of one core used between two :func:`cpu_snapshot` calls;
    ``machine`` is all cores together (200 = two busy cores) and ``others`` what processes
    not named used (other work on the machine: noise)."""
    if seconds <= 0:
        return {}
    used = {name: (after[name] - before[name]) for name in before if name in after}
    out = {name: round(v / seconds * 100, 1) for name, v in used.items()}
    if "machine" in used:
        mine = sum(v for name, v in used.items() if name != "machine")
        out["others"] = round(max(0.0, used["machine"] - mine) / seconds * 100, 1)
    return out


async def http_get(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET (the probe servers close the connection after a response)."""

    async def go() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body

    return await asyncio.wait_for(go(), timeout)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
"""Prometheus samples: ``(name, labels) → value``."""


async def scrape(port: int, host: str = "127.0.0.1") -> Samples:
    """Every sample of a service's ``/metrics``."""
    status, body = await http_get(host, port, "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics on port {port}: HTTP {status}")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8", "replace")):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = float(s.value)
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and want <= lbl)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def histogram_quantile(
    after: Samples, before: Samples, name: str, q: float, **labels: str
) -> float | None:
    """Upper bound (seconds) of the histogram bucket holding quantile ``q`` (0..1) of the
    observations made between two scrapes; None without observations, inf past the last."""
    buckets: dict[float, float] = {}
    for (n, lbl), value in after.items():
        if n != f"{name}_bucket" or not set(labels.items()) <= lbl:
            continue
        le = float(dict(lbl)["le"])
        before_value = before.get((n, lbl), 0.0)
        buckets[le] = buckets.get(le, 0.0) + value - before_value
    if not buckets:
        return None
    total = buckets.get(math.inf, max(buckets.values()))
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return math.inf


async def wait_ready(
    port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0, what: str = "service"
) -> None:
    """Wait until the service's ``/readyz`` answers 200; fail early if it exited."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} during startup")
        with contextlib.suppress(OSError, asyncio.TimeoutError, ValueError, IndexError):
            status, _ = await http_get("127.0.0.1", port, "/readyz", timeout=2.0)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout:.0f}s")
        await asyncio.sleep(0.05)
