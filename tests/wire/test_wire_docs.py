"""The spec in docs/wire-protocol.md must agree with the code: diagram, examples, codes."""

import io
import re
import sys
from pathlib import Path

import pytest

from guestbus.wire import __main__ as wire_cli
from guestbus.wire import errors
from guestbus.wire.diagram import BEGIN_MARKER, END_MARKER, main, mermaid, update_doc
from guestbus.wire.events import FrameDropped
from guestbus.wire.framing import FrameDecoder, encode_frame
from guestbus.wire.messages import parse_message
from guestbus.wire.session import TRANSITIONS

DOC = Path(__file__).resolve().parents[2] / "docs" / "wire-protocol.md"


def test_mermaid_has_every_transition() -> None:
    lines = mermaid().splitlines()
    assert lines[0] == "stateDiagram-v2"
    for (state, trigger), new in TRANSITIONS.items():
        edge = [ln for ln in lines if ln.strip().startswith(f"{state.name} --> {new.name}:")]
        assert len(edge) == 1
        assert trigger.name in edge[0].split(": ", 1)[1].split(", ")


def test_doc_state_diagram_matches_the_table() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert update_doc(text) == text, (
        "docs/wire-protocol.md is out of date with session.TRANSITIONS; run "
        "`python -m guestbus.wire.diagram --write docs/wire-protocol.md`"
    )


def test_update_doc_needs_markers() -> None:
    with pytest.raises(ValueError):
        update_doc("no markers here")


def test_diagram_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == mermaid()
    doc = tmp_path / "doc.md"
    doc.write_text(f"intro\n{BEGIN_MARKER}\nstale\n{END_MARKER}\noutro\n", encoding="utf-8")
    assert main(["--write", str(doc)]) == 0
    assert update_doc(doc.read_text(encoding="utf-8")) == doc.read_text(encoding="utf-8")
    assert "stale" not in doc.read_text(encoding="utf-8")


def test_doc_example_frames_are_valid() -> None:
    text = DOC.read_text(encoding="utf-8")
    frames = [
        "\x1e" + m.group(1) for m in re.finditer(r"^[<>] \^\^(GB1 .*)$", text, flags=re.MULTILINE)
    ]
    assert len(frames) >= 10
    items = FrameDecoder().feed("\n".join(frames).encode("ascii") + b"\n")
    assert len(items) == len(frames)
    for item in items:
        assert not isinstance(item, FrameDropped), item
        parse_message(item)
    example = {"kind": "req", "id": "a1f3-1", "method": "ping", "params": {}, "deadline_ms": 5000}
    assert encode_frame(example).decode("ascii").replace("\x1e", "\\x1e")[:-1] + "\\n" in text


def test_doc_lists_every_error_code() -> None:
    text = DOC.read_text(encoding="utf-8")
    for code in errors.ALL_CODES:
        assert f"| `{code}` |" in text
    assert len(set(errors.ALL_CODES)) == len(errors.ALL_CODES) == 16


class _Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def test_wire_cli_encode_and_decode(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert wire_cli.main(["encode", '{"kind":"evt","method":"boot","params":{}}']) == 0
    encoded = capfd.readouterr().out
    assert encoded == encode_frame({"kind": "evt", "method": "boot", "params": {}}).decode()
    stream = tmp_path / "stream"
    stream.write_bytes(b"console noise\r\n" + encoded.encode() + b"\x1eGB1 00000000 {}\n")
    with stream.open("rb") as f:
        monkeypatch.setattr(sys, "stdin", f)
        assert wire_cli.main(["decode"]) == 0
    lines = capfd.readouterr().out.splitlines()
    assert lines[0] == '{"kind":"evt","method":"boot","params":{}}'
    assert lines[1].startswith("!dropped bad_checksum: ")
