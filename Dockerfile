# syntax=docker/dockerfile:1
# The driver image: two static binaries on an empty filesystem.
#   docker build -t node-local-cache:0.1.0 .
# scripts/image-check.sh builds the same binaries the same way and runs them in a chroot that
# holds exactly what this image holds, for machines where Docker cannot run.

FROM rust:1.95-bookworm AS builder
# cmake builds grpcio's C core; nothing else native is needed (no protoc, no TLS library).
# Not pinned to a Debian revision: bookworm's cmake only changes for fixes, and a pinned revision
# would fail the build as soon as a point release replaces it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Fully static with glibc, linked as scripts/build-static.sh explains. The cache mounts keep the
# gRPC C core between builds; the binaries are copied out before the cache is unmounted.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    bash scripts/build-static.sh /out node-local-cache csi-client

FROM scratch
LABEL org.opencontainers.image.title="node-local-cache" \
      org.opencontainers.image.description="CSI driver for per-node cache volumes with no topology" \
      org.opencontainers.image.licenses="Apache-2.0"
# csi-client is for `kubectl exec ... -- /csi-client Probe`: there is no shell or other tool here.
COPY --from=builder /out/node-local-cache /out/csi-client /
# No USER: the node plugin must run as root to mount; the manifests set a non-root user for
# the controller, which needs no host access.
ENTRYPOINT ["/node-local-cache"]
