"""``guestbus cert …`` / ``guestbus ca …`` against a running CA."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
from pathlib import Path

from guestbus import pki
from guestbus.cli import cert as cert_cli

from ._support import CaEnv, new_vm


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guestbus")
    cert_cli.add_parser(parser.add_subparsers(dest="command"))
    return parser


def _run_sync(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args = _parser().parse_args(argv)
            status = int(args.func(args))
        except SystemExit as exc:  # argparse errors
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


async def cli(ca: CaEnv, *argv: str) -> tuple[int, str, str]:
    # the CLI runs its own event loop (asyncio.run): give it a thread
    return await asyncio.to_thread(_run_sync, [*argv, "--nats", ca.url])


async def test_cert_list_show_and_revoke(ca: CaEnv) -> None:
    vm = new_vm()
    soon = (await ca.issue(vm, lifetime_seconds=3 * 86400))["serial"]
    later = (await ca.issue(vm))["serial"]

    status, out, _ = await cli(ca, "cert", "list", "--vm", vm)
    assert status == 0
    assert out.splitlines()[0].split() == [
        "SERIAL", "KIND", "VM/NAME", "NOT", "AFTER", "(UTC)", "EXPIRES", "IN", "STATE",
    ]  # fmt: skip
    assert soon in out and later in out and "2 certificates (2 valid)" in out

    status, out, _ = await cli(ca, "cert", "list", "--vm", vm, "--expiring", "30d", "--json")
    assert [c["serial"] for c in json.loads(out)["certificates"]] == [soon]

    status, out, _ = await cli(ca, "cert", "show", soon)
    assert status == 0 and f"spiffe://guestbus.local/vm/{vm}" in out and "clientAuth" in out
    status, out, _ = await cli(ca, "cert", "show", soon, "--pem")
    assert pki.serial_hex(pki.load_pem_certificate(out)) == soon

    status, _, err = await cli(ca, "cert", "revoke", soon, "--reason", "stolen")
    assert status == 2
    assert "unknown revocation reason 'stolen'" in err
    assert "keyCompromise, superseded, cessationOfOperation" in err

    status, out, _ = await cli(ca, "cert", "revoke", soon, "--reason", "key-compromise")
    assert status == 0 and f"revoked 1 certificate(s) of certificate {soon}" in out
    status, out, _ = await cli(ca, "cert", "list", "--vm", vm, "--revoked")
    assert soon in out and later not in out and "revoked (keyCompromise)" in out

    status, out, _ = await cli(ca, "cert", "revoke", vm, "--reason", "superseded", "--json")
    assert json.loads(out)["revoked"] == [later]

    status, _, err = await cli(ca, "cert", "show", "abcdef")
    assert status == 1 and "no certificate with serial abcdef (not_found)" in err
    status, _, err = await cli(ca, "cert", "list", "--expiring", "soon")
    assert status == 2 and "not a duration" in err


async def test_ca_show_and_crl(ca: CaEnv, tmp_path: Path) -> None:
    info = await ca.call("info")
    status, out, _ = await cli(ca, "ca", "show")
    assert status == 0
    assert pki.fingerprint_colons(info["fingerprint"]) in out
    assert "guestbus.local" in out and "CN=guestbus cluster CA" in out
    status, out, _ = await cli(ca, "ca", "show", "--pem")
    assert out == info["certificate"]

    target = tmp_path / "crl.pem"
    status, out, _ = await cli(ca, "ca", "crl", "-o", str(target))
    assert status == 0 and str(target) in out
    crl = pki.load_pem_crl(target.read_text())
    assert crl.is_signature_valid(pki.load_pem_certificate(info["certificate"]).public_key())  # type: ignore[arg-type]
    status, out, _ = await cli(ca, "ca", "crl")
    assert out.startswith("-----BEGIN X509 CRL-----")


async def test_cli_says_when_the_ca_is_not_running(tmp_path: Path) -> None:
    from guestbus.broker import EmbeddedBroker

    async with EmbeddedBroker(tmp_path, port=0, monitor_port=None) as broker:
        status, _, err = await asyncio.to_thread(_run_sync, ["ca", "show", "--nats", broker.url])
    assert status == 1 and "cert-authority service is not running" in err
