"""Running the guest's DR recovery script: fixed path, root-owned, hard timeout, output tail.

CPython 3.9+, standard library only. The script runs in its own session (process group),
so at its timeout the whole group is stopped: SIGTERM, then SIGKILL after a grace period.
Only the last bytes of its output are kept (a chatty script cannot fill the agent's memory),
and only ``GUESTBUS_DR_*`` / ``GUESTBUS_VM`` variables from the change reach its environment.
"""

import asyncio
import contextlib
import re
import signal
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .scripts import inspect, kill_group, script_env

TAIL_BYTES = 4096
KILL_GRACE = 5.0
_ENV_NAME = re.compile(r"^GUESTBUS_(DR_[A-Z0-9_]{1,64}|VM)$")


def allowed_env(env: Dict[str, Any]) -> Dict[str, str]:
    """The variables a change may set; raises ValueError naming any other."""
    bad = sorted(k for k in env if not _ENV_NAME.match(str(k)))
    if bad:
        raise ValueError("only GUESTBUS_DR_* and GUESTBUS_VM may be set, not " + ", ".join(bad))
    return {str(k): str(v)[:4096] for k, v in env.items()}


def check_script(path: Path) -> Optional[Dict[str, Any]]:
    """None when ``path`` may run; else the result that says why not."""
    problem = inspect(str(path))
    if problem is None:
        return None
    state, reason = problem
    return {
        "outcome": "not_found" if state == "missing" else "refused",
        "path": str(path),
        "reason": reason,
    }


async def run_script(path: Path, env: Dict[str, str], timeout: float) -> Dict[str, Any]:
    """Run ``path`` with ``env`` (added to a minimal environment) for at most ``timeout`` s."""
    refused = check_script(path)
    if refused is not None:
        return refused
    full_env = script_env(env)
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
        kill_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(proc.wait()), KILL_GRACE)
        except asyncio.TimeoutError:
            kill_group(proc.pid, signal.SIGKILL)
            await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled: never leave the script behind
            kill_group(proc.pid, signal.SIGKILL)
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
