# syntax=docker/dockerfile:1
#
# lorabroker container image.
#
#   docker build -t lorabroker .
#   # a cluster node (the default command is `serve`):
#   docker run -e LORABROKER_NATS__URL=nats://… -e LORABROKER_REDIS__URL=redis://… \
#     -p 1883:1883 -p 8080:8080 lorabroker
#   docker run --rm lorabroker keys --redis-url redis://… --nats-url nats://… create --app demo
#   # everything embedded, with a simulated fleet and a printed demo key:
#   docker run --rm -p 1883:1883 lorabroker dev --mqtt-listen 0.0.0.0:1883 --http-listen 0.0.0.0:8080
#
# docker-compose.yml runs a whole development cluster from this image.
#
# Two stages: the build stage compiles the release binary with the locked dependency
# versions; the runtime stage is debian:bookworm-slim (same glibc as the build stage) with
# only the binary, CA certificates (NATS over tls:// uses the system roots) and curl for the
# HEALTHCHECK. The process runs as an unprivileged user (uid 10001) and needs no writable
# path, so it also runs with a read-only root filesystem (the Helm chart does that).

ARG RUST_VERSION=1
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# The whole (filtered, see .dockerignore) source tree: Cargo.toml declares the library, the
# binary, tests/ and benches/ targets; cargo reads every declared target when it loads the
# manifest, so copying only src/ would break the build as soon as a [[bench]] or [[test]]
# entry names a file. Only the lib and the binary are compiled.
COPY . .
# The cache mounts keep the registry and target dir between builds (BuildKit). The binary
# is copied out of the cached target dir, which is not part of the image layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin lorabroker \
 && install -D -m 0755 target/release/lorabroker /out/lorabroker

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 lorabroker \
 && useradd --system --uid 10001 --gid lorabroker --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin lorabroker
COPY --from=build /out/lorabroker /usr/local/bin/lorabroker
# Without --config the node reads config/lorabroker.toml relative to its working directory:
# the documented defaults. Mount your own file over it, or pass --config FILE.
WORKDIR /app
COPY config/lorabroker.toml /app/config/lorabroker.toml
USER 10001:10001
# 1883 MQTT, 8883 MQTT over TLS, 8083 MQTT over WebSocket, 8084 MQTT over WebSocket over
# TLS (each listening when configured: [mqtt.tls], [mqtt.ws], [mqtt.wss]), 8080 HTTP
# (/healthz /readyz /metrics).
EXPOSE 1883 8883 8083 8084 8080
# /healthz answers 200 while the process is alive (also while it drains); readiness
# (/readyz) is the load balancer's business, not the container runtime's. Assumes the
# default http.listen port 8080.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["curl", "--fail", "--silent", "--show-error", "--max-time", "2", "-o", "/dev/null", "http://127.0.0.1:8080/healthz"]
# SIGTERM starts the drain (readiness false, listener closed, clients disconnected over
# shutdown.grace_period); give `docker stop` at least grace_period + 5s (-t 35).
STOPSIGNAL SIGTERM
ENTRYPOINT ["lorabroker"]
CMD ["serve"]
