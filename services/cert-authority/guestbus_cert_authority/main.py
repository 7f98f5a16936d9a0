"""``guestbus-cert-authority``: Cluster CA for VM client and gateway server certificates.

Skeleton: the service registers on the bus (``$SRV.PING/INFO/STATS``), serves its probes
and metrics, and has no endpoints yet; see the project's open issues for what it will do.
"""

from guestbus.runtime import BusService, ServiceContext, run_service

from . import __version__


class CertAuthority(BusService):
    name = "cert-authority"
    version = __version__
    description = (
        "Cluster CA for VM client and gateway server certificates (skeleton: no endpoints yet)."
    )

    async def setup(self, ctx: ServiceContext) -> None:
        ctx.log.warning(
            "cert-authority is a skeleton: it registers and reports health, nothing more"
        )


def main() -> None:
    run_service(CertAuthority)


if __name__ == "__main__":
    main()
