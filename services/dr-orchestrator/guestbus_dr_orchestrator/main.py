"""``guestbus-dr-orchestrator``: DR plans and failover runs.

Skeleton: the service registers on the bus (``$SRV.PING/INFO/STATS``), serves its probes
and metrics, and has no endpoints yet; see the project's open issues for what it will do.
"""

from guestbus.runtime import BusService, ServiceContext, run_service

from . import __version__


class DrOrchestrator(BusService):
    name = "dr-orchestrator"
    version = __version__
    description = (
        "Disaster-recovery plans and failover runs (re-IP, recovery scripts) "
        "(skeleton: no endpoints yet)."
    )

    async def setup(self, ctx: ServiceContext) -> None:
        ctx.log.warning(
            "dr-orchestrator is a skeleton: it registers and reports health, nothing more"
        )


def main() -> None:
    run_service(DrOrchestrator)


if __name__ == "__main__":
    main()
