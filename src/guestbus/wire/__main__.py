"""Frames for a person at a socket: nobody types a CRC by hand.

``python -m guestbus.wire encode '{"kind":"evt","method":"boot","params":{}}'`` writes frames;
``python -m guestbus.wire decode`` reads a stream on stdin and prints one line per frame:
the JSON message, or ``!dropped <reason>: <detail>``. Console output and other noise between
frames is skipped, as the session would skip it.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

from .events import FrameDropped
from .framing import FrameDecoder, encode_frame


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestbus.wire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="write each JSON object as a frame on stdout")
    enc.add_argument("messages", nargs="+", metavar="JSON")
    sub.add_parser("decode", help="decode frames from stdin, one line each")
    args = parser.parse_args(argv)
    if args.command == "encode":
        for text in args.messages:
            sys.stdout.buffer.write(encode_frame(json.loads(text)))
        sys.stdout.flush()
        return 0
    decoder = FrameDecoder()
    fd = sys.stdin.fileno()
    while True:
        data = os.read(fd, 65536)
        if not data:
            return 0
        for item in decoder.feed(data):
            if isinstance(item, FrameDropped):
                line = f"!dropped {item.reason}: {item.detail}"
            else:
                line = json.dumps(item, separators=(",", ":"))
            sys.stdout.write(line + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
