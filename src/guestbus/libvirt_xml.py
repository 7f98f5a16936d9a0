"""libvirt domain XML snippets guestbus hands to operators."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr


def serial_port_xml(path: str, index: int) -> str:
    """The ``<serial>`` element of a unix-socket serial port, index 0-3 (COM1-COM4).

    QEMU binds the socket (``mode='bind'``) and the serial-bridge connects to it; the guest
    sees an ISA UART (``/dev/ttyS<index>``).
    """
    if not 0 <= index <= 3:
        raise ValueError(f"serial port index must be 0-3 (COM1-COM4), got {index}")
    return (
        "<serial type='unix'>\n"
        f"  <source mode='bind' path={quoteattr(path)}/>\n"
        f"  <target type='isa-serial' port='{index}'>\n"
        "    <model name='isa-serial'/>\n"
        "  </target>\n"
        "</serial>\n"
    )
