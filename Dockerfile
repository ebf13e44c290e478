# syntax=docker/dockerfile:1
#
# One image with every infermesh binary: infermesh-control-plane,
# infermesh-edge, infermesh-sidecar and infermesh-certs, in /usr/local/bin.
# The Helm chart runs each component (and the injected sidecar) from it by
# setting the container's command.
#
#   docker build -t registry.example.com/infermesh/infermesh:0.1.0 .
#   docker run --rm registry.example.com/infermesh/infermesh:0.1.0 infermesh-certs --help

FROM rust:1.95-bookworm AS build
# protoc: code generation of infermesh-proto and etcd-client.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The registry and target directory are build caches, not image layers, so
# the binaries are copied out of target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && for bin in infermesh-control-plane infermesh-edge infermesh-sidecar infermesh-certs; do \
      install -m 0755 "target/release/$bin" "/out/$bin"; \
    done

FROM debian:bookworm-slim
# CA certificates for TLS to etcd, OTLP collectors and other services that
# present publicly issued certificates.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
LABEL org.opencontainers.image.title="infermesh" \
      org.opencontainers.image.description="infermesh control plane, edge gateway, sidecar and infermesh-certs" \
      org.opencontainers.image.licenses="Apache-2.0"
# 65532: the conventional "nonroot" user; the chart runs as it too, with a
# read-only root filesystem (the binaries write no files).
USER 65532:65532
CMD ["infermesh-control-plane", "--help"]
