"""``guestbus-dr-orchestrator``: DR plans and failover runs (docs/dr.md)."""

from guestbus.runtime import run_service

from .service import DrOrchestrator


def main() -> None:
    run_service(DrOrchestrator)


if __name__ == "__main__":
    main()
