"""``guestbus-iso-builder`` console script (see docs/iso.md)."""

from guestbus.runtime import run_service

from .service import IsoBuilder


def main() -> None:
    run_service(IsoBuilder)


if __name__ == "__main__":
    main()
