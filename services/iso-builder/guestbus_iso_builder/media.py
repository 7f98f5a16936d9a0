"""ISO 9660 images with Joliet and Rock Ridge, written in-process and reproducibly.

pycdlib stamps every volume descriptor and directory record with ``time.time()`` and
converts it with ``time.localtime()``; for byte-identical output from identical inputs we
give its modules a clock that always says :data:`EPOCH` in UTC, only while one of our
images is being mastered (a lock makes that safe across threads). Entries are written in
sorted order, so the order callers list them in does not matter.

Three name spaces, one file: Rock Ridge carries the real names and POSIX modes (Linux),
Joliet carries names up to 64 characters (Windows), and the plain ISO 9660 level 3 names
(upper-case ``d-characters``, at most 30) are derived deterministically for old readers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import struct_time
from types import ModuleType
from typing import Any, BinaryIO

import pycdlib
import pycdlib.dates
import pycdlib.headervd
import pycdlib.pycdlib
import pycdlib.utils

EPOCH = 946684800.0
"""The timestamp of every file and descriptor: 2000-01-01T00:00:00Z."""
JOLIET_MAX = 64
ISO9660_MAX = 30


class MediaError(Exception):
    """Entries that cannot form an image (duplicate or invalid paths)."""


@dataclass(frozen=True)
class IsoEntry:
    """One file on the image: ``path`` is relative (``config.json``, ``wheels/x.whl``)."""

    path: str
    data: bytes | Path
    mode: int = 0o644

    @property
    def size(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else self.data.stat().st_size


class _FixedClock:
    """Stands in for the ``time`` module inside pycdlib while an image is mastered."""

    def __init__(self, epoch: float) -> None:
        self._epoch = epoch

    def time(self) -> float:
        return self._epoch

    def localtime(self, secs: float | None = None) -> struct_time:
        return time.gmtime(self._epoch if secs is None else secs)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


_PATCHED: tuple[ModuleType, ...] = (
    pycdlib.dates,
    pycdlib.headervd,
    pycdlib.pycdlib,
    pycdlib.utils,
)
_clock_lock = threading.Lock()


@contextlib.contextmanager
def _fixed_clock(epoch: float) -> Iterator[None]:
    with _clock_lock:
        saved = [(module, module.__dict__["time"]) for module in _PATCHED]
        clock = _FixedClock(epoch)
        try:
            for module, _ in saved:
                module.__dict__["time"] = clock
            yield
        finally:
            for module, original in saved:
                module.__dict__["time"] = original


_NOT_D = re.compile(r"[^A-Z0-9_]")


def _d_chars(text: str) -> str:
    return _NOT_D.sub("_", text.upper())


def iso9660_name(name: str, taken: set[str], is_dir: bool = False) -> str:
    """A unique ISO 9660 level 3 name for ``name`` within one directory (without ``;1``)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or is_dir:
        stem, ext = name, ""
    stem, ext = _d_chars(stem) or "_", _d_chars(ext)[:8]
    room = ISO9660_MAX - (len(ext) + 1 if ext else 0)
    candidate = stem[:room]
    counter = 0
    while True:
        full = f"{candidate}.{ext}" if ext else candidate
        if full not in taken:
            taken.add(full)
            return full
        counter += 1
        suffix = f"_{counter}"
        candidate = stem[: room - len(suffix)] + suffix


def joliet_name(name: str) -> str:
    """Joliet allows 64 characters; longer names keep their start, a hash and the suffix."""
    if len(name) <= JOLIET_MAX:
        return name
    suffix = name[name.rfind(".") :] if "." in name[-8:] else ""
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return name[: JOLIET_MAX - len(suffix) - 9] + "~" + digest + suffix


def _check_path(path: str) -> list[str]:
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise MediaError(f"invalid path on the image: {path!r} (relative, no empty parts)")
    return parts


def build_iso(
    entries: Sequence[IsoEntry],
    out: BinaryIO,
    *,
    label: str,
    epoch: float = EPOCH,
    publisher: str = "guestbus",
) -> None:
    """Master an image of ``entries`` into ``out`` (a writable binary file object)."""
    seen: set[str] = set()
    for entry in entries:
        _check_path(entry.path)
        if entry.path in seen:
            raise MediaError(f"{entry.path!r} is on the image twice")
        seen.add(entry.path)
    ordered = sorted(entries, key=lambda e: e.path)
    dirs = sorted(
        {"/".join(e.path.split("/")[:i]) for e in ordered for i in range(1, e.path.count("/") + 1)}
    )
    if seen & set(dirs):
        raise MediaError("a path is used both as a file and as a directory")

    with _fixed_clock(epoch), contextlib.ExitStack() as files:
        iso = pycdlib.PyCdlib()
        iso.new(
            interchange_level=3,
            joliet=3,
            rock_ridge="1.09",
            vol_ident=label,
            sys_ident="LINUX",
            pub_ident_str=publisher,
            app_ident_str="guestbus iso-builder",
        )
        iso_names: dict[str, str] = {"": ""}
        taken: dict[str, set[str]] = {}
        for d in dirs:
            parent, _, base = d.rpartition("/")
            name = iso9660_name(base, taken.setdefault(parent, set()), is_dir=True)
            iso_names[d] = f"{iso_names[parent]}/{name}"
            iso.add_directory(
                iso_path=iso_names[d],
                rr_name=base,
                joliet_path="/" + "/".join(joliet_name(p) for p in d.split("/")),
                file_mode=0o040555,
            )
        for entry in ordered:
            parent, _, base = entry.path.rpartition("/")
            name = iso9660_name(base, taken.setdefault(parent, set()))
            fp: BinaryIO
            if isinstance(entry.data, bytes):
                fp = io.BytesIO(entry.data)
            else:
                fp = files.enter_context(entry.data.open("rb"))
            iso.add_fp(
                fp,
                entry.size,
                iso_path=f"{iso_names[parent]}/{name};1",
                rr_name=base,
                joliet_path="/" + "/".join(joliet_name(p) for p in entry.path.split("/")),
                file_mode=0o100000 | (entry.mode & 0o7777),
            )
        iso.write_fp(out)
        iso.close()


def build_iso_bytes(entries: Sequence[IsoEntry], *, label: str, epoch: float = EPOCH) -> bytes:
    buf = io.BytesIO()
    build_iso(entries, buf, label=label, epoch=epoch)
    return buf.getvalue()
