# telephony-bridge: slim image, non-root, health-checked.
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY telephony_bridge ./telephony_bridge
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.12-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    BRIDGE_CONFIG=/app/config.yaml
COPY --from=build /install /usr/local
WORKDIR /app
COPY config.yaml ./config.yaml
RUN useradd --system --uid 10001 --home-dir /app bridge
USER bridge
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"8080\")}/healthz', timeout=2)"
# SIGTERM starts a graceful drain (server.drain_timeout_s); give Docker at least that long before SIGKILL.
STOPSIGNAL SIGTERM
CMD ["telephony-bridge", "serve"]
