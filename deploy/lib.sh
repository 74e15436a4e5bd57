# Shell helpers shared by deploy/*.sh (sourced, not run).

# docker_build ARGS...: `docker build` with BuildKit, which the Dockerfile needs (RUN --mount=type=secret).
# Uses buildx where the client has it; otherwise a client that still builds with BuildKit itself when
# DOCKER_BUILDKIT=1 (Debian's docker.io); a newer client without buildx cannot, so it is skipped.
docker_build() {
  if docker buildx version >/dev/null 2>&1; then
    docker buildx build --load "$@"
  elif [ -x /usr/bin/docker ]; then
    DOCKER_BUILDKIT=1 /usr/bin/docker build "$@"
  else
    DOCKER_BUILDKIT=1 docker build "$@"
  fi
}

# ca_secret_args: the machine's CA bundle as the pip_ca build secret, so pip in the build trusts a
# TLS-intercepting proxy; the bundle is mounted for one RUN and never stored in the image.
ca_secret_args() {
  local bundle=${PIP_CA_BUNDLE:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
  if [ -s "$bundle" ]; then
    printf '%s\n' --secret "id=pip_ca,src=$bundle"
  fi
}

# base_image_args: --build-arg BASE_IMAGE=... when BASE_IMAGE is set (else the Dockerfile's default).
base_image_args() {
  if [ -n "${BASE_IMAGE:-}" ]; then
    printf '%s\n' --build-arg "BASE_IMAGE=$BASE_IMAGE"
  fi
}

# wait_http URL SECONDS: until URL answers 200, or fail after SECONDS.
wait_http() {
  local url=$1 deadline=$((SECONDS + $2))
  until python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$url" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "no 200 from $url within $2 s" >&2
      return 1
    fi
    sleep 0.5
  done
}

# compose ARGS...: Compose v2 (`docker compose`) where the client has it, else Debian's docker-compose.
compose() {
  if docker compose version >/dev/null 2>&1; then
    docker compose "$@"
  else
    docker-compose "$@"
  fi
}

# free_port: a TCP port nothing listens on now, on 127.0.0.1.
free_port() {
  python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"
}
