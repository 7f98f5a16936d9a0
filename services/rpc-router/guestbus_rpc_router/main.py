"""``guestbus-rpc-router`` console script."""

from guestbus.runtime import run_service

from .service import RpcRouter


def main() -> None:
    run_service(RpcRouter)


if __name__ == "__main__":
    main()
