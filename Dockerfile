# telephony-bridge: a slim image, non-root, health-checked, installed exactly from constraints.txt.
#
#   docker build -t telephony-bridge .                       # needs BuildKit (Docker 23+, or DOCKER_BUILDKIT=1)
#   docker build --build-arg BASE_IMAGE=telephony-bridge-base:bookworm -t telephony-bridge .
#
# BASE_IMAGE: any Debian-like image with python3 (3.11+) and its venv module. The default is the official
# Python image; where no image registry is reachable, deploy/base-image.sh builds one from Debian's packages.
# Behind a TLS-intercepting proxy, hand pip the proxy's CA bundle for the install step only:
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt .
# A BuildKit secret is mounted for that one RUN and is never stored in a layer of either stage.
ARG BASE_IMAGE=python:3.12.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY constraints.txt pyproject.toml README.md ./
COPY telephony_bridge ./telephony_bridge
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check -q \
        --constraint constraints.txt pip \
    && /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check -q \
        --constraint constraints.txt .

FROM ${BASE_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    BRIDGE_CONFIG=/app/config.yaml
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY config.yaml ./config.yaml
RUN useradd --uid 10001 --no-log-init --no-create-home --home-dir /app --shell /usr/sbin/nologin bridge
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"]
# SIGTERM starts a graceful drain (server.drain_timeout_s); give the runtime at least that long before SIGKILL
# (docker stop --time, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT ["telephony-bridge"]
CMD ["serve"]
