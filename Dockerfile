# syntax=docker/dockerfile:1
# Multi-stage: build with the Rust toolchain, run on a small distroless base as a
# non-root user. Configuration comes from the environment (JELOU_WORKER__*).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked --bin jelou-worker || true
COPY src ./src
COPY config ./config
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin jelou-worker

FROM gcr.io/distroless/cc-debian12:nonroot
WORKDIR /app
COPY --from=build /src/target/release/jelou-worker /usr/local/bin/jelou-worker
COPY --from=build /src/config/default.toml /app/config/default.toml
# Metrics and health (server.listen must be set to 0.0.0.0:9464 to reach them).
EXPOSE 9464
USER nonroot:nonroot
ENTRYPOINT ["/usr/local/bin/jelou-worker"]
CMD ["run"]
