"""Running the guest's DR recovery script: fixed path, root-owned, hard timeout, output tail.

CPython 3.9+, standard library only. The script runs in its own session (process group),
so at its timeout the whole group is stopped: SIGTERM, then SIGKILL after a grace period.
Only the last bytes of its output are kept (a chatty script cannot fill the agent's memory),
and only ``GUESTBUS_DR_*`` / ``GUESTBUS_VM`` variables from the change reach its environment.
"""

import asyncio
import contextlib
import os
import re
import signal
import stat
import time
from pathlib import Path
from typing import Any, Dict, Optional

TAIL_BYTES = 4096
KILL_GRACE = 5.0
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV_NAME = re.compile(r"^GUESTBUS_(DR_[A-Z0-9_]{1,64}|VM)$")


def allowed_env(env: Dict[str, Any]) -> Dict[str, str]:
    """The variables a change may set; raises ValueError naming any other."""
    bad = sorted(k for k in env if not _ENV_NAME.match(str(k)))
    if bad:
        raise ValueError("only GUESTBUS_DR_* and GUESTBUS_VM may be set, not " + ", ".join(bad))
    return {str(k): str(v)[:4096] for k, v in env.items()}


def check_script(path: Path) -> Optional[Dict[str, Any]]:
    """None when ``path`` may run; else the result that says why not."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return {"outcome": "not_found", "path": str(path), "reason": f"{path} does not exist"}
    except OSError as exc:
        return {"outcome": "refused", "path": str(path), "reason": f"{path}: {exc.strerror}"}
    if not stat.S_ISREG(st.st_mode):
        return {"outcome": "refused", "path": str(path), "reason": f"{path} is not a regular file"}
    if st.st_uid != 0 or st.st_mode & 0o022:
        return {
            "outcome": "refused",
            "path": str(path),
            "reason": f"{path} must be owned by root and not writable by group or others "
            f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})",
        }
    if not st.st_mode & stat.S_IXUSR:
        return {"outcome": "refused", "path": str(path), "reason": f"{path} is not executable"}
    return None


async def run_script(path: Path, env: Dict[str, str], timeout: float) -> Dict[str, Any]:
    """Run ``path`` with ``env`` (added to a minimal environment) for at most ``timeout`` s."""
    refused = check_script(path)
    if refused is not None:
        return refused
    full_env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    full_env.update(env)
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=full_env,
        cwd="/",
        start_new_session=True,
    )
    tail = bytearray()
    total = 0

    async def read() -> None:
        nonlocal total
        assert proc.stdout is not None
        while True:
            chunk = await proc.stdout.read(65536)
            if not chunk:
                return
            total += len(chunk)
            tail.extend(chunk)
            del tail[:-TAIL_BYTES]

    reader = asyncio.ensure_future(read())
    timed_out = False
    try:
        await asyncio.wait_for(asyncio.shield(proc.wait()), timeout)
    except asyncio.TimeoutError:
        timed_out = True
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE)
        except asyncio.TimeoutError:
            _kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled: never leave the script behind
            _kill_group(proc.pid, signal.SIGKILL)
    # Children that kept the pipe open are in the group and were stopped with it.
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(reader, 2.0)
    reader.cancel()
    code = proc.returncode
    seconds = round(time.monotonic() - started, 3)
    result: Dict[str, Any] = {
        "path": str(path),
        "seconds": seconds,
        "tail": tail.decode("utf-8", "replace"),
        "output_bytes": total,
        "exit_code": code if code is not None and code >= 0 else None,
        "signal": -code if code is not None and code < 0 else None,
    }
    if timed_out:
        result.update(outcome="timeout", reason=f"killed after its timeout of {timeout:g} s")
    elif code == 0:
        result["outcome"] = "ok"
    else:
        why = f"exit status {code}" if code is not None and code >= 0 else f"signal {-(code or 0)}"
        result.update(outcome="failed", reason=f"{path.name} ended with {why}")
    return result


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)
