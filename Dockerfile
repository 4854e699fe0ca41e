# syntax=docker/dockerfile:1
# pgshift's image: built in a Rust image, run from a slim Debian one. docker-compose.yml
# builds it (`docker compose up --build`); tests/compose.rs checks this file against the repo.

FROM rust:1-bookworm AS builder
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin pgshift \
    && cp target/release/pgshift /usr/local/bin/pgshift

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/pgshift --shell /usr/sbin/nologin pgshift \
    && mkdir -p /etc/pgshift /run/pgshift /var/lib/pgshift \
    && chown pgshift:pgshift /run/pgshift /var/lib/pgshift
COPY --from=builder /usr/local/bin/pgshift /usr/local/bin/pgshift
# The config comes from a mount at /etc/pgshift/pgshift.toml (docker-compose.yml mounts
# config/compose.toml there).
USER pgshift
# Client connections (PostgreSQL protocol) and /metrics + /healthz.
EXPOSE 7432 9930
ENTRYPOINT ["/usr/local/bin/pgshift"]
CMD ["run", "--config", "/etc/pgshift/pgshift.toml"]
