# syntax=docker/dockerfile:1
#
# One Dockerfile for every guestbus image: the wheel is built once, the runtime layer is
# shared, and each service is a final stage (a build target) with its own user, state and
# entry point. Build from the repository root:
#
#   docker build --target rpc-router      -t guestbus/rpc-router .
#   docker build --target serial-bridge   -t guestbus/serial-bridge .
#   docker build --target cert-authority  -t guestbus/cert-authority .
#   docker build --target iso-builder     -t guestbus/iso-builder .
#   docker build --target dr-orchestrator -t guestbus/dr-orchestrator .
#   docker build --target cli             -t guestbus/cli .        # `guestbus` (provisioning, ops)
#
# (docker compose build does all of them; see docs/deploy.md.)

ARG PYTHON_VERSION=3.12

# --- build: the guestbus wheel and every dependency as wheels ---------------------------------
FROM python:${PYTHON_VERSION}-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
COPY agent ./agent
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# --- runtime: installed once, shared by every service stage ------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-compile /wheels/*.whl \
 && groupadd --system --gid 10001 guestbus \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/guestbus --create-home \
      --shell /usr/sbin/nologin guestbus
WORKDIR /var/lib/guestbus
ENV PYTHONUNBUFFERED=1 \
    GUESTBUS_HTTP_PORT=8080 \
    GUESTBUS_LOG_LEVEL=INFO \
    GUESTBUS_STATE_DIR=/var/lib/guestbus
EXPOSE 8080
# /readyz, not /healthz: docker's "healthy" gates `depends_on` in compose, and a service is
# useful once it is connected to NATS and set up (Kubernetes probes both separately).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/readyz', timeout=2)"]

# --- the services ------------------------------------------------------------------------------

FROM runtime AS rpc-router
USER 10001:10001
# the TLS gateway (mutual TLS, the agents' IP fallback)
EXPOSE 2074
ENTRYPOINT ["guestbus-rpc-router"]

FROM runtime AS cert-authority
USER 10001:10001
# ca.pem and crl.pem for distribution (the CA itself lives in JetStream KV gb_certs)
VOLUME ["/var/lib/guestbus"]
ENTRYPOINT ["guestbus-cert-authority"]

FROM runtime AS iso-builder
USER 10001:10001
# ISOs go to /var/lib/guestbus/isos (a volume, or a libvirt storage pool); the offline
# wheelhouse is assembled on the first full build in /var/lib/guestbus/wheelhouse (pip reaches
# PyPI, or set GUESTBUS_ISO_WHEEL_SOURCE to a mounted directory of wheels).
VOLUME ["/var/lib/guestbus"]
ENTRYPOINT ["guestbus-iso-builder"]

FROM runtime AS dr-orchestrator
USER 10001:10001
ENTRYPOINT ["guestbus-dr-orchestrator"]

# serial-bridge: one per hypervisor host, with the host's QEMU socket directory
# (/var/lib/libvirt/qemu) and libvirt's domain XML (/run/libvirt/qemu, /etc/libvirt/qemu)
# mounted read-only. QEMU's sockets belong to the QEMU user (libvirt-qemu on Debian, qemu on
# Fedora/RHEL) and libvirt's XML files are root's, mode 0600. So the image runs as root, and a
# deployment drops every capability except CAP_DAC_OVERRIDE (open other users' sockets and
# files); or it runs as the QEMU user (e.g. `--user 64055:64055` on Debian), which can open the
# sockets but not the XML (VM names then stay unknown). docs/deploy.md has both.
# Its host adapter (snapshots, self-service restore disks) drives libvirt through the host's
# /run/libvirt sockets: the image has libvirt's client library and the `libvirt` extra (the
# Python binding, compiled here against libvirt's headers, which go again with the compiler).
FROM runtime AS serial-bridge
USER 0:0
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libvirt-dev \
 && pip install --no-cache-dir --no-compile --find-links /wheels "guestbus[libvirt]" \
 && python -c "import libvirt" \
 && apt-get purge -y --auto-remove gcc libc6-dev pkg-config libvirt-dev \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["guestbus-serial-bridge"]

# the `guestbus` command: provisioning (compose's provision service, the chart's Job and init
# containers) and operating the cluster from a container
FROM runtime AS cli
USER 10001:10001
HEALTHCHECK NONE
ENTRYPOINT ["guestbus"]
CMD ["--help"]
