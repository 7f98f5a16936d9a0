"""App-consistent snapshots, guest side: ``pre_freeze``, FIFREEZE, a self-thaw guard, FITHAW,
``post_thaw`` (host commands ``freeze``, ``thaw`` and ``freeze_status``).

- The file systems frozen are the writable local ones (:func:`select`): block-device backed,
  of a type FIFREEZE works on, not excluded by the config nor under the restore directory,
  each superblock once (bind mounts and btrfs subvolumes share one), children before parents.
- ``pre_freeze`` and ``post_thaw`` run only when they are regular files owned by root with
  mode 0700, in their own process group, killed as a group at a hard timeout.
- What a snapshot taken while frozen is worth is always said (``consistency`` and ``notes``):
  ``application`` (pre_freeze ran fine), ``filesystem`` (no pre_freeze: applications were not
  quiesced) or ``crash`` (nothing frozen, and why).
- A guard thread thaws at the deadline even when the event loop is stuck (e.g. on a write to
  the journal, which lives on a frozen file system), then runs ``post_thaw``.

While frozen the agent must not write to disk: everything the freeze/thaw path needs is
imported here, at module import, and nothing in it writes a file or logs between the freeze
and the thaw. CPython 3.9+, standard library only.
"""

import asyncio
import concurrent.futures
import contextlib
import datetime
import errno
import fcntl
import logging
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from guestbus.wire import errors
from guestbus.wire.aio import RemoteError

from .config import AgentConfig
from .scripts import inspect, kill_group, script_env

log = logging.getLogger("guestbus.agent.quiesce")

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
# The contract's PRE_FREEZE_SCRIPT / POST_THAW_SCRIPT (the agent cannot import the contract).
PRE_FREEZE_SCRIPT = "/usr/local/sbin/pre_freeze"
POST_THAW_SCRIPT = "/usr/local/sbin/post_thaw"
RESTORE_DIR = "/mnt/guestbus-restore"
MOUNTINFO = "/proc/self/mountinfo"
DEADLINE_DEFAULT = 60.0
DEADLINE_MAX = 600.0
SCRIPT_TIMEOUT_DEFAULT = 30.0
OUTPUT_TAIL = 4096  # characters of a script's output kept (ScriptOutcome.output)

# File systems FIFREEZE is meant for. Other block-device file systems (vfat, exfat, ntfs…)
# have no freeze support in the kernel: they are listed in the notes, never silently skipped.
FREEZABLE_TYPES = frozenset(
    {"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "reiserfs", "nilfs2", "gfs2"}
    | {"bcachefs"}
)
# Never candidates, whatever their source says (network, virtual, overlay, read-only media).
NOT_LOCAL_TYPES = frozenset(
    {
        "proc",
        "sysfs",
        "tmpfs",
        "devtmpfs",
        "devpts",
        "ramfs",
        "securityfs",
        "debugfs",
        "tracefs",
        "configfs",
        "pstore",
        "efivarfs",
        "bpf",
        "mqueue",
        "hugetlbfs",
        "binfmt_misc",
        "fusectl",
        "rpc_pipefs",
        "nsfs",
        "cgroup",
        "cgroup2",
        "overlay",
        "aufs",
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "ceph",
        "glusterfs",
        "9p",
        "virtiofs",
        "iso9660",
        "udf",
        "squashfs",
        "erofs",
        "autofs",
        "zfs",
    }
)
_NOT_LOCAL_PREFIXES = ("fuse", "cgroup", "nfs")
_ESCAPE = re.compile(r"\\([0-7]{3})")
_SNAPSHOT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


# --- mount table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    mount_id: int
    parent_id: int
    device: str  # major:minor of the superblock: bind mounts of one file system share it
    root: str
    mount_point: str
    options: Tuple[str, ...]
    fstype: str
    source: str
    super_options: Tuple[str, ...] = ()

    @property
    def read_only(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options


def unescape(text: str) -> str:
    """Undo the kernel's octal escapes (``\\040`` space, ``\\011`` tab, ``\\134`` backslash)."""
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> List[Mount]:
    """Every well-formed line of a mountinfo text, in its order (malformed lines skipped)."""
    mounts: List[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            dash = fields.index("-", 6)
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    device=fields[2],
                    root=unescape(fields[3]),
                    mount_point=unescape(fields[4]),
                    options=tuple(fields[5].split(",")),
                    fstype=fields[dash + 1],
                    source=unescape(fields[dash + 2]),
                    super_options=tuple(fields[dash + 3].split(","))
                    if len(fields) > dash + 3
                    else (),
                )
            )
        except (ValueError, IndexError):
            continue
    return mounts


def read_mountinfo(path: str = MOUNTINFO) -> List[Mount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return parse_mountinfo(f.read())


def _is_local(fstype: str) -> bool:
    return fstype not in NOT_LOCAL_TYPES and not fstype.startswith(_NOT_LOCAL_PREFIXES)


def _under(path: str, directory: str) -> bool:
    directory = directory.rstrip("/") or "/"
    return path == directory or path.startswith(directory + "/") or directory == "/"


@dataclass
class Selection:
    freeze: List[Mount] = field(default_factory=list)  # in freeze order
    excluded: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def select(mounts: Sequence[Mount], exclude: Iterable[str], restore_dir: str) -> Selection:
    """The mounts to freeze, in freeze order (the reverse of the mount table: children first).

    A file system is frozen through its first writable mount; one that is excluded (or is
    mounted under ``restore_dir``) at any of its mount points is not frozen at all, since
    freezing any of them freezes them all.
    """
    excluded_points = {p.rstrip("/") or "/" for p in exclude}
    sel = Selection()
    blocked: Set[str] = set()
    for m in mounts:
        if m.mount_point in excluded_points or _under(m.mount_point, restore_dir):
            blocked.add(m.device)
    chosen: Dict[str, Mount] = {}
    for m in mounts:
        if m.read_only or not m.source.startswith("/dev/") or not _is_local(m.fstype):
            continue
        if m.device in blocked:
            if m.mount_point not in sel.excluded:
                sel.excluded.append(m.mount_point)
            continue
        if m.device in chosen:
            continue  # a bind mount (or a btrfs subvolume) of a file system already chosen
        if m.fstype not in FREEZABLE_TYPES:
            sel.notes.append(f"not frozen: {m.mount_point} ({m.fstype} cannot be frozen)")
            continue
        chosen[m.device] = m
    sel.freeze = list(reversed(list(chosen.values())))
    return sel


# --- scripts -------------------------------------------------------------------------------


def outcome(
    path: str,
    state: str,
    exit_code: Optional[int] = None,
    seconds: Optional[float] = None,
    reason: Optional[str] = None,
    output: str = "",
) -> Dict[str, Any]:
    """A contract ScriptOutcome."""
    return {
        "path": path,
        "state": state,
        "exit_code": exit_code,
        "seconds": seconds,
        "reason": reason,
        "output": output[-OUTPUT_TAIL:],
    }


def check_script(path: str) -> Optional[Dict[str, Any]]:
    """None when ``path`` may run (a regular file, root's, mode 0700); else its outcome."""
    problem = inspect(path, exact_mode=0o700)
    return None if problem is None else outcome(path, problem[0], reason=problem[1])


def run_script(path: str, timeout: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run ``path`` (if :func:`check_script` allows) for at most ``timeout`` seconds.

    Blocking: the event loop calls it in a thread. The script runs in a new session; at the
    timeout its whole process group is killed (SIGKILL).
    """
    refused = check_script(path)
    if refused is not None:
        return refused
    full_env = script_env(env)
    started = time.monotonic()
    try:
        proc = subprocess.Popen(
            [path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd="/",
            start_new_session=True,
        )
    except OSError as exc:
        return outcome(path, "failed", reason=f"cannot run {path}: {exc.strerror or exc}")
    tail = bytearray()
    assert proc.stdout is not None
    out_fd = proc.stdout.fileno()

    def read() -> None:
        # Until EOF: a child the script leaves in the background (e.g. one that holds a
        # database lock until post_thaw) may keep the pipe open; it is drained meanwhile.
        try:
            while True:
                chunk = os.read(out_fd, 65536)
                if not chunk:
                    return
                tail.extend(chunk)
                del tail[: -OUTPUT_TAIL * 4]
        except OSError:
            return
        finally:
            assert proc.stdout is not None
            proc.stdout.close()

    reader = threading.Thread(target=read, name="script-output", daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        kill_group(proc.pid, signal.SIGKILL)  # the whole group: children it started go with it
    finally:
        if proc.returncode is None:
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(2.0 if timed_out else 0.5)
    seconds = round(time.monotonic() - started, 3)
    text = bytes(tail).decode("utf-8", "replace")
    code = proc.returncode
    if timed_out:
        return outcome(
            path, "timeout", None, seconds, f"killed at its timeout of {timeout:g} s", text
        )
    if code == 0:
        return outcome(path, "ok", 0, seconds, None, text)
    if code < 0:
        return outcome(path, "failed", None, seconds, f"killed by signal {-code}", text)
    return outcome(path, "failed", code, seconds, f"exit status {code}", text)


# --- the quiescer --------------------------------------------------------------------------


def _iso(epoch: Optional[float]) -> Optional[str]:
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).isoformat()


@dataclass
class SelfThaw:
    """What the deadline guard did; reported by the next ``thaw``."""

    thawed: List[str]
    at: float
    frozen_seconds: Optional[float]
    deadline: float
    post_thaw: "concurrent.futures.Future[Dict[str, Any]]"
    errors: List[str] = field(default_factory=list)


MountsFn = Callable[[], List[Mount]]


class Quiescer:
    """Freeze and thaw this guest's file systems; one freeze at a time.

    ``mounts_fn`` says which mounts exist (default: ``/proc/self/mountinfo``). Tests pass a
    function that returns only their own loop mounts, so they never freeze the machine's.
    """

    def __init__(
        self,
        *,
        deadline: float = DEADLINE_DEFAULT,
        script_timeout: float = SCRIPT_TIMEOUT_DEFAULT,
        exclude: Iterable[str] = (),
        restore_dir: str = RESTORE_DIR,
        pre_freeze: str = PRE_FREEZE_SCRIPT,
        post_thaw: str = POST_THAW_SCRIPT,
        mounts_fn: Optional[MountsFn] = None,
    ) -> None:
        self.deadline = float(deadline)
        self.script_timeout = float(script_timeout)
        self.exclude = tuple(exclude)
        self.restore_dir = restore_dir
        self.pre_freeze_path = pre_freeze
        self.post_thaw_path = post_thaw
        self.mounts_fn: MountsFn = mounts_fn or read_mountinfo
        self.self_thaws = 0
        self.last_self_thaw: Optional[float] = None
        # Shared by the guard thread and the event loop: only ioctls and bookkeeping under it.
        self._lock = threading.Lock()
        self._op: Optional[asyncio.Lock] = None  # held by a freeze in progress
        self._frozen: List[Tuple[str, int]] = []  # (mount point, open fd), in freeze order
        self._post_owed = False  # pre_freeze started or file systems frozen: post_thaw is due
        self._generation = 0
        self._timer: Optional[threading.Timer] = None
        self._since: Optional[float] = None  # wall clock
        self._since_mono: Optional[float] = None
        self._deadline_at: Optional[float] = None
        self._self_thaw: Optional[SelfThaw] = None
        self._snapshot_env: Dict[str, str] = {}

    @classmethod
    def from_config(cls, config: AgentConfig) -> "Quiescer":
        """The real one, for an AgentConfig (freeze_* fields, restore_dir)."""
        return cls(
            deadline=config.freeze_deadline,
            script_timeout=config.freeze_script_timeout,
            exclude=config.freeze_exclude,
            restore_dir=config.restore_dir,
        )

    @classmethod
    def inert(cls) -> "Quiescer":
        """One that finds no file system and no script (lab agents share the host's)."""
        return cls(mounts_fn=lambda: [], pre_freeze="", post_thaw="")

    # --- commands --------------------------------------------------------------------------

    async def freeze(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Host command ``freeze`` (FreezeRequest → FreezeResult)."""
        deadline = self._deadline_of(params)
        snapshot = params.get("snapshot")
        if snapshot is not None and not (isinstance(snapshot, str) and len(snapshot) <= 64):
            raise RemoteError(
                errors.BAD_REQUEST, "'snapshot' must be a string of at most 64 characters"
            )
        op = self._op_lock()
        if op.locked() or self._frozen or self._post_owed:
            what = "frozen" if self._frozen else "being frozen or thawed, or not yet thawed"
            raise RemoteError(
                errors.FROZEN,
                f"the file systems are {what} already (since {_iso(self._since) or 'now'}): "
                "send thaw first",
            )
        async with op:
            return await self._freeze(deadline, snapshot)

    async def thaw(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Host command ``thaw`` (→ ThawResult)."""
        async with self._op_lock():  # a freeze in progress completes first, then is undone
            return await self._thaw()

    async def _thaw(self) -> Dict[str, Any]:
        with self._lock:
            self._cancel_guard()
            had_freeze = bool(self._frozen)
            thawed, problems = self._thaw_locked()
            owed, self._post_owed = self._post_owed, False
            since = self._since_mono
            record = self._self_thaw
            self._since = self._since_mono = self._deadline_at = None
        notes = list(problems)
        frozen_seconds = round(time.monotonic() - since, 3) if had_freeze and since else None
        if thawed or problems:
            log.info("thawed %s", ", ".join(thawed) or "nothing")
        loop = asyncio.get_running_loop()
        if had_freeze or owed:
            if not had_freeze:
                notes.append("nothing was frozen; post_thaw runs because pre_freeze ran")
            post = await loop.run_in_executor(None, self._run, self.post_thaw_path)
            self._log_script("post_thaw", post)
            return self._thaw_result(thawed, post, frozen_seconds, False, notes)
        if record is not None:
            post = await asyncio.wrap_future(record.post_thaw)
            notes.append(
                f"the freeze deadline of {record.deadline:g} s passed at {_iso(record.at)}: "
                "the guest had thawed by itself"
            )
            return self._thaw_result(
                record.thawed, post, record.frozen_seconds, True, notes + record.errors
            )
        post = outcome(self.post_thaw_path, "skipped", reason="nothing was frozen")
        return self._thaw_result([], post, None, False, notes)

    async def status(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Host command ``freeze_status`` (→ FreezeStatus)."""
        return self.status_now()

    def is_frozen(self) -> bool:
        return bool(self._frozen)

    def status_now(self) -> Dict[str, Any]:
        with self._lock:
            return {
                "frozen": bool(self._frozen),
                "mounts": [mp for mp, _ in self._frozen],
                "since": _iso(self._since) if self._frozen else None,
                "deadline": _iso(self._deadline_at) if self._frozen else None,
                "self_thaws": self.self_thaws,
                "last_self_thaw": _iso(self.last_self_thaw),
            }

    def shutdown(self) -> None:
        """The agent stops: never leave the guest frozen or its applications quiesced."""
        with self._lock:
            self._cancel_guard()
            thawed, _ = self._thaw_locked()
            owed, self._post_owed = self._post_owed, False
        if thawed:
            log.warning("agent stopping while frozen: thawed %s", ", ".join(thawed))
        if owed:
            self._log_script("post_thaw", self._run(self.post_thaw_path))

    # --- freezing --------------------------------------------------------------------------

    def _op_lock(self) -> asyncio.Lock:
        if self._op is None:  # made in the running loop (Python 3.9 binds locks to one)
            self._op = asyncio.Lock()
        return self._op

    def _deadline_of(self, params: Dict[str, Any]) -> float:
        value = params.get("deadline")
        if value is None:
            return self.deadline
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RemoteError(errors.BAD_REQUEST, "'deadline' must be a number of seconds")
        if not 0 < value <= DEADLINE_MAX:
            raise RemoteError(
                errors.BAD_REQUEST, f"'deadline' must be > 0 and at most {DEADLINE_MAX:g} s"
            )
        return min(float(value), self.deadline)

    def _run(self, path: str) -> Dict[str, Any]:
        if not path:
            return outcome(path, "missing", reason="no script is configured")
        return run_script(path, self.script_timeout, self._snapshot_env)

    async def _freeze(self, deadline: float, snapshot: Optional[str]) -> Dict[str, Any]:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        self._self_thaw = None
        # The scripts see the snapshot's name when it is a plain one.
        named = snapshot is not None and _SNAPSHOT_NAME.match(snapshot)
        self._snapshot_env = {"GUESTBUS_SNAPSHOT": snapshot} if snapshot and named else {}
        try:
            sel = select(self.mounts_fn(), self.exclude, self.restore_dir)
        except OSError as exc:
            raise RemoteError(
                errors.INTERNAL, f"cannot read the mount table: {exc.strerror or exc}"
            ) from None
        notes = list(sel.notes)
        log.info(
            "freeze%s: pre_freeze, then %s (deadline %g s)",
            f" for snapshot {snapshot}" if snapshot else "",
            ", ".join(m.mount_point for m in sel.freeze) or "no file system",
            deadline,
        )
        pre = await loop.run_in_executor(None, self._run, self.pre_freeze_path)
        self._log_script("pre_freeze", pre)

        def result(frozen: List[str], consistency: str) -> Dict[str, Any]:
            return {
                "frozen": frozen,
                "excluded": sel.excluded,
                "consistency": consistency,
                "pre_freeze": pre,
                "seconds": round(time.monotonic() - started, 3),
                "deadline_seconds": deadline,
                "notes": notes,
            }

        if pre["state"] not in ("ok", "missing"):
            notes.append(
                f"pre_freeze {pre['state']} ({pre['reason']}): nothing was frozen, a snapshot "
                "now is only crash-consistent"
            )
            if pre["state"] in ("failed", "timeout"):
                # It may have quiesced applications: post_thaw is owed, by thaw or the guard.
                with self._lock:
                    self._post_owed = True
                    self._arm_guard(deadline)
            return result([], "crash")
        consistency = "application"
        if pre["state"] == "missing":
            consistency = "filesystem"
            notes.append(
                f"no pre_freeze script ({self.pre_freeze_path or 'none configured'}): "
                "applications were not quiesced, a snapshot is file-system consistent only"
            )
        frozen, failure = await loop.run_in_executor(
            None, self._freeze_mounts, sel.freeze, deadline, notes
        )
        if failure is not None:
            # Logged once thawed: the journal may live on one of them.
            log.warning("freeze failed, thawed again: %s", failure)
            return result([], "crash")
        return result(frozen, consistency)

    def _freeze_mounts(
        self, mounts: List[Mount], deadline: float, notes: List[str]
    ) -> Tuple[List[str], Optional[str]]:
        """Freeze ``mounts`` in order (in a thread: FIFREEZE syncs first, which takes a while).

        Returns the mount points frozen and, if one could not be frozen, why (and then none
        is left frozen).
        """
        # Open every mount point before freezing any: no path lookups while frozen.
        opened: List[Tuple[str, int]] = []
        failure: Optional[str] = None
        for m in mounts:
            try:
                opened.append((m.mount_point, os.open(m.mount_point, os.O_RDONLY | os.O_DIRECTORY)))
            except OSError as exc:
                failure = f"cannot open {m.mount_point}: {exc.strerror or exc}"
                break
        handed: Set[int] = set()  # fds now owned by self._frozen (closed when thawed)
        with self._lock:
            self._post_owed = True  # pre_freeze ran, or the file systems are about to freeze
            self._arm_guard(deadline)
            if failure is None:
                for mount_point, fd in opened:
                    try:
                        fcntl.ioctl(fd, FIFREEZE, 0)
                    except OSError as exc:
                        if exc.errno == errno.EOPNOTSUPP:
                            notes.append(f"not frozen: {mount_point} (freezing is not supported)")
                            continue
                        failure = f"cannot freeze {mount_point}: {exc.strerror or exc}"
                        break
                    self._frozen.append((mount_point, fd))
                    handed.add(fd)
            thawed: List[str] = []
            if failure is not None:
                thawed, problems = self._thaw_locked()
                notes.extend(problems)
            frozen = [mp for mp, _ in self._frozen]
            now = time.time()
            self._since, self._since_mono = now, time.monotonic()
            self._deadline_at = now + deadline
        for _, fd in opened:
            if fd not in handed:
                _close(fd)
        if failure is not None:
            notes.append(
                f"{failure}: thawed {', '.join(thawed) or 'nothing'} again, a snapshot now is "
                "only crash-consistent"
            )
        return frozen, failure

    # --- thawing (under self._lock) --------------------------------------------------------

    def _thaw_locked(self) -> Tuple[List[str], List[str]]:
        """Thaw in the reverse of the freeze order; no logging, no I/O but the ioctls."""
        thawed: List[str] = []
        problems: List[str] = []
        frozen, self._frozen = self._frozen, []
        for mount_point, fd in reversed(frozen):
            try:
                fcntl.ioctl(fd, FITHAW, 0)
                thawed.append(mount_point)
            except OSError as exc:
                # EINVAL: someone thawed it already (fsfreeze -u): it is not frozen either way.
                problems.append(f"thawing {mount_point}: {exc.strerror or exc}")
            finally:
                _close(fd)
        return thawed, problems

    def _cancel_guard(self) -> None:
        self._generation += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm_guard(self, deadline: float) -> None:
        self._cancel_guard()
        timer = threading.Timer(deadline, self._expire, args=(self._generation, deadline))
        timer.daemon = True
        timer.name = "freeze-deadline"
        self._timer = timer
        timer.start()

    def _expire(self, generation: int, deadline: float) -> None:
        """The guard thread at the deadline: thaw (ioctls first), then post_thaw, then log."""
        with self._lock:
            if generation != self._generation:
                return
            self._cancel_guard()  # (this timer) and any stale caller is ignored from now on
            since = self._since_mono
            thawed, problems = self._thaw_locked()
            owed, self._post_owed = self._post_owed, False
            now = time.time()
            post: concurrent.futures.Future[Dict[str, Any]] = concurrent.futures.Future()
            self._self_thaw = SelfThaw(
                thawed=thawed,
                at=now,
                frozen_seconds=round(time.monotonic() - since, 3) if since else None,
                deadline=deadline,
                post_thaw=post,
                errors=problems,
            )
            self._since = self._since_mono = self._deadline_at = None
            if thawed:
                self.self_thaws += 1
                self.last_self_thaw = now
        log.warning(
            "no thaw within the freeze deadline of %g s: thawed %s by itself%s",
            deadline,
            ", ".join(thawed) or "nothing",
            "; running post_thaw" if owed else "",
        )
        # post_thaw runs here, in the guard's thread: the event loop may still be catching up.
        try:
            result = (
                self._run(self.post_thaw_path)
                if owed
                else outcome(self.post_thaw_path, "skipped", reason="pre_freeze did not run")
            )
        except Exception as exc:  # never lose the reason: the next thaw reports it
            result = outcome(self.post_thaw_path, "failed", reason=f"cannot run: {exc}")
        if owed:
            self._log_script("post_thaw", result)
        post.set_result(result)

    @staticmethod
    def _thaw_result(
        thawed: List[str],
        post: Dict[str, Any],
        frozen_seconds: Optional[float],
        self_thawed: bool,
        notes: List[str],
    ) -> Dict[str, Any]:
        return {
            "thawed": thawed,
            "post_thaw": post,
            "frozen_seconds": frozen_seconds,
            "self_thawed": self_thawed,
            "notes": notes,
        }

    @staticmethod
    def _log_script(name: str, result: Dict[str, Any]) -> None:
        state = result["state"]
        if state == "ok":
            log.info("%s ran (%.1f s)", name, result["seconds"] or 0.0)
        elif state == "missing":
            log.info("%s: %s", name, result["reason"])
        else:
            log.warning("%s %s: %s", name, state, result["reason"])


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
