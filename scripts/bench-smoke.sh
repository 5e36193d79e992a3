#!/usr/bin/env bash
# A few seconds of csi-bench against the node plugin, for CI: starts target/release/node-local-cache
# in node mode in a temporary tree (kubelet dir and base dir inside it), waits for a ready Probe,
# runs publish/unpublish cycles from several workers with --fail-on-error, stops the plugin with
# SIGTERM and checks that it exits cleanly. Fails on any failed call, any mount left behind or an
# unclean stop; everything it made is unmounted and removed on exit, whatever happened.
#
#   scripts/bench-smoke.sh                 200 cycles, 8 workers
#   CYCLES=1000 CONCURRENCY=16 scripts/bench-smoke.sh
#
# Runs as root (bind mounts) after `cargo build --release`; honours CARGO_TARGET_DIR.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
plugin="$target_dir/release/node-local-cache"
bench="$target_dir/release/csi-bench"
cycles="${CYCLES:-200}"
concurrency="${CONCURRENCY:-8}"

if [ "$(id -u)" -ne 0 ]; then
    echo "bench-smoke: must run as root (bind mounts)" >&2
    exit 2
fi
for bin in "$plugin" "$bench"; do
    if [ ! -x "$bin" ]; then
        echo "bench-smoke: $bin is missing; run cargo build --release first" >&2
        exit 2
    fi
done

tree="$(mktemp -d /tmp/nlc-bench-smoke.XXXXXX)"
pid=""

cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    # Whatever a failed run left mounted in the tree, deepest first, lazily so nothing blocks.
    awk -v root="$tree/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf "$tree"
}
trap cleanup EXIT

mkdir -p "$tree/kubelet/pods" "$tree/base"
"$plugin" --mode=node --node-name=bench-smoke \
    --base-dir="$tree/base" --kubelet-dir="$tree/kubelet" \
    --csi-socket="unix://$tree/csi.sock" --metrics-addr= --log-level=warn \
    2>"$tree/plugin.log" &
pid=$!

status=0
"$bench" --node-socket "$tree/csi.sock" --probe --timeout 30s || status=$?
if [ "$status" -eq 0 ]; then
    "$bench" --node-socket "$tree/csi.sock" --target-root "$tree/kubelet/pods" \
        --cycles "$cycles" --concurrency "$concurrency" --fail-on-error || status=$?
fi

kill -TERM "$pid"
stopped=0
wait "$pid" || stopped=$?
pid=""
if [ "$stopped" -ne 0 ]; then
    echo "bench-smoke: the plugin exited with status $stopped after SIGTERM" >&2
    status=1
fi
if [ "$status" -ne 0 ]; then
    echo "bench-smoke: FAILED; plugin log:" >&2
    cat "$tree/plugin.log" >&2
    exit "$status"
fi
echo "bench-smoke: PASS"
