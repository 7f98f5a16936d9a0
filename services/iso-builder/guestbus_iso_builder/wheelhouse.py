"""The offline wheelhouse that "full" ISOs carry: the guest agent and its dependencies as wheels.

A guest with no network installs the agent with ``pip install --no-index --find-links`` from
the ISO. The host distribution ``guestbus`` (Python 3.11+, many dependencies) cannot go there,
so the agent gets a small wheel of its own, built here from the installed sources, and its
pinned dependencies (``guestbus_agent/wheel-requirements.txt``) are downloaded by pip for
every target: CPython 3.9-3.13 on glibc Linux (manylinux 2.17), x86_64 and aarch64.

A wheelhouse is assembled once per agent wheel, pins and targets (its :attr:`Wheelhouse.id`),
cached under ``<cache_dir>/<id>/`` and reused for every ISO; ``wheelhouse.json`` beside the
wheels records each file's sha256, so a damaged cache (or ISO copy) is detected, not used.

Synchronous on purpose (it runs pip and hashes tens of MB): async callers use a thread.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import (
    InvalidWheelFilename,
    NormalizedName,
    canonicalize_name,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

import guestbus
import guestbus.wire
import guestbus_agent
from guestbus_agent.layout import AGENT_DIST, WHEELHOUSE_MANIFEST

TARGET_PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
TARGET_ARCHS = ("x86_64", "aarch64")
TARGET_GLIBC = (2, 17)
"""The oldest glibc the wheels may need: manylinux2014 (CentOS 7) and anything newer."""

PIP_PYTHON_VERSIONS: Mapping[str, str] = {"3.9": "3.9.2"}
"""The version pip checks Requires-Python against, where plain ``X.Y`` (pip reads X.Y.0)
is not a release guests run: cryptography excludes 3.9.0 and 3.9.1, so the 3.9 target is
3.9.2+ (Debian 11's, the oldest 3.9 of a supported distribution)."""

PINS_FILE = "wheel-requirements.txt"
"""In the ``guestbus_agent`` package, so that a non-editable install carries it too."""

AGENT_REQUIRES_PYTHON = ">=3.9"
AGENT_CONSOLE_SCRIPT = "guestbus-agent = guestbus_agent.main:main"
PIP_TIMEOUT = 900.0
"""Seconds one ``pip download`` (one target) may take before the build gives up."""

_FORMAT = "guestbus-wheelhouse/1"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
_ZIP_MODE = 0o100644 << 16
_STALE_AFTER = 24 * 3600.0
_PIP_TAIL_LINES = 12


class WheelhouseError(Exception):
    """The wheelhouse cannot be built or does not verify; the message says what to do."""


@dataclass(frozen=True)
class Wheelhouse:
    """A verified wheelhouse directory, ready to copy onto an ISO."""

    path: Path
    """Directory holding the ``*.whl`` files and ``wheelhouse.json``."""
    id: str
    """``<agent_version>-<hash12>``; the hash covers the agent wheel, the pins, the targets."""
    agent_version: str
    files: tuple[Path, ...]
    """Every wheel and ``wheelhouse.json``, sorted by name."""


@dataclass(frozen=True)
class _Pin:
    name: NormalizedName
    version: Version

    def __str__(self) -> str:
        return f"{self.name}=={self.version}"


# --- the agent wheel ------------------------------------------------------------------------


def build_agent_wheel(out_dir: Path) -> Path:
    """Write ``guestbus_agent-<ver>-py3-none-any.whl`` into ``out_dir``; return its path.

    Byte-for-byte reproducible (sorted entries, fixed dates and modes, stored uncompressed so
    no zlib version can change the bytes): the same sources give the same wheel, and so the
    same wheelhouse id.
    """
    name, data = _agent_wheel()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_bytes(data)
    return path


def _agent_version() -> Version:
    try:
        return Version(guestbus_agent.__version__)
    except InvalidVersion as exc:
        raise WheelhouseError(
            f"guestbus_agent.__version__ {guestbus_agent.__version__!r} is not a PEP 440 "
            "version: fix it in agent/guestbus_agent/__init__.py"
        ) from exc


def _pins_path() -> Path:
    return Path(guestbus_agent.__file__).parent / PINS_FILE


def _agent_sources() -> list[tuple[str, Path]]:
    """(name in the wheel, file) for every file the agent wheel carries, sorted by name.

    Found from the imported packages, so it works from a source checkout (editable install)
    and from an installed ``guestbus`` alike.
    """
    entries = {"guestbus/__init__.py": Path(guestbus.__file__)}
    trees = (
        ("guestbus/wire", Path(guestbus.wire.__file__).parent, True),
        ("guestbus_agent", Path(guestbus_agent.__file__).parent, False),
    )
    for prefix, root, only_py in trees:
        for path in root.rglob("*"):
            rel = path.relative_to(root)
            if any(part == "__pycache__" or part.startswith(".") for part in rel.parts):
                continue
            if not path.is_file() or path.suffix in (".pyc", ".pyo"):
                continue
            if only_py and path.suffix != ".py":
                continue
            entries[f"{prefix}/{rel.as_posix()}"] = path
    return sorted(entries.items())


def _record_digest(data: bytes) -> str:
    digest = hashlib.sha256(data).digest()
    return "sha256=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _agent_wheel() -> tuple[str, bytes]:
    version = _agent_version()
    pins = _read_pins(_pins_path())
    dist = canonicalize_name(AGENT_DIST).replace("-", "_")
    dist_info = f"{dist}-{version}.dist-info"
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {AGENT_DIST}",
        f"Version: {version}",
        "Summary: guestbus guest agent: links a VM to its cluster over the serial port",
        "License: Apache-2.0",
        f"Requires-Python: {AGENT_REQUIRES_PYTHON}",
        *(f"Requires-Dist: {pin.name}>={pin.version}" for pin in pins),
    ]
    wheel = [
        "Wheel-Version: 1.0",
        "Generator: guestbus-iso-builder",
        "Root-Is-Purelib: true",
        "Tag: py3-none-any",
    ]
    entry_points = ["[console_scripts]", AGENT_CONSOLE_SCRIPT]
    members = [(name, path.read_bytes()) for name, path in _agent_sources()]
    for member, lines in (
        ("METADATA", metadata),
        ("WHEEL", wheel),
        ("entry_points.txt", entry_points),
    ):
        members.append((f"{dist_info}/{member}", ("\n".join(lines) + "\n").encode()))
    record = [f"{name},{_record_digest(data)},{len(data)}" for name, data in members]
    record.append(f"{dist_info}/RECORD,,")
    members.append((f"{dist_info}/RECORD", ("\n".join(record) + "\n").encode()))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=_ZIP_DATE)
            info.create_system = 3  # Unix, so that the mode below means what it says
            info.external_attr = _ZIP_MODE
            info.compress_type = zipfile.ZIP_STORED
            zf.writestr(info, data)
    return f"{dist}-{version}-py3-none-any.whl", buf.getvalue()


# --- pins and targets -----------------------------------------------------------------------


def _read_pins(path: Path) -> list[_Pin]:
    """The exact ``NAME==VERSION`` pins, sorted by name; anything looser is refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WheelhouseError(
            f"cannot read the agent's pins {path}: {exc}; it ships inside the guestbus_agent "
            "package: reinstall guestbus"
        ) from exc
    pins: dict[NormalizedName, _Pin] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{path}:{lineno}: {line!r}"
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise WheelhouseError(f"{where}: {exc}") from exc
        specs = list(req.specifier)
        if (
            req.url
            or req.extras
            or req.marker is not None
            or len(specs) != 1
            or specs[0].operator != "=="
            or "*" in specs[0].version
        ):
            raise WheelhouseError(
                f"{where}: each line must be an exact pin NAME==VERSION (no extras, markers, "
                "URLs or ranges): one wheel set must serve every target"
            )
        name = canonicalize_name(req.name)
        if name in pins:
            raise WheelhouseError(f"{where}: {name} is pinned twice")
        pins[name] = _Pin(name, Version(specs[0].version))
    if not pins:
        raise WheelhouseError(f"{path} pins nothing: the agent needs its dependencies pinned")
    return sorted(pins.values(), key=lambda pin: pin.name)


def _cp(python: str) -> str:
    return "cp" + python.replace(".", "")


def _targets() -> list[tuple[str, str]]:
    return [(python, arch) for arch in TARGET_ARCHS for python in TARGET_PYTHONS]


def _platforms(arch: str) -> list[str]:
    """Every platform tag a glibc >= TARGET_GLIBC guest of ``arch`` runs, best first."""
    major, newest = TARGET_GLIBC
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    platforms: list[str] = []
    for minor in range(newest, 4, -1):
        platforms.append(f"manylinux_{major}_{minor}_{arch}")
        if major == 2 and minor in legacy:
            platforms.append(f"{legacy[minor]}_{arch}")
    return platforms


def _target_tags(python: str, arch: str) -> frozenset[Tag]:
    version = tuple(int(part) for part in python.split("."))
    platforms = _platforms(arch)
    return frozenset(
        [
            *cpython_tags(version, abis=[_cp(python)], platforms=platforms),
            *compatible_tags(version, interpreter=_cp(python), platforms=platforms),
        ]
    )


def _wheelhouse_id(version: Version, agent_wheel: bytes, pins: list[_Pin]) -> str:
    targets = {
        "format": _FORMAT,
        "pythons": list(TARGET_PYTHONS),
        "pip_pythons": [PIP_PYTHON_VERSIONS.get(python, python) for python in TARGET_PYTHONS],
        "archs": list(TARGET_ARCHS),
        "glibc": list(TARGET_GLIBC),
        "pins": [str(pin) for pin in pins],
        "agent_wheel": hashlib.sha256(agent_wheel).hexdigest(),
    }
    digest = hashlib.sha256(json.dumps(targets, sort_keys=True).encode()).hexdigest()
    return f"{version}-{digest[:12]}"


# --- building -------------------------------------------------------------------------------


def ensure_wheelhouse(
    cache_dir: Path,
    *,
    source: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Wheelhouse:
    """The wheelhouse for the installed agent: from ``<cache_dir>/<id>/``, else built there.

    ``source``: a directory of wheels to take the dependencies from, and only from (for an
    air-gapped host; a wheelhouse made on a connected host will do); without it pip's own
    configuration (``PIP_INDEX_URL``, pip.conf) applies. The build happens in a temporary
    directory beside the cache entry and is renamed into place once complete and verified,
    so concurrent builders cannot corrupt each other and a crash leaves nothing that passes
    for a wheelhouse.
    """
    say = progress if progress is not None else _quiet
    wheel_name, wheel_bytes = _agent_wheel()
    version = _agent_version()
    pins = _read_pins(_pins_path())
    wid = _wheelhouse_id(version, wheel_bytes, pins)
    final = cache_dir / wid

    if final.is_dir():
        try:
            cached = _load_expected(final, wid)
        except WheelhouseError as exc:
            say(f"wheelhouse {wid}: the cached copy does not verify, building it again ({exc})")
        else:
            say(f"wheelhouse {wid}: cached in {final}")
            return cached

    source_dir = _check_source(source, pins)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{wid}.tmp-", dir=cache_dir))
    try:
        (tmp / wheel_name).write_bytes(wheel_bytes)
        targets = _targets()
        for n, (python, arch) in enumerate(targets, 1):
            say(f"downloading for {_cp(python)} {arch} ({n}/{len(targets)})…")
            _pip_download(tmp, pins, python, arch, source_dir)
        wheels = sorted(path.name for path in tmp.iterdir())
        _check_complete(wheels, [_Pin(canonicalize_name(AGENT_DIST), version), *pins])
        manifest = {
            "agent_version": str(version),
            "id": wid,
            "pythons": list(TARGET_PYTHONS),
            "archs": list(TARGET_ARCHS),
            "files": {name: _sha256(tmp / name) for name in wheels},
        }
        (tmp / WHEELHOUSE_MANIFEST).write_text(
            json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )
        tmp.chmod(0o755)  # mkdtemp made it 0700; readers of the cache need not be us
        result = _move_into_place(tmp, final, wid)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"wheelhouse {wid}: {len(result.files)} files in {final}")
    return result


def _quiet(message: str) -> None:
    del message


def _check_source(source: str | None, pins: list[_Pin]) -> Path | None:
    if source is None:
        return None
    path = Path(source).expanduser()
    if not path.is_dir():
        raise WheelhouseError(
            f"the wheel source {source!r} (GUESTBUS_ISO_WHEEL_SOURCE) is not a directory: "
            "point it at a directory of wheels, or unset it to download from the package index"
        )
    if not any(path.glob("*.whl")):
        raise WheelhouseError(
            f"the wheel source {path} (GUESTBUS_ISO_WHEEL_SOURCE) holds no wheels (*.whl): "
            f"it needs {', '.join(map(str, pins))} for CPython {TARGET_PYTHONS[0]}-"
            f"{TARGET_PYTHONS[-1]} on manylinux {'/'.join(TARGET_ARCHS)}; a wheelhouse "
            "directory built on a connected host will do"
        )
    return path.resolve()


def _pip_env(source: Path | None) -> dict[str, str] | None:
    """With a source, pip sees no configuration at all (no index, no extra find-links)."""
    if source is None:
        return None
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no pip.conf either
    return env


def _pip_download(
    dest: Path, pins: list[_Pin], python: str, arch: str, source: Path | None
) -> None:
    target = f"{_cp(python)} {arch}"
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input"]
    cmd += ["--progress-bar", "off", "--only-binary=:all:", "--no-deps", "--dest", str(dest)]
    cmd += ["--python-version", PIP_PYTHON_VERSIONS.get(python, python)]
    cmd += ["--implementation", "cp", "--abi", _cp(python)]
    for platform in _platforms(arch):
        cmd += ["--platform", platform]
    if source is not None:
        cmd += ["--no-index", "--find-links", str(source)]
    cmd += [str(pin) for pin in pins]
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=PIP_TIMEOUT,
            env=_pip_env(source),
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise WheelhouseError(
            f"pip download for {target} took longer than {PIP_TIMEOUT:.0f}s: " + _advice(source)
        ) from exc
    except OSError as exc:
        raise WheelhouseError(f"cannot run pip ({sys.executable} -m pip): {exc}") from exc
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        tail = "\n".join("  " + line for line in lines[-_PIP_TAIL_LINES:])
        where = f"the wheel source {source} only" if source else "pip's configured index"
        raise WheelhouseError(
            f"pip could not download the agent's dependencies for {target} from {where} "
            f"(exit status {proc.returncode}); pip said:\n{tail}\n" + _advice(source)
        )


def _advice(source: Path | None) -> str:
    if source is not None:
        return (
            f"Put wheels of every pin in {source} for CPython {TARGET_PYTHONS[0]}-"
            f"{TARGET_PYTHONS[-1]} on manylinux {'/'.join(TARGET_ARCHS)} (a wheelhouse "
            "directory built on a connected host is a complete source), or unset "
            "GUESTBUS_ISO_WHEEL_SOURCE to use the package index."
        )
    return (
        "Check that the package index is reachable and has these versions (pip's own "
        "settings apply: PIP_INDEX_URL, pip.conf); on a host without network, set "
        "GUESTBUS_ISO_WHEEL_SOURCE to a directory of wheels (for example a wheelhouse "
        "directory copied from a connected host)."
    )


def _check_complete(wheels: Iterable[str], pins: list[_Pin]) -> None:
    """Every pin has a compatible wheel for every target; else say which are missing."""
    parsed: list[tuple[NormalizedName, Version, frozenset[Tag]]] = []
    for name in wheels:
        try:
            dist, version, _build, tags = parse_wheel_filename(name)
        except InvalidWheelFilename as exc:
            raise WheelhouseError(f"unexpected file {name!r} among the wheels: {exc}") from exc
        parsed.append((dist, version, tags))
    missing: list[str] = []
    for python, arch in _targets():
        wanted = _target_tags(python, arch)
        for pin in pins:
            if not any(
                dist == pin.name and version == pin.version and tags & wanted
                for dist, version, tags in parsed
            ):
                missing.append(f"{pin} for {_cp(python)} {arch}")
    if missing:
        raise WheelhouseError(
            "the wheelhouse is incomplete, no compatible wheel of: "
            + "; ".join(missing)
            + ". Choose pins in guestbus_agent/wheel-requirements.txt that publish wheels "
            "for every target (or add those wheels to the wheel source)."
        )


def _move_into_place(tmp: Path, final: Path, wid: str) -> Wheelhouse:
    """Rename the finished build to ``final``; a concurrent builder's valid result wins."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        else:
            return _load_expected(final, wid)
        try:
            existing = _load_expected(final, wid)
        except WheelhouseError:
            _discard(final)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
            return existing
    raise WheelhouseError(f"could not put the wheelhouse in place at {final}: it keeps changing")


def _discard(path: Path) -> None:
    """Move ``path`` out of the way in one rename, then delete it."""
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    with contextlib.suppress(FileNotFoundError):  # another builder took it away first
        os.rename(path, aside / path.name)
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale(cache_dir: Path) -> None:
    """Delete what crashed builds left (temporary directories a day old)."""
    cutoff = time.time() - _STALE_AFTER
    for entry in cache_dir.iterdir():
        if not entry.name.startswith(".") or not (".tmp-" in entry.name or ".old-" in entry.name):
            continue
        try:
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def prune_wheelhouses(cache_dir: Path, keep: Wheelhouse, min_age: float = 3600.0) -> list[str]:
    """Remove the cache's other wheelhouses (older agent versions or pins, ~21 MB each) that
    were not touched for ``min_age`` seconds; returns their names."""
    removed: list[str] = []
    cutoff = time.time() - min_age
    for entry in cache_dir.iterdir():
        if entry.name.startswith(".") or entry.resolve() == keep.path.resolve():
            continue
        try:
            if not (entry / WHEELHOUSE_MANIFEST).is_file() or entry.stat().st_mtime > cutoff:
                continue
        except OSError:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed


# --- verifying ------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_wheelhouse(path: Path) -> Wheelhouse:
    """Read ``wheelhouse.json`` in ``path`` and check every file against it.

    Raises :class:`WheelhouseError` naming what is off: no or unreadable manifest, a file
    missing, an unlisted file, or a sha256 mismatch (a damaged or tampered wheel).
    """
    manifest_path = path / WHEELHOUSE_MANIFEST
    rebuild = "delete the directory and build the wheelhouse again"
    try:
        data: Any = json.loads(manifest_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WheelhouseError(
            f"{path} is not a wheelhouse: cannot read its manifest: {exc}"
        ) from exc
    except ValueError as exc:
        raise WheelhouseError(f"{manifest_path} is not valid JSON ({exc}): {rebuild}") from exc
    if not isinstance(data, dict):
        raise WheelhouseError(f"{manifest_path} is not a JSON object: {rebuild}")
    wid, agent_version, files = data.get("id"), data.get("agent_version"), data.get("files")
    if not (
        isinstance(wid, str)
        and isinstance(agent_version, str)
        and isinstance(files, dict)
        and all(isinstance(name, str) and isinstance(h, str) for name, h in files.items())
    ):
        raise WheelhouseError(
            f"{manifest_path} lacks id, agent_version or files (name -> sha256): {rebuild}"
        )
    for name in files:
        if name != Path(name).name or not name.endswith(".whl"):
            raise WheelhouseError(f"{manifest_path} lists {name!r}, not a wheel file name")
    try:
        present = {entry.name for entry in path.iterdir()} - {WHEELHOUSE_MANIFEST}
    except OSError as exc:
        raise WheelhouseError(f"cannot list {path}: {exc}") from exc
    problems = [f"{name}: missing" for name in sorted(files.keys() - present)]
    problems += [f"{name}: not in the manifest" for name in sorted(present - files.keys())]
    for name in sorted(files.keys() & present):
        try:
            actual = _sha256(path / name)
        except OSError as exc:
            problems.append(f"{name}: unreadable ({exc})")
            continue
        if actual != files[name]:
            problems.append(f"{name}: sha256 {actual} differs from the manifest's")
    if problems:
        raise WheelhouseError(
            f"wheelhouse {path} does not verify (damaged or tampered with): "
            + "; ".join(problems)
            + f"; {rebuild}"
        )
    listed = [path / name for name in files] + [manifest_path]
    return Wheelhouse(
        path=path,
        id=wid,
        agent_version=agent_version,
        files=tuple(sorted(listed, key=lambda p: p.name)),
    )


def _load_expected(path: Path, wid: str) -> Wheelhouse:
    wheelhouse = load_wheelhouse(path)
    if wheelhouse.id != wid:
        raise WheelhouseError(f"{path} holds wheelhouse {wheelhouse.id}, not {wid}")
    return wheelhouse
