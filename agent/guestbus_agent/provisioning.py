"""Taking a configuration from the GUESTBUS ISO (or any directory shaped like one).

Written once, used twice: by the agent at every start (a newer ISO attached to the VM is new
operator intent) and by the installer (``guestbus-agent --take-config-from DIR``). Every file
is read and checked before anything is written, and the config file is written last: a broken
ISO changes nothing, and after a crash half-way the old config still names the old serial, so
the next start takes the ISO again. CPython 3.9+, standard library plus ``cryptography``.
"""

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

from . import layout
from .config import AgentConfig, ConfigError, find_iso_mount, load, parse_config
from .files import atomic_write
from .identity import Identity, IdentityError, cert_info

log = logging.getLogger("guestbus.agent")

MOUNT_OPTIONS = "ro,nosuid,nodev,noexec"


class ProvisioningError(Exception):
    """The ISO cannot be used as it is; the message says which file and why."""


# --- the rule ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    take: bool
    reason: str
    refused: bool = False  # newer, but for another VM: worth a warning, not an error


def newer(iso: AgentConfig, installed: Optional[AgentConfig], force: bool = False) -> Decision:
    """Whether the ISO's config should replace the installed one.

    Both carry ``config_serial``: the ISO's must be greater. Otherwise a different
    ``config_uuid`` is new (one the installed config was derived from, a clone's, is not).
    A newer config for another VM is refused: a template's ISO left attached to a clone
    must not take the clone's identity away.
    """
    if installed is None:
        return Decision(True, "no config installed")
    if force:
        return Decision(True, "forced")
    if iso.config_serial is not None and installed.config_serial is not None:
        if iso.config_serial <= installed.config_serial:
            return Decision(
                False,
                f"already current: the ISO's config_serial {iso.config_serial} is not newer "
                f"than the installed {installed.config_serial}",
            )
        why = f"config_serial {iso.config_serial} > installed {installed.config_serial}"
    elif iso.config_uuid in (installed.config_uuid, installed.source_config_uuid):
        return Decision(False, f"already current: config {iso.config_uuid} is installed")
    else:
        why = f"config {iso.config_uuid} replaces {installed.config_uuid}"
    if iso.vm_uuid != installed.vm_uuid:
        return Decision(
            False,
            f"the ISO's config is for VM {iso.vm_uuid}, but this VM is {installed.vm_uuid}: "
            "kept this VM's config and identity (an ISO made for another VM, e.g. a "
            "template's ISO on its clone; --force takes it anyway)",
            refused=True,
        )
    return Decision(True, why)


# --- reading the ISO ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """Everything taken from the ISO, read and checked, not yet written."""

    config: AgentConfig
    config_bytes: bytes
    tls: Optional[Tuple[bytes, bytes, bytes]]  # key, certificate, CA
    dr_key: Optional[bytes]


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ProvisioningError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _check_key_pair(key_pem: bytes, cert_pem: bytes, where: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ProvisioningError(
            f"{where / layout.ISO_KEY}: not a usable private key: {exc}"
        ) from None
    cert = x509.load_pem_x509_certificate(cert_pem)
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise ProvisioningError(
            f"{where}: {layout.ISO_KEY} is not the key of {layout.ISO_CERT}; rebuild the ISO"
        )


def _read_tls(source: Path, vm: str) -> Optional[Tuple[bytes, bytes, bytes]]:
    names = (layout.ISO_KEY, layout.ISO_CERT, layout.ISO_CA)
    present = [(source / name).is_file() for name in names]
    if not present[0] and not present[1]:
        return None  # no identity on the ISO: the agent enrolls over serial
    missing = [name for name, here in zip(names, present) if not here]
    if missing:
        raise ProvisioningError(
            f"{source}: {', '.join(names)} belong together; missing {', '.join(missing)}"
        )
    key_pem, cert_pem, ca_pem = (_read(source / name) for name in names)
    try:
        info = cert_info(cert_pem)
        cert_info(ca_pem)
    except IdentityError as exc:
        raise ProvisioningError(f"{source}: {exc}") from None
    if info.vm.lower() != vm:
        raise ProvisioningError(
            f"{source / layout.ISO_CERT} is for VM {info.vm or '(no CN)'}, but "
            f"{layout.ISO_CONFIG} is for VM {vm}: the ISO mixes two VMs' files; rebuild it"
        )
    _check_key_pair(key_pem, cert_pem, source)
    return key_pem, cert_pem, ca_pem


def _read_dr_key(source: Path) -> Optional[bytes]:
    path = source / layout.ISO_DR_KEY
    if not path.is_file():
        return None
    data = _read(path)
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:  # pragma: no cover - the wheelhouse ships it
        raise ProvisioningError("the 'cryptography' package is missing") from None

    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise ProvisioningError(f"{path}: not a PEM public key: {exc}") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ProvisioningError(f"{path}: must be an Ed25519 public key")
    return data


def read_bundle(source: Path) -> Bundle:
    """Read and check the ISO's files; raises ConfigError or ProvisioningError."""
    path = source / layout.ISO_CONFIG
    if not path.is_file():
        raise ProvisioningError(f"{source}: no {layout.ISO_CONFIG} here: not a GUESTBUS ISO")
    data = _read(path)
    try:
        decoded = json.loads(data.decode("utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    config = parse_config(decoded, str(path))  # the bytes checked are the bytes written
    return Bundle(config, data, _read_tls(source, config.vm_uuid), _read_dr_key(source))


# --- taking it ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    taken: bool
    reason: str
    refused: bool = False
    config: Optional[AgentConfig] = None
    written: Tuple[str, ...] = ()

    def summary(self) -> str:
        if not self.taken:
            return f"kept the installed config: {self.reason}"
        assert self.config is not None
        serial = "" if self.config.config_serial is None else f" #{self.config.config_serial}"
        return (
            f"took config {self.config.config_uuid}{serial} for VM {self.config.vm_uuid} "
            f"({self.reason}): wrote {', '.join(self.written)}"
        )


def installed_config(
    config_path: Path, state_dir: Optional[Path]
) -> Tuple[Optional[AgentConfig], str]:
    """The config the agent would run with now (a clone's derived one included), or None
    and why: a missing or unusable installed config is replaced by any ISO's."""
    if not config_path.exists():
        return None, "no config installed"
    try:
        return load(config_path, state_dir), ""
    except ConfigError as exc:
        return None, f"the installed config is unusable ({exc})"


def take_from(
    source_dir: Path,
    config_path: Path,
    state_dir: Optional[Path] = None,
    force: bool = False,
) -> Outcome:
    """Install the config (and certificate, DR key) of ``source_dir`` if it is newer.

    Raises ConfigError or ProvisioningError, with nothing written, if the ISO is broken.
    """
    source_dir, config_path = Path(source_dir), Path(config_path)
    bundle = read_bundle(source_dir)
    installed, why_none = installed_config(config_path, state_dir)
    decision = newer(bundle.config, installed, force)
    if not decision.take:
        return Outcome(False, decision.reason, decision.refused, bundle.config)
    written: List[str] = []
    if bundle.tls is not None:
        identity = Identity(Path(state_dir or bundle.config.state_dir))
        key_pem, cert_pem, ca_pem = bundle.tls
        if _same(identity.cert_path, cert_pem) and _same(identity.key_path, key_pem):
            if not _same(identity.ca_path, ca_pem):
                atomic_write(identity.ca_path, ca_pem, 0o644)
                written.append(str(identity.ca_path))
        else:
            identity.install(key_pem, cert_pem, ca_pem)
            written.append(f"{identity.dir}/ (certificate, key, CA)")
    parent = config_path.parent
    if not parent.is_dir():
        parent.mkdir(parents=True, mode=0o755)
        os.chmod(str(parent), 0o755)
    if bundle.dr_key is not None:
        dr_path = parent / layout.ISO_DR_KEY
        if not _same(dr_path, bundle.dr_key):
            atomic_write(dr_path, bundle.dr_key, 0o644)
            written.append(str(dr_path))
    atomic_write(config_path, bundle.config_bytes, 0o600)
    written.append(str(config_path))
    reason = why_none if installed is None else decision.reason
    return Outcome(True, reason, False, bundle.config, tuple(written))


def _same(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


# --- finding the ISO ---------------------------------------------------------------------


@dataclass(frozen=True)
class IsoLocator:
    """Where to look for the ISO; every place is a parameter so tests can stand in for it."""

    label: str = layout.ISO_LABEL
    by_label_dir: str = "/dev/disk/by-label"
    mounts: str = "/proc/self/mounts"
    mount_root: str = layout.ISO_MOUNT_DIR
    fstype: str = "iso9660"

    def device(self) -> Optional[str]:
        link = Path(self.by_label_dir) / self.label
        return os.path.realpath(str(link)) if link.exists() else None


@contextlib.contextmanager
def iso_directory(locator: Optional[IsoLocator] = None) -> Iterator[Optional[Path]]:
    """The ISO's root directory while the block runs, or None (no ISO, or it cannot be read).

    An ISO that is mounted already is used where it is. One that is attached but not mounted
    is mounted read-only at a private directory under ``mount_root`` and unmounted after.
    """
    loc = locator or IsoLocator()
    device = loc.device()
    if device is None:
        log.debug("no ISO labelled %s attached", loc.label)
        yield None
        return
    mounted = find_iso_mount(loc.label, loc.by_label_dir, loc.mounts)
    if mounted is not None:
        yield mounted
        return
    target, why = _mount(device, loc)
    if target is None:
        log.warning("ISO %s (%s) is attached but could not be mounted: %s", loc.label, device, why)
        yield None
        return
    try:
        yield target
    finally:
        _unmount(target)


def _mount(device: str, loc: IsoLocator) -> Tuple[Optional[Path], str]:
    if os.geteuid() != 0:
        return None, "not root (mounting needs root; mount it yourself and restart the agent)"
    mount = shutil.which("mount")
    if mount is None:
        return None, "no 'mount' command"
    try:
        root = Path(loc.mount_root)
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = Path(tempfile.mkdtemp(prefix="iso-", dir=str(root)))
    except OSError as exc:
        return None, f"cannot make a mount point under {loc.mount_root}: {exc}"
    argv = [mount, "-o", MOUNT_OPTIONS, "-t", loc.fstype, device, str(target)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        error = proc.stderr.strip() or f"exit status {proc.returncode}"
        ok = proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as exc:
        ok, error = False, str(exc)
    if not ok:
        with contextlib.suppress(OSError):
            target.rmdir()
        return None, f"mount failed: {error.splitlines()[0]}"
    log.info("mounted ISO %s at %s (read-only)", device, target)
    return target, ""


def _unmount(target: Path) -> None:
    umount = shutil.which("umount") or "umount"
    try:
        proc = subprocess.run(
            [umount, str(target)], capture_output=True, text=True, timeout=60, check=False
        )
        error = proc.stderr.strip() if proc.returncode else ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        error = str(exc)
    if error:
        log.warning("could not unmount the ISO at %s: %s", target, error)
        return
    with contextlib.suppress(OSError):
        target.rmdir()


def take_at_start(
    config_path: Path, state_dir: Optional[Path], locator: Optional[IsoLocator] = None
) -> Optional[Outcome]:
    """At agent start: take a newer config from the attached ISO, logging what happened.
    Never raises for a bad ISO: the installed config is kept and the problem logged."""
    with iso_directory(locator) as iso:
        if iso is None:
            return None
        try:
            outcome = take_from(iso, config_path, state_dir)
        except (ConfigError, ProvisioningError, IdentityError) as exc:
            log.error("the ISO's config cannot be used, keeping the installed one: %s", exc)
            return None
        except OSError as exc:
            log.error("could not install the ISO's config, keeping the installed one: %s", exc)
            return None
    if outcome.refused:
        log.warning("ISO at %s: %s", iso, outcome.summary())
    else:
        log.info("ISO at %s: %s", iso, outcome.summary())
    return outcome
