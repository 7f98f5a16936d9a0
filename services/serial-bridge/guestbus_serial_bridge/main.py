"""``guestbus-serial-bridge`` console script."""

from guestbus.runtime import run_service

from .service import SerialBridge


def main() -> None:
    run_service(SerialBridge)


if __name__ == "__main__":
    main()
