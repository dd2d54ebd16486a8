# Multi-stage build: a Rust + Node builder, then a small Debian runtime with one binary.
#   docker build -t switchboard .
#   docker run -p 8000:8000 -v sbdata:/data switchboard
# The web app (web/) is built by crates/server/build.rs with npm and embedded in the binary.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends nodejs npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p switchboard \
 && strip target/release/switchboard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data switchboard \
 && mkdir -p /data && chown switchboard /data
COPY --from=build /src/target/release/switchboard /usr/local/bin/switchboard
USER switchboard
WORKDIR /data
ENV SWITCHBOARD_LISTEN=0.0.0.0:8000 \
    SWITCHBOARD_DATA_DIR=/data
EXPOSE 8000
VOLUME ["/data"]
HEALTHCHECK --interval=10s --timeout=3s CMD ["/bin/sh", "-c", "exec 3<>/dev/tcp/127.0.0.1/8000"]
ENTRYPOINT ["switchboard"]
CMD ["serve"]
