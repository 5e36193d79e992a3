#!/usr/bin/env bash
# Builds the image's binaries, fully static with glibc, and copies them to OUT_DIR at once (the
# next cargo build in the same target dir relinks them without these flags). The Dockerfile,
# scripts/image-check.sh and scripts/footprint.sh all build through here.
#
#   scripts/build-static.sh OUT_DIR [BIN...]      (default: node-local-cache csi-client)
#
# The flags go to the final link only (cargo rustc), never through RUSTFLAGS, which would
# rebuild the gRPC C core with them.
#   +crt-static              no dynamic loader, no shared libraries in the image.
#   relocation-model=static  a plain static executable, not static-pie: no relocations to apply
#                            at start (0.4 MB of the file and 0.4 MiB of resident memory per
#                            node), at the cost of a fixed address for the binary's own code and
#                            data (the heap, stacks and mappings stay randomised) — as the Go
#                            sidecars in the same pod are built. docs/performance.md has the
#                            figures.
set -euo pipefail
out=${1:?usage: build-static.sh OUT_DIR [BIN...]}
shift
bins=("$@")
[ "${#bins[@]}" -gt 0 ] || bins=(node-local-cache csi-client)
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
mkdir -p "$out"
for bin in "${bins[@]}"; do
    cargo rustc --release --locked --bin "$bin" -- -C target-feature=+crt-static -C relocation-model=static
    cp "$target_dir/release/$bin" "$out/"
done
