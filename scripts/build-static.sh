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
#   symbol ordering          node-local-cache only, where rustc links with its own lld (x86_64
#                            Linux): the functions in scripts/code-order.txt (what a node runs,
#                            made by scripts/code-order.sh) go first and together, so the code a
#                            node never runs is never mapped: 1.6-1.7 MiB less resident memory.
#                            NLC_CODE_ORDER_REPORT=FILE writes "found listed" there (how many of
#                            the listed functions the binary still has), or "unordered".
# NLC_KEEP_SYMBOLS=1 keeps the symbols (scripts/code-order.sh reads them).
set -euo pipefail
out=${1:?usage: build-static.sh OUT_DIR [BIN...]}
shift
bins=("$@")
[ "${#bins[@]}" -gt 0 ] || bins=(node-local-cache csi-client)
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}
order=scripts/code-order.txt
mkdir -p "$out"
for bin in "${bins[@]}"; do
    flags=(-C target-feature=+crt-static -C relocation-model=static)
    [ "${NLC_KEEP_SYMBOLS:-}" = 1 ] && flags+=(-C strip=none)
    ordered=0
    if [ "$bin" = node-local-cache ] && [ "$(uname -m)" = x86_64 ] && [ -s "$order" ]; then
        flags+=(-C "link-arg=-Wl,--symbol-ordering-file=$PWD/$order" -W linker-messages)
        ordered=1
    fi
    report=""
    if [ -n "${NLC_CODE_ORDER_REPORT:-}" ] && [ "$bin" = node-local-cache ]; then
        if [ "$ordered" = 1 ]; then
            report=$NLC_CODE_ORDER_REPORT
            # The linker names each listed function it cannot find, but only when it runs: drop
            # the binary's fingerprint so cargo links it again.
            rm -f "$target_dir"/release/.fingerprint/node-local-cache-*/bin-node-local-cache
        else
            echo "unordered" >"$NLC_CODE_ORDER_REPORT"
        fi
    fi
    log=$(mktemp)
    # cargo's stderr to the terminal and the log (stdout stays stdout); pipefail keeps its status.
    if ! { cargo rustc --release --locked --bin "$bin" -- "${flags[@]}" 2>&1 1>&3 | tee "$log" >&2; } 3>&1; then
        rm -f "$log"
        exit 1
    fi
    if [ -n "$report" ]; then
        listed=$(grep -c . "$order")
        missing=$(grep -c 'symbol ordering file: no such symbol' "$log" || true)
        echo "$((listed - missing)) $listed" >"$report"
    fi
    rm -f "$log"
    cp "$target_dir/release/$bin" "$out/"
done
