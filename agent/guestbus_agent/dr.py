"""DR changes in the guest: verify the signature, apply once, remember, answer repeats.

Host commands ``dr_apply`` (a network change) and ``dr_script`` (the recovery script) carry
a change signed by dr-orchestrator (``{"payload": "<JSON>", "signature": "<base64>"}``).
The agent:

1. verifies the Ed25519 signature over ``b"guestbus-dr-v1\\n" + payload`` with the key
   provisioned with its config (``dr-verify.pem`` beside it), and refuses an unsigned or
   mis-signed change (``bad_signature``), one for another VM (``identity_mismatch``), an
   expired or not yet valid one, and one older than a change of another run it already
   accepted (``stale``);
2. remembers, in ``<state_dir>/dr.json`` and before it starts, which run it is applying; a
   repeat of that run is answered from memory (``repeat: true``) without applying again,
   a repeat while it runs waits for the same work;
3. applies with iproute2 at once, checks that the new gateway answers (else rolls back),
   then writes the guest's own network files (netplan / NetworkManager / ifupdown).

A network apply interrupted by an agent restart is completed when repeated (the change
describes an end state, so doing it again is safe); a script interrupted so is reported as
``interrupted`` and not run again (a script is not known to be safe to repeat).
CPython 3.9+, standard library plus ``cryptography``.
"""

import asyncio
import base64
import json
import logging
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

from guestbus.wire import errors
from guestbus.wire.aio import RemoteError

from . import layout
from .files import atomic_write
from .netconf import (
    Backend,
    IpRoute2,
    NetError,
    Persist,
    Route,
    Snapshot,
    Stacks,
    family_of,
    render_resolv_conf,
    write_resolv_conf,
)
from .recovery import allowed_env, run_script

log = logging.getLogger("guestbus.agent.dr")

CONTEXT = b"guestbus-dr-v1\n"
MEMORY_FILE = "dr.json"
SCRIPTS = {
    "production": "usr/local/sbin/production_vm_recovery",
    "test": "usr/local/sbin/test_vm_recovery",
}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class DrOptions:
    """Where the agent finds its DR verify key, the root its files live under (``/`` in a
    guest; a directory in tests), and how it changes the network."""

    key_path: Path = field(default_factory=lambda: Path(layout.DR_KEY_PATH))
    root: Path = field(default_factory=lambda: Path("/"))
    backend: Optional[Backend] = None


def _refuse(code: str, message: str) -> RemoteError:
    log.warning("DR change refused: %s", message)
    return RemoteError(code, message)


def key_id_of(public_key: Any) -> str:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def verify(params: Dict[str, Any], key_path: Path, vm: str, now: float) -> Dict[str, Any]:
    """The payload of a correctly signed, current change for ``vm``; RemoteError otherwise."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    payload_text = params.get("payload")
    signature = params.get("signature")
    if not isinstance(payload_text, str) or not payload_text:
        raise _refuse(errors.BAD_REQUEST, "a DR change needs a 'payload' (JSON text)")
    if not isinstance(signature, str) or not signature:
        raise _refuse(errors.BAD_SIGNATURE, "unsigned change: it carries no signature")
    try:
        pem = key_path.read_bytes()
    except OSError as exc:
        raise _refuse(
            errors.BAD_SIGNATURE,
            f"no DR verify key at {key_path} ({exc.strerror or exc}): this VM cannot accept "
            "DR changes until its ISO's dr-verify.pem is installed",
        ) from None
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise _refuse(errors.BAD_SIGNATURE, f"{key_path} is not an Ed25519 public key")
    try:
        raw = base64.b64decode(signature, validate=True)
        key.verify(raw, CONTEXT + payload_text.encode("utf-8"))
    except (InvalidSignature, ValueError):
        theirs = params.get("key_id")
        raise _refuse(
            errors.BAD_SIGNATURE,
            "the signature does not verify with this VM's DR key {} ({}){}".format(
                key_id_of(key),
                key_path,
                f"; the change names key {theirs}" if isinstance(theirs, str) else "",
            ),
        ) from None
    try:
        payload = json.loads(payload_text)
    except ValueError:
        raise _refuse(errors.BAD_REQUEST, "the signed payload is not JSON") from None
    if not isinstance(payload, dict) or payload.get("v") != 1:
        raise _refuse(errors.BAD_REQUEST, "unknown payload version (this agent speaks v 1)")
    for name in ("issued_at", "not_before", "not_after"):
        value = payload.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _refuse(errors.BAD_REQUEST, f"payload field '{name}' must be a number")
    run = payload.get("run")
    if not isinstance(run, str) or not _NAME.match(run):
        raise _refuse(errors.BAD_REQUEST, "payload field 'run' must be a run id")
    if str(payload.get("vm", "")).lower() != vm.lower():
        raise _refuse(
            errors.IDENTITY_MISMATCH,
            f"the change is for VM {payload.get('vm')}, this VM is {vm}",
        )
    if now < float(payload["not_before"]):
        raise _refuse(
            errors.STALE,
            "the change is not valid yet (from {}; this guest's clock says {}): check the "
            "guest's clock".format(_when(payload["not_before"]), _when(now)),
        )
    if now > float(payload["not_after"]):
        raise _refuse(
            errors.STALE,
            "the change expired at {} (this guest's clock says {})".format(
                _when(payload["not_after"]), _when(now)
            ),
        )
    return payload


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(epoch)))


class Memory:
    """What the agent applied, kept in ``<state_dir>/dr.json`` across restarts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: Dict[str, Any] = {}
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(loaded, dict):
                self.data = loaded
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.error("DR memory %s unreadable (%s): starting without it", path, exc)

    def get(self, what: str) -> Dict[str, Any]:
        value = self.data.get(what)
        return value if isinstance(value, dict) else {}

    def set(self, what: str, value: Dict[str, Any]) -> None:
        self.data[what] = value
        atomic_write(self.path, (json.dumps(self.data, indent=1) + "\n").encode("utf-8"), 0o600)

    def check_fresh(self, payload: Dict[str, Any]) -> None:
        """Refuse a change older than one of another run already accepted (a replay)."""
        newest = self.get("newest")
        if (
            newest
            and newest.get("run") != payload["run"]
            and float(payload["issued_at"]) < float(newest.get("issued_at", 0))
        ):
            raise _refuse(
                errors.STALE,
                "the change of run {} is older than the change of run {} this VM already "
                "accepted (at {})".format(
                    payload["run"], newest.get("run"), _when(newest.get("issued_at", 0))
                ),
            )

    def accept(self, payload: Dict[str, Any]) -> None:
        newest = self.get("newest")
        if not newest or float(payload["issued_at"]) >= float(newest.get("issued_at", 0)):
            self.set("newest", {"run": payload["run"], "issued_at": payload["issued_at"]})


class DrAgent:
    """The agent's ``dr_apply`` and ``dr_script`` commands."""

    def __init__(self, vm: str, state_dir: Path, options: Optional[DrOptions] = None) -> None:
        self.vm = vm
        self.options = options or DrOptions()
        self.backend: Backend = self.options.backend or IpRoute2()
        self.memory = Memory(state_dir / MEMORY_FILE)
        self.stacks = Stacks(self.options.root)
        self._tasks: Dict[str, asyncio.Future[Dict[str, Any]]] = {}
        self._net_lock: Optional[asyncio.Lock] = None  # made in the loop (3.9 binds at creation)
        self.applied = 0  # network changes really applied by this process (not repeats)
        self.scripts_run = 0

    def interfaces(self) -> List[Dict[str, Any]]:
        return self.backend.interfaces()

    # --- commands ------------------------------------------------------------------------

    async def dr_apply(self, params: Dict[str, Any]) -> Dict[str, Any]:
        payload = self._verified(params, "network")
        return await self._once("network", payload, self._apply)

    async def dr_script(self, params: Dict[str, Any]) -> Dict[str, Any]:
        payload = self._verified(params, "script")
        return await self._once("script", payload, self._script)

    def _verified(self, params: Dict[str, Any], kind: str) -> Dict[str, Any]:
        payload = verify(params, self.options.key_path, self.vm, time.time())
        if payload.get("type") != kind or not isinstance(payload.get(kind), dict):
            raise _refuse(errors.BAD_REQUEST, f"this command takes a '{kind}' change")
        return payload

    async def _once(self, what: str, payload: Dict[str, Any], work: Any) -> Dict[str, Any]:
        run = str(payload["run"])
        key = f"{what}:{run}"
        running = self._tasks.get(key)
        if running is not None:  # the same run while it is being applied: wait for it
            return dict(await asyncio.shield(running), repeat=True)
        done = self.memory.get(what)
        if done.get("run") == run and done.get("state") == "done":
            log.info("DR %s of run %s already done: acknowledged without redoing it", what, run)
            return dict(done.get("result", {}), repeat=True)
        interrupted = done.get("run") == run and done.get("state") == "started"
        self.memory.check_fresh(payload)
        self.memory.accept(payload)
        self.memory.set(what, {"run": run, "state": "started", "at": time.time()})
        fut = asyncio.ensure_future(self._record(what, run, work(payload, interrupted)))
        self._tasks[key] = fut
        fut.add_done_callback(lambda _: self._tasks.pop(key, None))
        return dict(await asyncio.shield(fut))

    async def _record(self, what: str, run: str, work: Any) -> Dict[str, Any]:
        result: Dict[str, Any] = await work
        result["run"] = run
        self.memory.set(what, {"run": run, "state": "done", "at": time.time(), "result": result})
        return result

    # --- network -------------------------------------------------------------------------

    async def _apply(self, payload: Dict[str, Any], interrupted: bool) -> Dict[str, Any]:
        if self._net_lock is None:
            self._net_lock = asyncio.Lock()
        async with self._net_lock:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(None, self._apply_sync, payload)
        if interrupted:
            result.setdefault("warnings", []).append(
                "an earlier apply of this run was interrupted (agent restart): completed now"
            )
        if result["outcome"] == "applied":
            self.applied += 1
        log.info(
            "DR run %s: network %s%s",
            payload["run"],
            result["outcome"],
            f" ({result['reason']})" if result.get("reason") else "",
        )
        return result

    def _apply_sync(self, payload: Dict[str, Any]) -> Dict[str, Any]:
        started = time.monotonic()
        change = payload["network"]
        note = "Written by the guestbus agent: DR run {} ({} of plan {}) at {}.".format(
            payload["run"], payload.get("kind"), payload.get("plan"), _when(time.time())
        )
        try:
            plans = self._plan(change)
        except NetError as exc:
            return {"outcome": "failed", "reason": str(exc), "seconds": 0.0}
        snapshots: List[Snapshot] = []
        versions: Dict[str, Set[int]] = {}
        resolv = self.options.root / "etc/resolv.conf"
        old_resolv: Optional[Tuple[Optional[str]]] = None  # (text or None if absent,)
        dns: List[str] = [str(d) for d in change.get("dns", [])]
        search: List[str] = [str(s) for s in change.get("search", [])]
        try:
            for p in plans:
                snapshots.append(self.backend.snapshot(p.name))
                versions[p.name] = set(p.versions)
            for p in plans:
                for version in sorted(p.versions):
                    self.backend.set_addresses(
                        p.name, version, [a for a in p.addresses if family_of(a) == version]
                    )
            for p in plans:
                for version in sorted(p.versions):
                    gw = next((g for g in p.gateways if family_of(g + "/0") == version), None)
                    routes = [r for r in p.routes if r.family == version]
                    self.backend.set_routes(p.name, version, gw, routes)
            warnings: List[str] = []
            if dns or search:
                old_resolv = self._set_dns(resolv, plans, dns, search, note, warnings)
        except (NetError, OSError) as exc:
            reason = f"applying failed: {exc}"
            return self._rolled_back(
                "failed", reason, snapshots, versions, resolv, old_resolv, started
            )
        timeout = float(change.get("gateway_timeout", 0) or 0)
        if timeout > 0:
            deadline = time.monotonic() + timeout
            for p in plans:
                for gw in p.gateways:
                    left = max(0.0, deadline - time.monotonic())
                    if not self.backend.gateway_reachable(p.name, gw, left):
                        reason = (
                            f"gateway {gw} not reachable through {p.name} within {timeout:g} s: "
                            "rolled back to " + (", ".join(self._old(snapshots, p.name)) or "none")
                        )
                        return self._rolled_back(
                            "rolled_back", reason, snapshots, versions, resolv, old_resolv, started
                        )
        persisted: List[str] = []
        for p in plans:
            p.dns, p.search = (dns, search) if p is plans[0] else ([], [])
            try:
                written, more = self.stacks.persist(p, note)
            except (OSError, NetError, UnicodeError) as exc:
                written, more = [], [f"{p.name}: could not persist: {exc}"]
            persisted += written
            warnings += more
        names = {p.name for p in plans}
        return {
            "outcome": "applied",
            "interfaces": [i for i in self.backend.interfaces() if i["name"] in names],
            "persisted": persisted,
            "warnings": warnings,
            "seconds": round(time.monotonic() - started, 3),
        }

    @staticmethod
    def _old(snapshots: List[Snapshot], name: str) -> List[str]:
        return next((s.addresses for s in snapshots if s.name == name), [])

    def _plan(self, change: Dict[str, Any]) -> List[Persist]:
        have = self.backend.interfaces()
        plans: List[Persist] = []
        targets = change.get("interfaces")
        if not isinstance(targets, list) or not targets:
            raise NetError("the change names no interface")
        for t in targets:
            mac = (t.get("mac") or "").lower() or None
            name = t.get("name")
            nic = next((i for i in have if mac and (i.get("mac") or "").lower() == mac), None)
            if nic is None:
                nic = next((i for i in have if name and i.get("name") == name), None)
            if nic is None:
                raise NetError(f"no interface with MAC {mac} or name {name} in this guest")
            addrs = [str(a) for a in t.get("addresses", [])]
            if not addrs:
                raise NetError(f"no addresses for {nic['name']}")
            routes = []
            for r in t.get("routes", []):
                routes.append(Route(str(r["to"]), str(r["via"]), family_of(str(r["via"]) + "/0")))
            plans.append(
                Persist(
                    name=str(nic["name"]),
                    mac=nic.get("mac"),
                    addresses=addrs,
                    versions={family_of(a) for a in addrs},
                    gateways=[str(g) for g in t.get("gateways", [])],
                    routes=routes,
                )
            )
        return plans

    def _set_dns(
        self,
        resolv: Path,
        plans: List[Persist],
        dns: List[str],
        search: List[str],
        note: str,
        warnings: List[str],
    ) -> Optional[Tuple[Optional[str]]]:
        """Point the resolver at the new servers; returns what to roll back to: (the old
        resolv.conf, or None when there was none,), or None when nothing was written."""
        if resolv.is_symlink() and "systemd/resolve" in str(resolv.resolve()):
            resolvectl = shutil.which("resolvectl")
            if resolvectl and self.options.root == Path("/"):
                iface = plans[0].name
                for argv in (
                    [resolvectl, "dns", iface, *dns],
                    [resolvectl, "domain", iface, *search],
                ):
                    subprocess.run(argv, capture_output=True, timeout=15, check=False)
                return None
        old = resolv.read_text(encoding="utf-8") if resolv.exists() else None
        if len(dns) > 3:
            warnings.append("more than 3 DNS servers: the resolver uses the first 3")
        write_resolv_conf(resolv, render_resolv_conf(old or "", dns, search, note))
        return (old,)

    def _rolled_back(
        self,
        outcome: str,
        reason: str,
        snapshots: List[Snapshot],
        versions: Dict[str, Set[int]],
        resolv: Path,
        old_resolv: Optional[Tuple[Optional[str]]],
        started: float,
    ) -> Dict[str, Any]:
        problems = []
        for snap in snapshots:
            try:
                self.backend.restore(snap, versions.get(snap.name, set()))
            except NetError as exc:
                problems.append(str(exc))
        if old_resolv is not None:
            try:
                if old_resolv[0] is None:
                    resolv.unlink()
                else:
                    write_resolv_conf(resolv, old_resolv[0])
            except OSError as exc:
                problems.append(f"resolv.conf: {exc}")
        if problems:
            reason += "; the rollback failed too: " + "; ".join(problems)
        log.warning("DR change not applied: %s", reason)
        names = {s.name for s in snapshots}
        return {
            "outcome": outcome,
            "reason": reason,
            "interfaces": [i for i in self.backend.interfaces() if i["name"] in names],
            "seconds": round(time.monotonic() - started, 3),
        }

    # --- the recovery script ---------------------------------------------------------------

    async def _script(self, payload: Dict[str, Any], interrupted: bool) -> Dict[str, Any]:
        spec = payload["script"]
        which = spec.get("which")
        if which not in SCRIPTS:
            return {"outcome": "refused", "reason": f"unknown script {which!r}"}
        path = self.options.root / SCRIPTS[which]
        if interrupted:
            return {
                "outcome": "interrupted",
                "path": str(path),
                "reason": "the agent restarted while the script ran; it is not run again "
                "(a script is not known to be safe to repeat)",
            }
        try:
            env = allowed_env(spec.get("env") or {})
        except ValueError as exc:
            return {"outcome": "refused", "path": str(path), "reason": str(exc)}
        env.setdefault("GUESTBUS_VM", self.vm)
        env.setdefault("GUESTBUS_DR_RUN", str(payload["run"]))
        env.setdefault("GUESTBUS_DR_KIND", str(payload.get("kind")))
        env.setdefault("GUESTBUS_DR_PLAN", str(payload.get("plan")))
        timeout = float(spec.get("timeout", 300))
        result = await run_script(path, env, timeout)
        if result["outcome"] == "not_found" and not spec.get("required", True):
            result = {"outcome": "skipped", "path": str(path), "reason": f"no {path} (optional)"}
        if result["outcome"] in ("ok", "failed", "timeout"):
            self.scripts_run += 1
        log.info("DR run %s: script %s: %s", payload["run"], path, result["outcome"])
        return result
