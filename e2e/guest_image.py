#!/usr/bin/env python3
"""Build (once) the small Debian guest image of the e2e tier: ``e2e/guest-image``.

    sudo e2e/guest-image               build it if needed; print its directory on stdout
    sudo e2e/guest-image --rebuild     build it again even if cached
    e2e/guest-image --print-dir        only say where it is (or would be); builds nothing

The image is Debian 12 (bookworm, ``debootstrap --variant=minbase``) with systemd, udev, a
kernel and Python 3 with venv: enough for the guestbus agent and its installer, and nothing
else. Its directory holds

    base.raw       the root file system: a sparse raw ext4 image (the guest's /dev/vda),
                   made with ``mke2fs -d`` from the debootstrapped tree (no loop mounts)
    vmlinuz        the kernel and
    initrd.img     its initramfs, for direct kernel boot (``<os><kernel>``/``<initrd>``)
    manifest.json  what was built: packages, kernel version, sizes, build time, mirror

It is cached by its inputs in ``$GUESTBUS_E2E_CACHE`` (default ``~/.cache/guestbus-e2e``)
under ``image-<hash>``, the hash covering this file, the ``guest-image`` launcher and the
package list: a second run is instant, a change to the recipe makes a new image. Nothing
writes to ``base.raw`` after the build; every VM boots on its own qcow2 overlay of it.

Inside the guest, ``guestbus-firstboot.service`` installs the agent at boot from the CD-ROM
labelled GUESTBUS (``sh install.sh`` of the ISO) when ``/opt/guestbus/venv`` does not exist,
and says what happened on the console and in the journal as lines starting
``guestbus-firstboot:``, the last one ``guestbus-firstboot: RESULT=<what>``.

Standard library only (Python 3.9+); runs as root (debootstrap, chroot, file ownership).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

SUITE = "bookworm"
ARCH = "amd64"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
VARIANT = "minbase"
# What the guest needs beyond minbase, and why:
PACKAGES = [
    "systemd-sysv",  # systemd as init: the agent and the firstboot installer are units
    "udev",  # /dev/disk/by-label/GUESTBUS for the CD-ROM, module autoloading
    "linux-image-amd64",  # the kernel (and initramfs-tools, which makes the initrd)
    "python3",  # the agent runs on the guest's CPython
    "python3-venv",  # the installer makes /opt/guestbus/venv (ensurepip's wheels)
    "iproute2",  # `ip`: the agent's `info` reports interfaces
    "util-linux",  # blkid (find the ISO without udev), mount helpers
    "mount",  # mount/umount of the ISO
]
# Kernel modules the initrd needs to mount the root file system (/dev/vda, ext4); the rest
# of the kernel's modules stay in the root file system, loaded by udev from there.
INITRD_MODULES = ["virtio_pci", "virtio_blk", "ext4"]
# Module trees no test VM uses (no sound, GPU, wireless, camera...): ~200 MB less image.
PRUNED_MODULE_DIRS = [
    "kernel/drivers/gpu",
    "kernel/drivers/media",
    "kernel/drivers/net/wireless",
    "kernel/drivers/net/ethernet",
    "kernel/drivers/infiniband",
    "kernel/drivers/staging",
    "kernel/drivers/bluetooth",
    "kernel/drivers/iio",
    "kernel/drivers/isdn",
    "kernel/drivers/mtd",
    "kernel/drivers/hwmon",
    "kernel/drivers/thunderbolt",
    "kernel/drivers/usb/gadget",
    "kernel/drivers/usb/serial",
    "kernel/drivers/usb/misc",
    "kernel/drivers/input/touchscreen",
    "kernel/drivers/input/joystick",
    "kernel/drivers/hid",
    "kernel/sound",
    "kernel/net/wireless",
    "kernel/net/mac80211",
    "kernel/net/bluetooth",
]
# Units a headless test VM does not need at boot (timers that would wake up mid-test, the
# interactive first-boot wizard that would wait on the console, a getty on a VT nobody sees).
MASKED_UNITS = [
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "getty@tty1.service",
    "getty-static.service",  # gettys on tty2-6 when there is no logind
    "dpkg-db-backup.timer",
    "systemd-tmpfiles-clean.timer",
]
# Modules udev would load for emulated hardware nobody uses here (each costs under TCG).
BLACKLISTED_MODULES = ["kvm", "kvm_amd", "kvm_intel", "floppy", "pcspkr", "joydev", "psmouse"]
HOSTNAME = "guestbus-e2e"  # the kernel command line's systemd.hostname= overrides it
ROOT_LABEL = "guestbus-root"
FIRSTBOOT_MARK = "guestbus-firstboot:"

FIRSTBOOT_UNIT = """\
[Unit]
Description=guestbus e2e: install the agent from the GUESTBUS ISO when it is not installed
Documentation=file:/usr/local/sbin/guestbus-firstboot
After=local-fs.target systemd-udev-trigger.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/guestbus-firstboot
StandardOutput=journal+console
StandardError=journal+console
# An offline pip install under emulation (TCG) takes a while.
TimeoutStartSec=30min

[Install]
WantedBy=multi-user.target
"""

FIRSTBOOT_SCRIPT = r"""#!/bin/sh
# guestbus e2e image: install the guestbus agent from the GUESTBUS ISO when /opt/guestbus/venv
# does not exist. Waits for the media (udev's /dev/disk/by-label/GUESTBUS, else blkid),
# mounts it read-only, runs its install.sh, unmounts. Every line goes to the journal and to
# the console; the last one is "guestbus-firstboot: RESULT=<installed|present|no-media|...>".
# The kernel command line's guestbus.firstboot_wait=SECONDS bounds the wait (default 60).
set -u
say() { echo "guestbus-firstboot: $*"; }
wait_s=60
for arg in $(cat /proc/cmdline); do
    case "$arg" in guestbus.firstboot_wait=*) wait_s="${arg#*=}" ;; esac
done
if [ -e /opt/guestbus/venv ]; then
    say "the agent is installed (/opt/guestbus/venv exists)"
    say "RESULT=present"
    exit 0
fi
say "looking for the GUESTBUS media (up to ${wait_s}s)"
dev=""
how=""
i=0
while :; do
    if [ -e /dev/disk/by-label/GUESTBUS ]; then
        dev=$(readlink -f /dev/disk/by-label/GUESTBUS); how="udev"; break
    fi
    dev=$(blkid -c /dev/null -L GUESTBUS 2>/dev/null || true)
    if [ -n "$dev" ]; then how="blkid"; break; fi
    for cd in /dev/sr[0-9]*; do
        [ -b "$cd" ] || continue
        if [ "$(blkid -c /dev/null -o value -s LABEL "$cd" 2>/dev/null)" = GUESTBUS ]; then
            dev="$cd"; how="probe"; break
        fi
    done
    [ -n "$dev" ] && break
    [ "$i" -ge "$wait_s" ] && break
    sleep 1
    i=$((i + 1))
done
if [ -z "$dev" ]; then
    say "no GUESTBUS media after ${wait_s}s; nothing installed (attach the ISO and reboot)"
    say "RESULT=no-media"
    exit 0
fi
say "found the GUESTBUS media: $dev (by $how, after ${i}s)"
mnt=/run/guestbus-firstboot/iso
mkdir -p "$mnt"
if ! mount -o ro,nosuid,nodev,noexec "$dev" "$mnt"; then
    say "cannot mount $dev"
    say "RESULT=mount-failed"
    exit 1
fi
if [ ! -f "$mnt/install.sh" ]; then
    say "$dev has no install.sh (a config-only ISO?); nothing installed"
    umount "$mnt"
    say "RESULT=no-installer"
    exit 1
fi
say "running sh install.sh from $dev"
started=$(date +%s)
sh "$mnt/install.sh"
rc=$?
umount "$mnt" || umount -l "$mnt"
say "install.sh finished with status $rc after $(( $(date +%s) - started ))s"
if [ "$rc" -eq 0 ]; then
    say "RESULT=installed"
else
    say "RESULT=install-failed"
fi
exit "$rc"
"""

# The agent's own unit logs to the journal only; in the test image it also goes to the
# console, which is what the tests read.
AGENT_CONSOLE_DROPIN = """\
[Service]
StandardError=journal+console
"""

HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "guest-image"


class BuildError(Exception):
    """An expected problem: the message says what is wrong and what to do."""


_t0 = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _t0:6.1f}s] guest-image: {message}", file=sys.stderr, flush=True)


def recipe_hash() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    if LAUNCHER.exists():
        h.update(LAUNCHER.read_bytes())
    h.update("\n".join([SUITE, ARCH, VARIANT, *PACKAGES]).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    explicit = os.environ.get("GUESTBUS_E2E_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "guestbus-e2e"


def image_dir() -> Path:
    return cache_root() / f"image-{recipe_hash()}"


def is_complete(directory: Path) -> bool:
    return (
        all((directory / n).is_file() for n in ("base.raw", "vmlinuz", "initrd.img"))
        and (directory / "manifest.json").is_file()
    )


def check_root() -> None:
    if os.geteuid() != 0:
        raise BuildError(
            "building the guest image needs root (debootstrap, chroot, root-owned files): "
            "run it with sudo"
        )


def check_prerequisites(mirror: str) -> None:
    check_root()
    for tool, package in (("debootstrap", "debootstrap"), ("mke2fs", "e2fsprogs")):
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} is not installed: apt-get install {package}")
    if not Path(f"/usr/share/debootstrap/scripts/{SUITE}").exists():
        raise BuildError(f"this debootstrap does not know {SUITE}: upgrade debootstrap")
    url = f"{mirror.rstrip('/')}/dists/{SUITE}/Release"
    try:
        with urllib.request.urlopen(url, timeout=20) as response:
            head = response.read(4096).decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise BuildError(
            f"the Debian mirror {mirror} is unreachable ({url}: {exc}); point "
            "GUESTBUS_E2E_MIRROR (or --mirror) at one that works, e.g. a local "
            "apt-cacher-ng: GUESTBUS_E2E_MIRROR=http://127.0.0.1:3142/deb.debian.org/debian"
        ) from None
    if f"Codename: {SUITE}" not in head:
        raise BuildError(f"{url} does not look like a Debian {SUITE} Release file")


def run(argv: list[str], log: Path, what: str) -> None:
    """Run a command, its output appended to ``log``; a failure shows the end of it."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(argv)}\n")
        out.flush()
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{tail(log)}\nfull log: {log}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:])


PER_PACKAGE = re.compile(r"^I: (Retrieving|Validating|Extracting|Unpacking|Configuring) (\S+)")


def debootstrap(root: Path, mirror: str, log: Path) -> None:
    argv = [
        "debootstrap",
        f"--variant={VARIANT}",
        f"--arch={ARCH}",
        "--components=main",
        "--include=" + ",".join(PACKAGES),
        SUITE,
        str(root),
        mirror,
    ]
    say(f"debootstrap {SUITE} ({VARIANT} + {len(PACKAGES)} packages) from {mirror}")
    counts: dict[str, int] = {}
    last_report = 0.0
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            line = line.rstrip()
            m = PER_PACKAGE.match(line)
            if m:
                phase = m.group(1)
                counts[phase] = counts.get(phase, 0) + 1
                now = time.monotonic()
                if now - last_report >= 10:
                    last_report = now
                    say(f"  {phase.lower()} {m.group(2)} ({counts[phase]} so far)")
            elif line.startswith(("I: ", "E: ", "W: ")):
                say("  " + line)
        rc = proc.wait()
    if rc != 0:
        inner = root / "debootstrap" / "debootstrap.log"
        more = f"\n{tail(inner)}\n({inner})" if inner.exists() else ""
        raise BuildError(
            f"debootstrap failed (exit {rc}):\n{tail(log)}{more}\nfull log: {log}\n"
            f"(a mirror problem? set GUESTBUS_E2E_MIRROR; now {mirror})"
        )


def write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)


def symlink(path: Path, target: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def kernel_version(root: Path) -> str:
    versions = sorted(p.name[len("vmlinuz-") :] for p in (root / "boot").glob("vmlinuz-*"))
    if len(versions) != 1:
        raise BuildError(f"expected one kernel in {root}/boot, found {versions or 'none'}")
    return versions[0]


def configure(root: Path, log: Path) -> str:
    say("configuring the guest: hostname, fstab, serial console, firstboot unit")
    write(root / "etc/hostname", HOSTNAME + "\n")
    write(root / "etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{HOSTNAME}\n")
    write(
        root / "etc/fstab",
        "# the harness boots with root=/dev/vda rw; no fsck at boot (a fresh overlay)\n"
        f"LABEL={ROOT_LABEL}\t/\text4\trw,errors=remount-ro\t0 0\n",
    )
    # Each VM makes its own machine id at its first boot (a shared one would make clones).
    write(root / "etc/machine-id", "")
    with contextlib.suppress(FileNotFoundError):
        (root / "var/lib/dbus/machine-id").unlink()
    # No password for root: the test VMs have no network; the serial console is for debugging.
    run(["chroot", str(root), "passwd", "--delete", "root"], log, "passwd")
    for unit in MASKED_UNITS:
        symlink(root / "etc/systemd/system" / unit, "/dev/null")
    write(root / "usr/local/sbin/guestbus-firstboot", FIRSTBOOT_SCRIPT, 0o755)
    write(root / "etc/systemd/system/guestbus-firstboot.service", FIRSTBOOT_UNIT)
    symlink(
        root / "etc/systemd/system/multi-user.target.wants/guestbus-firstboot.service",
        "/etc/systemd/system/guestbus-firstboot.service",
    )
    write(
        root / "etc/systemd/system/guestbus-agent.service.d/e2e-console.conf",
        AGENT_CONSOLE_DROPIN,
    )
    # Short journald on a small disk; keep the journal also on the console-less default.
    write(root / "etc/systemd/journald.conf.d/e2e.conf", "[Journal]\nSystemMaxUse=32M\n")

    version = kernel_version(root)
    say(f"kernel {version}: pruning unused module trees, a small initrd")
    moddir = root / "lib/modules" / version
    for rel in PRUNED_MODULE_DIRS:
        shutil.rmtree(moddir / rel, ignore_errors=True)
    run(["chroot", str(root), "depmod", "-a", version], log, "depmod")
    write(root / "etc/initramfs-tools/conf.d/guestbus-e2e.conf", "MODULES=list\n")
    write(
        root / "etc/modprobe.d/guestbus-e2e.conf",
        "".join(f"blacklist {m}\ninstall {m} /bin/true\n" for m in BLACKLISTED_MODULES),
    )
    write(
        root / "etc/initramfs-tools/modules",
        "# guestbus e2e: what mounting /dev/vda (virtio, ext4) needs\n"
        + "".join(m + "\n" for m in INITRD_MODULES),
    )
    run(
        ["chroot", str(root), "update-initramfs", "-u", "-k", version],
        log,
        "update-initramfs",
    )
    say("trimming: apt lists and caches, documentation, man pages, locales")
    for rel in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man"):
        target = root / rel
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
    locales = root / "usr/share/locale"
    if locales.is_dir():
        for child in locales.iterdir():
            if child.is_dir() and child.name not in ("C", "C.UTF-8", "locale.alias"):
                shutil.rmtree(child)
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    return version


def du_bytes(root: Path) -> int:
    out = subprocess.run(
        ["du", "-sxb", str(root)], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[0])


def make_ext4(root: Path, image: Path, log: Path) -> int:
    used = du_bytes(root)
    # Room for the agent's virtualenv, logs and a few test files; the file is sparse.
    mib = 1 << 20
    size = max(1024 * mib, ((used * 13 // 10 + 512 * mib) // (256 * mib) + 1) * 256 * mib)
    say(f"mke2fs -t ext4 -d (tree {used / mib:.0f} MiB, file system {size // mib} MiB)")
    run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            ROOT_LABEL,
            "-E",
            "root_owner=0:0",
            "-d",
            str(root),
            str(image),
            f"{size // 1024}k",
        ],
        log,
        "mke2fs",
    )
    return size


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another build holds {directory}/.lock: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prune(keep: Path) -> None:
    """Other recipes' images and failed builds' leftovers (called holding the lock)."""
    for other in keep.parent.glob("image-*"):
        if other != keep and other.is_dir():
            say(f"removing {other.name} (another recipe's image, or a failed build)")
            shutil.rmtree(other, ignore_errors=True)


def build(out: Path, mirror: str, keep_old: bool) -> None:
    started = time.monotonic()
    check_prerequisites(mirror)
    work = out.with_name(out.name + f".build-{os.getpid()}")
    for stale in out.parent.glob(out.name + ".build-*"):
        shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "build.log"
    root = work / "rootfs"
    try:
        debootstrap(root, mirror, log)
        version = configure(root, log)
        shutil.copy2(root / "boot" / f"vmlinuz-{version}", work / "vmlinuz")
        shutil.copy2(root / "boot" / f"initrd.img-{version}", work / "initrd.img")
        fs_size = make_ext4(root, work / "base.raw", log)
        python = sorted(p.name for p in (root / "usr/bin").glob("python3.*") if "-" not in p.name)
        shutil.rmtree(root)
        (work / "base.raw").chmod(0o444)  # the pristine base: VMs write to overlays
        allocated = (work / "base.raw").stat().st_blocks * 512
        initrd = (work / "initrd.img").stat().st_size
        manifest = {
            "suite": SUITE,
            "arch": ARCH,
            "variant": VARIANT,
            "packages": PACKAGES,
            "kernel": version,
            "python": python,
            "mirror": mirror,
            "recipe_hash": recipe_hash(),
            "filesystem_bytes": fs_size,
            "raw_allocated_bytes": allocated,
            "vmlinuz_bytes": (work / "vmlinuz").stat().st_size,
            "initrd_bytes": initrd,
            "build_seconds": round(time.monotonic() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "root_label": ROOT_LABEL,
            "firstboot_mark": FIRSTBOOT_MARK,
        }
        write(work / "manifest.json", json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        work.rename(out)
        if not keep_old:
            prune(out)
    except BaseException:
        if root.exists():
            # Keep the log and debootstrap's own for a look; the tree is big.
            for keep in (root / "debootstrap" / "debootstrap.log",):
                if keep.exists():
                    shutil.copy2(keep, work / "debootstrap.log")
            shutil.rmtree(root, ignore_errors=True)
        say(f"the failed build's logs stay in {work}")
        raise
    say(
        f"built {out} in {manifest['build_seconds']}s: kernel {version}, "
        f"base.raw {allocated >> 20} MiB allocated "
        f"({fs_size >> 20} MiB file system), initrd {initrd >> 20} MiB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="guest-image",
        description="Build (once, cached by inputs) the Debian guest image of the e2e tier.",
    )
    parser.add_argument(
        "--mirror",
        default=os.environ.get("GUESTBUS_E2E_MIRROR") or DEFAULT_MIRROR,
        help="Debian mirror (default: $GUESTBUS_E2E_MIRROR or " + DEFAULT_MIRROR + ")",
    )
    parser.add_argument("--rebuild", action="store_true", help="build even if cached")
    parser.add_argument(
        "--keep-old", action="store_true", help="keep other recipes' images in the cache"
    )
    parser.add_argument(
        "--print-dir", action="store_true", help="print the image directory; build nothing"
    )
    args = parser.parse_args(argv)
    out = image_dir()
    if args.print_dir:
        print(out)
        return 0 if is_complete(out) else 1
    try:
        if is_complete(out) and not args.rebuild:
            say(f"cached: {out}")
        else:
            check_root()
            with locked(cache_root()):
                if is_complete(out) and not args.rebuild:
                    say(f"cached (built meanwhile): {out}")
                else:
                    build(out, args.mirror, args.keep_old)
    except BuildError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
