"""Running a guest's own script safely: which files may run, the environment they get, and
stopping their whole process group. Shared by the DR recovery script (``recovery.py``) and
the freeze hooks (``quiesce.py``); they differ only in how strict the file check is and in
how they wait (asyncio, or a thread that must work while the event loop may be stuck).

CPython 3.9+, standard library only.
"""

import contextlib
import os
import stat
from typing import Dict, List, Optional, Tuple

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def script_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """A minimal environment (nothing of the agent's own leaks in), plus ``extra``."""
    env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    env.update(extra or {})
    return env


def inspect(path: str, exact_mode: Optional[int] = None) -> Optional[Tuple[str, str]]:
    """None when ``path`` may run, else ``("missing" | "refused", reason)``.

    Always: a regular file (not a symbolic link) owned by root. With ``exact_mode`` its mode
    must be exactly that (the freeze hooks: 0700); without, it must not be writable by group
    or others and must be executable by its owner (the DR recovery script).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "missing", f"{path} does not exist"
    except OSError as exc:
        return "refused", f"{path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return "refused", f"{path} is a symbolic link, must be a file"
    if not stat.S_ISREG(st.st_mode):
        return "refused", f"{path} is not a regular file"
    wrong: List[str] = []
    if st.st_uid != 0:
        wrong.append(f"owned by uid {st.st_uid}, must be root")
    mode = stat.S_IMODE(st.st_mode)
    if exact_mode is not None:
        if mode != exact_mode:
            wrong.append(f"mode {mode:04o}, must be {exact_mode:04o}")
    else:
        if mode & 0o022:
            wrong.append(f"mode {mode:04o}, must be: not writable by group or others")
        if not mode & stat.S_IXUSR:
            wrong.append(f"mode {mode:04o}, not executable")
    if wrong:
        return "refused", f"{path}: " + "; ".join(wrong)
    return None


def kill_group(pgid: int, sig: int) -> None:
    """Signal a script's whole process group (it runs in a session of its own)."""
    with contextlib.suppress(OSError):
        os.killpg(pgid, sig)
