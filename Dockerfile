# telephony-bridge: a slim image, non-root, health-checked, installed exactly from constraints.txt, with the
# compiled audio kernels and frame path (setup.py's C extensions): the build fails rather than ship the fallback.
#
#   docker build -t telephony-bridge .                       # needs BuildKit (Docker 23+, or DOCKER_BUILDKIT=1)
#   docker build --build-arg BUILD_IMAGE=telephony-bridge-build-base:bookworm \
#     --build-arg BASE_IMAGE=telephony-bridge-base:bookworm -t telephony-bridge .
#
# Two bases with the same Python at the same path, because the venv built on the one runs on the other:
# BUILD_IMAGE, where pip installs the package: it needs a C compiler and Python's headers (on Debian: gcc
#   python3-dev). Default: python:3.12.11-bookworm.
# BASE_IMAGE, what the image runs on: any Debian-like image with python3 (3.11+) and its venv module, no
#   compiler. Default: python:3.12.11-slim-bookworm.
# Set BASE_IMAGE alone and BUILD_IMAGE is that same image (only the same image is sure to have the same Python):
# if it has no compiler, the build stops and says so; then set BUILD_IMAGE to its twin with gcc and headers.
# Where no image registry is reachable, deploy/base-image.sh builds both bases from Debian's packages.
# Behind a TLS-intercepting proxy, hand pip the proxy's CA bundle for the install step only:
#   docker build --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt .
# A BuildKit secret is mounted for that one RUN and is never stored in a layer of either stage.
ARG BASE_IMAGE=
# RUNTIME_IMAGE is BASE_IMAGE or its default: set BASE_IMAGE.
ARG BUILD_IMAGE=${BASE_IMAGE:-python:3.12.11-bookworm}
ARG RUNTIME_IMAGE=${BASE_IMAGE:-python:3.12.11-slim-bookworm}

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY constraints.txt pyproject.toml setup.py README.md ./
COPY telephony_bridge ./telephony_bridge
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi; \
    /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check -q \
        --constraint constraints.txt pip \
    && /opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check -q \
        --constraint constraints.txt .
# setup.py builds the extensions with optional=True, so pip succeeds without a compiler: stop here instead.
# (From /, so Python imports the installed package rather than the source tree in /src.)
RUN cd / && /opt/venv/bin/python -c "import sys; from telephony_bridge.audio import kernels; \
from telephony_bridge.inbound import CallerPath; from telephony_bridge.outbound import AiAudioPath; \
from telephony_bridge.twilio.leg import MediaTap; \
sys.exit(0 if kernels.EXTENSION and CallerPath and AiAudioPath and MediaTap else 'build: the C extensions (setup.py) \
were not built, so the image would run the slower Python and numpy path; BUILD_IMAGE needs a C compiler and Python \
headers')"

FROM ${RUNTIME_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    BRIDGE_CONFIG=/app/config.yaml
COPY --from=build /opt/venv /opt/venv
RUN python3 -c "from telephony_bridge.audio import kernels; from telephony_bridge.inbound import CallerPath; \
assert kernels.EXTENSION is not None and CallerPath" || { \
    echo "build: the venv built on BUILD_IMAGE does not run on BASE_IMAGE with its compiled audio kernels;" \
    "give both bases the same Python (version and path)" >&2; exit 1; }
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
