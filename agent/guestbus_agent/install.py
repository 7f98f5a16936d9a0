#!/usr/bin/env python3
"""Install, upgrade or remove the guestbus agent, from the GUESTBUS ISO it sits on.

    sh install.sh                       install or upgrade, enable and (re)start the service
    sh install.sh --no-start            the same, but do not (re)start it
    sh install.sh --uninstall [--purge] remove it (--purge: the VM's identity too)
    sh install.sh --root DIR            install under DIR instead of / (tests, inspection)

It runs before the agent exists in the guest, so it is standard library only and carries its
own copy of the few names of ``guestbus_agent/layout.py`` it needs (a test checks that they
agree). CPython 3.9+; older Pythons can still parse it, so they get a clear message.

Nothing outside its own virtualenv is installed with pip, and nothing is downloaded: the
wheels come from the ISO's ``wheels/`` and are checked against ``wheelhouse.json`` before
any is used. Taking the config and certificate is the installed agent's job
(``guestbus-agent --take-config-from``), so the rule for what replaces what exists once.
Expected problems end with one message and exit status 1, never a traceback.
"""

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

# --- copied from guestbus_agent/layout.py (the installer cannot import it) ----------------
ISO_CONFIG = "config.json"
ISO_UNIT = "guestbus-agent.service"
ISO_WHEELS = "wheels"
WHEELHOUSE_MANIFEST = "wheelhouse.json"
PREFIX = "/opt/guestbus"
VENV = PREFIX + "/venv"
AGENT_BIN = VENV + "/bin/guestbus-agent"
ETC_DIR = "/etc/guestbus"
CONFIG_PATH = ETC_DIR + "/config.json"
UNIT_NAME = "guestbus-agent.service"
UNIT_PATH = "/etc/systemd/system/" + UNIT_NAME
STATE_DIR = "/var/lib/guestbus"
AGENT_DIST = "guestbus-agent"
# --- the installer's own -------------------------------------------------------------------
WANTS_LINK = "/etc/systemd/system/multi-user.target.wants/" + UNIT_NAME
CLI_LINK = "/usr/local/sbin/guestbus-agent"  # root's PATH: `guestbus-agent ssr ...` works
INSTALLED_MANIFEST = PREFIX + "/" + WHEELHOUSE_MANIFEST  # which wheelhouse the venv holds
MIN_PYTHON = (3, 9)
PIP_TAIL = 15


class InstallError(Exception):
    """An expected problem: the message says what is wrong and what to do."""


def say(message: str) -> None:
    print("guestbus install: " + message, flush=True)


def run(
    argv: List[str], env: Optional[Dict[str, str]] = None
) -> "subprocess.CompletedProcess[str]":
    try:
        return subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=env,
            check=False,
        )
    except OSError as exc:
        raise InstallError(f"cannot run {argv[0]}: {exc}") from None


def tail(proc: "subprocess.CompletedProcess[str]") -> str:
    lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    return "\n".join("    " + line for line in lines[-PIP_TAIL:])


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class Installer:
    def __init__(self, source: Path, root: Path, start: bool) -> None:
        self.source = source
        self.root = root
        self.start = start
        self.changed: List[str] = []

    def at(self, guest_path: str) -> Path:
        """A guest path under --root."""
        return self.root / guest_path.lstrip("/")

    @property
    def systemd(self) -> bool:
        """Whether to talk to systemd: only for the running system, and only if it runs."""
        return (
            self.root == Path("/")
            and os.path.isdir("/run/systemd/system")
            and shutil.which("systemctl") is not None
        )

    # --- checks (nothing is changed until they all passed) -------------------------------

    def read_source_config(self) -> Dict[str, Any]:
        path = self.source / ISO_CONFIG
        if not path.is_file():
            raise InstallError(
                f"{self.source} has no {ISO_CONFIG}: run install.sh from the GUESTBUS ISO"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InstallError(f"{path}: cannot read it as JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("vm_uuid"), str):
            raise InstallError(f"{path}: not an agent config (no vm_uuid)")
        state_dir = data.get("state_dir", STATE_DIR)
        if not isinstance(state_dir, str) or not state_dir.startswith("/"):
            raise InstallError(f"{path}: state_dir must be an absolute path")
        return data

    def verify_wheels(self) -> Dict[str, Any]:
        """wheelhouse.json must list exactly the wheels present, with their sha256."""
        wheels = self.source / ISO_WHEELS
        path = wheels / WHEELHOUSE_MANIFEST
        corrupt = "the ISO is damaged or was tampered with: build or copy it again"
        try:
            manifest: Dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            files = manifest["files"]
            version = manifest["agent_version"]
            if not isinstance(files, dict) or not isinstance(version, str):
                raise ValueError("files or agent_version of the wrong type")
            for name in files:
                if name != Path(name).name or not name.endswith(".whl"):
                    raise ValueError(f"{name!r} is not a wheel file name")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InstallError(f"{path}: unusable ({exc}); {corrupt}") from None
        present = {p.name for p in wheels.iterdir()} - {WHEELHOUSE_MANIFEST}
        problems = [f"{n}: missing" for n in sorted(set(files) - present)]
        problems += [f"{n}: not in {WHEELHOUSE_MANIFEST}" for n in sorted(present - set(files))]
        for name in sorted(set(files) & present):
            if sha256(wheels / name) != files[name]:
                problems.append(f"{name}: sha256 differs from {WHEELHOUSE_MANIFEST}")
        agent_wheel = "{}-{}-py3-none-any.whl".format(AGENT_DIST.replace("-", "_"), version)
        if agent_wheel not in files:
            problems.append(f"{agent_wheel}: the agent's wheel is not listed")
        if problems:
            raise InstallError("wheels do not verify: {}; {}".format("; ".join(problems), corrupt))
        self.check_target(manifest)
        return manifest

    @staticmethod
    def check_target(manifest: Dict[str, Any]) -> None:
        arch = platform.machine()
        archs = manifest.get("archs") or []
        if archs and arch not in archs:
            raise InstallError(
                "the wheels on this ISO are for {}; this guest is {}".format(", ".join(archs), arch)
            )
        python = "{}.{}".format(*sys.version_info[:2])
        pythons = manifest.get("pythons") or []
        if pythons and python not in pythons:
            say(
                "warning: the wheels were chosen for Python {}; this is {} (trying anyway)".format(
                    ", ".join(pythons), python
                )
            )

    def installed_version(self) -> Optional[str]:
        """The agent version the venv holds, if the venv works."""
        python = self.at(VENV) / "bin" / "python"
        if not python.exists():
            return None
        code = "import importlib.metadata as m, guestbus_agent.main; print(m.version({!r}))"
        proc = run([str(python), "-c", code.format(AGENT_DIST)])
        return proc.stdout.strip() if proc.returncode == 0 else None

    # --- the virtualenv and the agent ----------------------------------------------------

    def venv_problem(self) -> Optional[str]:
        """Why the venv cannot be reused (None: reuse it)."""
        venv = self.at(VENV)
        cfg: Dict[str, str] = {}
        try:
            for line in (venv / "pyvenv.cfg").read_text(encoding="utf-8").splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    cfg[key.strip()] = value.strip()
        except OSError:
            return "it has no pyvenv.cfg"
        if cfg.get("include-system-site-packages", "false").lower() == "true":
            return "it sees the system's site-packages"
        made_by = ".".join((cfg.get("version_info") or cfg.get("version", "?")).split(".")[:2])
        this = "{}.{}".format(*sys.version_info[:2])
        if made_by != this:
            return f"it was made by Python {made_by}, this is Python {this}"
        python = venv / "bin" / "python"
        if not python.exists() or run([str(python), "-c", "import sys"]).returncode != 0:
            return "its python does not run"
        return None

    def make_venv(self, venv: Path) -> None:
        proc = run([sys.executable, "-m", "venv", str(venv)])
        if proc.returncode != 0:
            shutil.rmtree(str(venv), ignore_errors=True)
            raise InstallError(
                f"cannot create a virtualenv with {sys.executable} (the venv module or "
                "ensurepip is missing): install python3-venv (Debian/Ubuntu: apt install "
                "python3-venv) "
                f"and run again; it said:\n{tail(proc)}"
            )

    def pip_install(self, venv: Path, manifest: Dict[str, Any], reinstall: bool) -> None:
        argv = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-index"]
        argv += ["--find-links", str(self.source / ISO_WHEELS), "--no-cache-dir"]
        argv += ["--disable-pip-version-check", "--no-input", "--upgrade"]
        argv += ["--force-reinstall"] if reinstall else []
        argv.append("{}=={}".format(AGENT_DIST, manifest["agent_version"]))
        # No pip.conf: extra indexes or find-links there must not add sources.
        env = dict(os.environ, PIP_CONFIG_FILE=os.devnull)
        proc = run(argv, env)
        if proc.returncode != 0:
            raise InstallError(
                f"pip could not install the agent from the ISO's wheels:\n{tail(proc)}"
            )

    def install_agent(self, manifest: Dict[str, Any]) -> None:
        venv = self.at(VENV)
        record = self.at(INSTALLED_MANIFEST)
        version = manifest["agent_version"]
        problem = self.venv_problem() if venv.exists() else "none yet"
        if problem is None:
            installed = self.installed_version()
            try:
                same = json.loads(record.read_text(encoding="utf-8")).get("id") == manifest.get(
                    "id"
                )
            except (OSError, ValueError, AttributeError):
                same = False
            if installed == version and same:
                say(f"agent: {version} already installed in {venv}")
                return
            say(f"venv: reusing {venv}")
            self.pip_install(venv, manifest, reinstall=installed == version)
        else:
            # The old venv stays aside until the new one works, so a failure changes nothing.
            aside = venv.with_name(venv.name + ".old")
            shutil.rmtree(str(aside), ignore_errors=True)
            if venv.exists():
                say(f"venv: re-creating {venv}: {problem}")
                os.rename(str(venv), str(aside))
            venv.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.make_venv(venv)
                say(f"venv: created {venv} with Python {platform.python_version()}")
                self.pip_install(venv, manifest, reinstall=False)
            except BaseException:
                shutil.rmtree(str(venv), ignore_errors=True)
                if aside.exists():
                    os.rename(str(aside), str(venv))
                raise
            shutil.rmtree(str(aside), ignore_errors=True)
        proc = run([str(self.at(AGENT_BIN)), "--version"])
        if proc.returncode != 0 or proc.stdout.split()[-1:] != [version]:
            raise InstallError(f"the installed agent does not run:\n{tail(proc)}")
        shutil.copyfile(str(self.source / ISO_WHEELS / WHEELHOUSE_MANIFEST), str(record))
        say(f"agent: installed {AGENT_DIST} {version} offline from {ISO_WHEELS}")
        self.changed.append("agent " + version)

    # --- config, certificate, unit, service ----------------------------------------------

    def take_config(self, config: Dict[str, Any]) -> None:
        state_dir = self.at(config.get("state_dir", STATE_DIR))
        argv = [str(self.at(AGENT_BIN)), "--config", str(self.at(CONFIG_PATH))]
        argv += ["--state-dir", str(state_dir), "--take-config-from", str(self.source)]
        proc = run(argv)
        if proc.returncode != 0:
            raise InstallError(
                f"the agent refused the ISO's config: {proc.stderr.strip() or tail(proc)}"
            )
        line = proc.stdout.strip()
        say("config: " + line)
        if line.startswith("took"):
            self.changed.append("config")

    def install_unit(self) -> None:
        source = self.source / ISO_UNIT
        unit = self.at(UNIT_PATH)
        data = source.read_bytes()
        if unit.is_file() and unit.read_bytes() == data:
            say(f"unit: {unit} unchanged")
        else:
            unit.parent.mkdir(parents=True, exist_ok=True)
            tmp = unit.with_name(unit.name + ".tmp")
            tmp.write_bytes(data)
            os.chmod(str(tmp), 0o644)
            os.replace(str(tmp), str(unit))
            say(f"unit: installed {unit}")
            self.changed.append("unit")

    def link_cli(self) -> None:
        link = self.at(CLI_LINK)
        if os.path.islink(str(link)) and os.readlink(str(link)) == AGENT_BIN:
            return
        if os.path.lexists(str(link)):
            say(f"command: left {link} alone (not ours); run {AGENT_BIN} instead")
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(AGENT_BIN, str(link))
        self.changed.append("command")
        say(f"command: {link} -> {AGENT_BIN}")

    def enable_and_start(self) -> None:
        if not self.systemd:
            link = self.at(WANTS_LINK)
            if os.path.islink(str(link)) and os.readlink(str(link)) == UNIT_PATH:
                say("service: already enabled")
            else:
                link.parent.mkdir(parents=True, exist_ok=True)
                if os.path.lexists(str(link)):
                    link.unlink()
                os.symlink(UNIT_PATH, str(link))
                self.changed.append("enabled")
                say(f"service: enabled ({link} -> {UNIT_PATH})")
            why = "--root was given" if self.root != Path("/") else "systemd is not running"
            say(f"service: not started ({why}); it starts at the next boot")
            return
        if "unit" in self.changed:
            self.systemctl("daemon-reload")
        if run(["systemctl", "is-enabled", "--quiet", UNIT_NAME]).returncode != 0:
            self.systemctl("enable", UNIT_NAME)
            self.changed.append("enabled")
            say("service: enabled")
        if not self.start:
            say("service: not started (--no-start)")
            return
        active = run(["systemctl", "is-active", "--quiet", UNIT_NAME]).returncode == 0
        if active and not self.changed:
            say("service: running")
            return
        self.systemctl("restart", UNIT_NAME)
        say("service: {}".format("restarted" if active else "started"))

    @staticmethod
    def systemctl(*args: str) -> None:
        proc = run(["systemctl", *args])
        if proc.returncode != 0:
            raise InstallError("systemctl {} failed:\n{}".format(" ".join(args), tail(proc)))

    # --- the whole ---------------------------------------------------------------------------

    def install(self) -> None:
        config = self.read_source_config()
        if not (self.source / ISO_UNIT).is_file():
            raise InstallError(f"{self.source} has no {ISO_UNIT}: not a GUESTBUS ISO")
        full = (self.source / ISO_WHEELS).is_dir()
        manifest = self.verify_wheels() if full else None
        installed = self.installed_version()
        if manifest is None and installed is None:
            raise InstallError("this is a config-only ISO; install from a full ISO first")
        say(
            "checked: Python {}, {} ISO at {} for VM {}{}".format(
                platform.python_version(),
                "full" if full else "config-only",
                self.source,
                config["vm_uuid"],
                ", {} wheels verified".format(len(manifest["files"])) if manifest else "",
            )
        )
        if manifest is None:
            say(f"agent: keeping the installed {installed} (config-only ISO)")
        else:
            self.install_agent(manifest)
        self.take_config(config)
        self.install_unit()
        self.link_cli()
        self.enable_and_start()
        if self.changed:
            say("done: {}".format(", ".join(self.changed)))
        else:
            say("nothing to do: the agent, its config and its unit are current")

    def uninstall(self, purge: bool) -> None:
        state_dir = STATE_DIR
        try:
            installed = json.loads(self.at(CONFIG_PATH).read_text(encoding="utf-8"))
            if isinstance(installed.get("state_dir"), str):
                state_dir = installed["state_dir"]
        except (OSError, ValueError, AttributeError):
            pass
        if self.systemd:
            run(["systemctl", "disable", "--now", UNIT_NAME])
            say("service: stopped and disabled")
        for guest_path in (WANTS_LINK, UNIT_PATH):
            path = self.at(guest_path)
            if os.path.lexists(str(path)):
                path.unlink()
                self.changed.append(guest_path)
        cli = self.at(CLI_LINK)
        if os.path.islink(str(cli)) and os.readlink(str(cli)) == AGENT_BIN:
            cli.unlink()
            self.changed.append(CLI_LINK)
        if self.systemd:
            run(["systemctl", "daemon-reload"])
        remove = [PREFIX, ETC_DIR]
        if purge:
            if len(Path(state_dir).parts) < 3:
                raise InstallError(f"refusing to purge state_dir {state_dir!r}")
            remove.append(state_dir)
        for guest_path in remove:
            path = self.at(guest_path)
            if path.exists():
                shutil.rmtree(str(path))
                self.changed.append(guest_path)
        for guest_path in self.changed:
            say(f"removed {self.at(guest_path)}")
        if not purge and self.at(state_dir).exists():
            say(f"kept {self.at(state_dir)} (the VM's identity); --purge removes it")
        if not self.changed:
            say("nothing to remove: the agent is not installed")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="install.sh",
        description="Install or upgrade the guestbus agent from this ISO (offline), or remove it.",
    )
    p.add_argument(
        "--root",
        metavar="DIR",
        help="install under DIR instead of / (no root needed; nothing started)",
    )
    p.add_argument(
        "--no-start", action="store_true", help="enable the service but do not (re)start it"
    )
    p.add_argument("--uninstall", action="store_true", help="remove the agent, its config and unit")
    p.add_argument(
        "--purge", action="store_true", help="with --uninstall: also remove the VM's identity"
    )
    args = p.parse_args(argv)
    if args.purge and not args.uninstall:
        p.error("--purge goes with --uninstall")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    if sys.version_info < MIN_PYTHON:
        found = platform.python_version()
        print(
            f"guestbus install: error: the agent needs Python 3.9+; this is {found}",
            file=sys.stderr,
        )
        return 1
    args = parse_args(argv)
    root = Path(args.root).resolve() if args.root else Path("/")
    try:
        if not root.is_dir():
            raise InstallError(f"--root {args.root}: no such directory")
        if args.root is None and os.geteuid() != 0:
            raise InstallError("run it as root (sudo sh install.sh), or give --root DIR")
        installer = Installer(Path(__file__).resolve().parent, root, start=not args.no_start)
        if args.uninstall:
            installer.uninstall(args.purge)
        else:
            installer.install()
    except InstallError as exc:
        print(f"guestbus install: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"guestbus install: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
