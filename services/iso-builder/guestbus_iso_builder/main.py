"""``guestbus-iso-builder``: Per-VM tools and config ISO media.

Skeleton: the service registers on the bus (``$SRV.PING/INFO/STATS``), serves its probes
and metrics, and has no endpoints yet; see the project's open issues for what it will do.
"""

from guestbus.runtime import BusService, ServiceContext, run_service

from . import __version__


class IsoBuilder(BusService):
    name = "iso-builder"
    version = __version__
    description = "Per-VM tools and config ISO media (skeleton: no endpoints yet)."

    async def setup(self, ctx: ServiceContext) -> None:
        ctx.log.warning("iso-builder: skeleton; it registers and reports health only")


def main() -> None:
    run_service(IsoBuilder)


if __name__ == "__main__":
    main()
