"""The agent as a whole: serial first, mutual TLS as fallback, and its own certificate.

- The serial link always runs. After ``serial_failure_limit`` consecutive failures (hellos or
  heartbeats the host did not answer) the IP link starts; the serial link keeps probing, and
  the moment it answers again the IP link is closed: serial is preferred.
- The certificate is renewed at 2/3 of its lifetime plus jitter over whichever link is up; an
  expired one only over serial, where the hypervisor vouches for the identity.
- A clone (the host stamps another identity than the config's) re-enrolls over serial: new
  identity, key, certificate and config, without a new ISO or a reboot.
"""

import asyncio
import contextlib
import datetime
import logging
import random
import uuid as uuidlib
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from guestbus.wire import errors
from guestbus.wire.aio import LinkClosed, RemoteError

from .commands import Commands
from .config import AgentConfig, write_state_config
from .dr import DrAgent, DrOptions
from .identity import Identity, IdentityError, renew_at, utcnow
from .link import Backoff, Link, Opener
from .quiesce import Quiescer
from .ssr import ControlServer, DiskLocator, Restorer
from .tls import tls_opener

log = logging.getLogger("guestbus.agent")


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        serial_opener: Opener,
        ip_opener: Optional[Opener] = None,
        rng: Optional[random.Random] = None,
        certificates: bool = True,
        dr: Optional[DrOptions] = None,
        quiescer: Optional[Quiescer] = None,
        control_socket: Optional[str] = None,
        disk_locator: Optional[DiskLocator] = None,
    ) -> None:
        """``quiescer``: the real one in a guest (:meth:`Quiescer.from_config`); by default
        an inert one, since lab agents share the machine's file systems. ``control_socket``:
        serve self-service restore there (none by default)."""
        self.config = config
        self.certificates = certificates
        self.rng = rng or random.Random()
        self.identity = Identity(Path(config.state_dir))
        self.dr = DrAgent(config.vm_uuid, Path(config.state_dir), dr)
        self.quiesce = quiescer or Quiescer.inert()
        self.restore = Restorer(
            config.restore_dir,
            self.rpc,
            enabled=config.ssr,
            locator=disk_locator,
            frozen_fn=self.quiesce.is_frozen,
        )
        self.control = (
            ControlServer(self.restore, control_socket) if control_socket is not None else None
        )
        self.commands = Commands(
            config.vm_uuid,
            config.allowed_commands,
            extra={
                "renew": self._cmd_renew,
                "dr_apply": self.dr.dr_apply,
                "dr_script": self.dr.dr_script,
                "freeze": self.quiesce.freeze,
                "thaw": self.quiesce.thaw,
                "freeze_status": self.quiesce.status,
                "ssr_unmount": self.restore.ssr_unmount,
            },
            # a simulated network (lab agents) answers ``info`` with its own interfaces
            interfaces_fn=self.dr.interfaces if dr is not None and dr.backend else None,
            features=("ssr",) if config.ssr else (),
        )
        self.serial = Link(
            config,
            serial_opener,
            self.commands,
            self.rng,
            kind="serial",
            on_change=self._on_change,
            on_ack=self._on_serial_ack,
        )
        self._ip_opener = ip_opener or tls_opener(
            config.gateway_host, config.gateway_port, self.identity
        )
        self.ip: Optional[Link] = None
        self._ip_task: Optional[asyncio.Task[None]] = None
        self._wake = asyncio.Event()
        self._link_event = asyncio.Event()
        self._renew_now = asyncio.Event()
        self._reidentified = asyncio.Event()
        self._renewed: Optional[asyncio.Future[Dict[str, Any]]] = None
        self.renewals = 0
        self.enrollments = 0
        self.fallbacks = 0
        self._no_cert_logged = False

    # --- state -----------------------------------------------------------------------------

    @property
    def path(self) -> str:
        """Which link carries the traffic: serial, ip or down."""
        if self.serial.status.active:
            return "serial"
        if self.ip is not None and self.ip.status.active:
            return "ip"
        return "down"

    def active_link(self) -> Optional[Link]:
        if self.serial.status.active and self.serial.channel is not None:
            return self.serial
        if self.ip is not None and self.ip.status.active and self.ip.channel is not None:
            return self.ip
        return None

    async def rpc(self, method: str, params: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        """A guest RPC over whichever link is up."""
        link = self.active_link()
        if link is None or link.channel is None:
            raise RemoteError(errors.NO_ACTIVE_LINK, "the agent has no link to the host right now")
        return await link.channel.request(method, params, timeout)

    def _on_change(self, link: Link) -> None:
        self._wake.set()
        self._link_event.set()

    def _set_config(self, config: AgentConfig) -> None:
        self.config = config
        self.commands.vm = config.vm_uuid
        self.dr.vm = config.vm_uuid
        self.serial.config = config
        if self.ip is not None:
            self.ip.config = config

    # --- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        tasks = [
            asyncio.ensure_future(self.serial.run()),
            asyncio.ensure_future(self._supervise_ip()),
        ]
        if self.certificates:
            tasks.append(asyncio.ensure_future(self._identity_loop()))
        if self.control is not None:
            tasks.append(asyncio.ensure_future(self.control.serve()))
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await self._stop_ip()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Never leave the guest frozen (or its applications quiesced) behind us.
            await asyncio.get_running_loop().run_in_executor(None, self.quiesce.shutdown)

    async def _supervise_ip(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            serial = self.serial.status
            if serial.active:
                if self.ip is not None:
                    log.info("serial link answers again: closing the IP link")
                    await self._stop_ip()
                continue
            want_ip = (
                self.config.ip_fallback
                and serial.consecutive_failures >= self.config.serial_failure_limit
            )
            if want_ip and self.ip is None:
                if not self.identity.present():
                    if not self._no_cert_logged:
                        log.warning(
                            "serial link down and no client certificate yet: cannot fall back to IP"
                        )
                        self._no_cert_logged = True
                    continue
                self.fallbacks += 1
                self._start_ip(
                    f"serial link failed {serial.consecutive_failures} times ({serial.last_error})"
                )

    def _new_ip_link(self) -> Tuple[Link, "asyncio.Task[None]"]:
        link = Link(
            self.config,
            self._ip_opener,
            self.commands,
            self.rng,
            kind="ip",
            on_change=self._on_change,
        )
        return link, asyncio.ensure_future(link.run())

    def _start_ip(self, why: str) -> None:
        log.warning(
            "falling back to IP: %s; connecting to %s:%d",
            why,
            self.config.gateway_host,
            self.config.gateway_port,
        )
        self.ip, self._ip_task = self._new_ip_link()

    async def _stop_ip(self) -> None:
        task, self._ip_task, self.ip = self._ip_task, None, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- identity --------------------------------------------------------------------------

    async def _on_serial_ack(self, link: Link, ack: Dict[str, Any]) -> None:
        stamped = str(ack.get("vm", "")).lower()
        if stamped and stamped != self.config.vm_uuid:
            # The hypervisor says we are another VM: we were cloned. Take the new identity
            # now; the identity loop enrolls a certificate for it over this serial link.
            log.warning(
                "this VM is %s according to the host, but the config says %s (a clone): "
                "taking the new identity",
                stamped,
                self.config.vm_uuid,
            )
            new = replace(
                self.config,
                vm_uuid=stamped,
                config_uuid=str(uuidlib.uuid4()),
                source_config_uuid=self.config.source_config_uuid or self.config.config_uuid,
            )
            try:
                write_state_config(new)
            except OSError as exc:
                log.error("cannot save the new identity's config: %s", exc)
            self._set_config(new)
            self._reidentified.set()  # the identity loop may be asleep until a renewal
        self._wake.set()

    def _needs_enrollment(self) -> bool:
        try:
            info = self.identity.info() if self.identity.present() else None
        except IdentityError:
            return True
        return info is None or info.vm != self.config.vm_uuid

    async def _wait_serial(self) -> Link:
        while not (self.serial.status.active and self.serial.channel is not None):
            self._link_event.clear()
            await self._link_event.wait()
        return self.serial

    async def _identity_loop(self) -> None:
        backoff = Backoff(1.0, 60.0, self.rng)
        due_serial: Optional[str] = None
        due: Optional[datetime.datetime] = None
        while True:
            self._reidentified.clear()
            if self._needs_enrollment():
                link = await self._wait_serial()
                try:
                    await self._enroll(link)
                    backoff.reset()
                except (RemoteError, LinkClosed, IdentityError, OSError) as exc:
                    log.warning("enrollment failed (%s); retrying", exc)
                    await asyncio.sleep(backoff.next())
                continue
            info = self.identity.info()
            assert info is not None
            if due_serial != info.serial:
                due_serial, due = info.serial, renew_at(info, self.rng)
                log.info(
                    "certificate %s valid until %s; renewal at %s",
                    info.serial,
                    info.not_after.isoformat(),
                    due.isoformat(),
                )
            assert due is not None
            wait = (due - utcnow()).total_seconds()
            if wait > 0 and not self._renew_now.is_set():
                await self._sleep_until(min(wait, 3600), self._renew_now, self._reidentified)
                if not self._renew_now.is_set():
                    continue  # due now, or a new identity to enroll: look again
            self._renew_now.clear()
            try:
                result = await self._renew(info.expired())
                backoff.reset()
                self._resolve_renewal(result=result)
            except (RemoteError, LinkClosed, IdentityError, OSError) as exc:
                log.warning("certificate renewal failed (%s); retrying with backoff", exc)
                self._resolve_renewal(error=exc)
                retry = min(backoff.next(), max(1.0, info.lifetime / 20))
                due = utcnow() + datetime.timedelta(seconds=retry)

    @staticmethod
    async def _sleep_until(timeout: float, *events: asyncio.Event) -> None:
        """Sleep until one of ``events`` is set or ``timeout`` passes."""
        waiters = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def _resolve_renewal(
        self, result: Optional[Dict[str, Any]] = None, error: Optional[BaseException] = None
    ) -> None:
        fut, self._renewed = self._renewed, None
        if fut is None or fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result or {})

    async def _enroll(self, link: Link) -> None:
        assert link.channel is not None
        vm = self.config.vm_uuid
        key_pem, csr_pem = self.identity.new_key_and_csr(vm)
        result = await link.channel.request(
            "enroll", {"csr": csr_pem.decode("ascii"), "vm": vm}, self.config.request_timeout
        )
        info = self.identity.install(
            key_pem, str(result["certificate"]).encode(), str(result["ca"]).encode()
        )
        self.identity.confirm()
        self.enrollments += 1
        self._no_cert_logged = False
        log.info("enrolled over serial: certificate %s until %s", info.serial, info.not_after)

    async def _renew(self, expired: bool) -> Dict[str, Any]:
        link = self.active_link()
        if expired and (link is None or link.kind != "serial"):
            log.warning(
                "certificate expired: renewing needs the serial link (the gateway refuses "
                "expired certificates); waiting for it"
            )
            link = await self._wait_serial()
        if link is None or link.channel is None:
            raise RemoteError("no_active_link", "no link is up to renew over")
        vm = self.config.vm_uuid
        key_pem, csr_pem = self.identity.new_key_and_csr(vm)
        result = await link.channel.request(
            "renew", {"csr": csr_pem.decode("ascii"), "vm": vm}, self.config.request_timeout
        )
        info = self.identity.install(
            key_pem, str(result["certificate"]).encode(), str(result["ca"]).encode()
        )
        answer = {"serial": info.serial, "not_after": info.not_after.isoformat(), "link": link.kind}
        if link.kind == "ip":
            # Answer a waiting ``renew`` command now, over the current connection: the
            # gateway drops that connection once one with the new certificate is accepted.
            self._resolve_renewal(result=answer)
            if not await self._prove_ip(15.0):
                self.identity.rollback()
                self._wake.set()
                raise IdentityError("the renewed certificate was refused; kept the previous one")
        self.identity.confirm()
        self.renewals += 1
        log.info("certificate renewed over %s: %s until %s", link.kind, info.serial, info.not_after)
        return answer

    async def _prove_ip(self, timeout: float) -> bool:
        """Connect with the renewed certificate beside the current IP link; the new link
        replaces it once the gateway accepted it. False, and the current link kept, if the
        new one does not come up in time."""
        log.info("reconnecting to the gateway with the renewed certificate")
        new, task = self._new_ip_link()
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        try:
            while not new.status.active:
                if loop.time() > end:
                    return False
                await asyncio.sleep(0.05)
        finally:
            if not new.status.active:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        old_task, self.ip, self._ip_task = self._ip_task, new, task
        if old_task is not None:
            old_task.cancel()
            await asyncio.gather(old_task, return_exceptions=True)
        self._wake.set()  # serial may have returned meanwhile: the supervisor decides
        return True

    async def _cmd_renew(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """Host command ``renew``: renew now and answer with the new certificate's serial."""
        if self._needs_enrollment():
            raise RemoteError("unavailable", "no certificate yet: enrollment is pending")
        if self._renewed is None or self._renewed.done():
            self._renewed = asyncio.get_running_loop().create_future()
        fut = self._renewed
        self._renew_now.set()
        try:
            return await fut
        except (IdentityError, LinkClosed, OSError) as exc:
            raise RemoteError("unavailable", f"renewal failed: {exc}") from None

    def status(self) -> Dict[str, Any]:
        info = None
        with contextlib.suppress(IdentityError):
            info = self.identity.info() if self.identity.present() else None
        links: List[Dict[str, Any]] = []
        for link in (self.serial, self.ip):
            if link is not None:
                links.append(
                    {
                        "kind": link.kind,
                        "active": link.status.active,
                        "failures": link.status.consecutive_failures,
                    }
                )
        return {
            "vm": self.config.vm_uuid,
            "path": self.path,
            "links": links,
            "certificate": None
            if info is None
            else {"serial": info.serial, "not_after": info.not_after.isoformat()},
        }
