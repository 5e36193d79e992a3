#!/usr/bin/env bash
# Soak test: CYCLES publish/unpublish cycles (default 100000) at concurrency 32 against the real
# node plugin, driven by csi-bench in chunks of 10,000. Between chunks it samples the plugin's
# resident memory (VmRSS) and open file descriptors; at the end it checks
#   - RSS grew less than 10 % from the sample after the first chunk to the last,
#   - open fds grew by at most FD_SLACK from the start,
#   - no call failed and no mount is left.
# During the second chunk the node also carries NOISE_MOUNTS bind mounts that are not the
# plugin's (a busy node has thousands: every pod brings several), so the memory check covers a
# mount table that grows and shrinks again.
# The plugin runs in a temporary tree (its own kubelet and base dirs, no metrics port), is stopped
# with SIGTERM and everything is unmounted and removed on exit. Needs root (it bind-mounts).
#
#   scripts/soak.sh [CYCLES]      e.g. scripts/soak.sh 2000 for a quick run
#
# Environment: SOAK_CONCURRENCY (32), SOAK_CHUNK (10000), SOAK_NOISE_MOUNTS (2000),
# CARGO_TARGET_DIR (target), and
# SOAK_PLUGIN_ENV: VAR=value words for the plugin's environment (e.g. MALLOC_ARENA_MAX=2, to tell
# the allocator's per-thread arenas apart from a leak).
set -euo pipefail

cycles="${1:-100000}"
concurrency="${SOAK_CONCURRENCY:-32}"
chunk="${SOAK_CHUNK:-10000}"
max_rss_growth_pct=10
fd_slack=4
noise_mounts="${SOAK_NOISE_MOUNTS:-2000}"

case "$cycles" in
'' | *[!0-9]*)
    echo "usage: $0 [CYCLES]" >&2
    exit 2
    ;;
esac
if [ "$cycles" -lt 2 ]; then
    echo "soak: CYCLES must be at least 2" >&2
    exit 2
fi
# At least two chunks, so there is a baseline after warm-up and a later sample to compare.
if [ "$chunk" -gt $((cycles / 2)) ]; then
    chunk=$((cycles / 2))
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
echo "== building the plugin and csi-bench (release)"
cargo build --release --quiet --bin node-local-cache --bin csi-bench
bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"

work="$(realpath "$(mktemp -d /tmp/nlc-soak.XXXXXX)")"
plugin_pid=""

cleanup() {
    local status=$?
    trap - EXIT
    if [ -n "$plugin_pid" ] && kill -0 "$plugin_pid" 2>/dev/null; then
        kill -TERM "$plugin_pid" 2>/dev/null || true
        wait "$plugin_pid" 2>/dev/null || true
    fi
    # Anything still mounted in the tree, deepest first, so the tree can go.
    mounts_in "$work" | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Mount points below a dir, from mountinfo (field 5; spaces are escaped there, none are ours).
mounts_in() {
    awk -v dir="$1/" 'index($5, dir) == 1 { print $5 }' /proc/self/mountinfo
}

# Other mounts on the node: binds of one dir inside a tmpfs of their own, all gone with it.
add_noise() {
    mkdir -p "$work/noise"
    mount -t tmpfs -o size=1m,mode=0700 noise "$work/noise"
    mkdir "$work/noise/src"
    for i in $(seq 1 "$noise_mounts"); do
        mkdir "$work/noise/m$i"
        mount --bind "$work/noise/src" "$work/noise/m$i"
    done
}

remove_noise() {
    umount -l "$work/noise"
}

rss_kib() {
    awk '/^VmRSS:/ { print $2 }' "/proc/$plugin_pid/status"
}

# Anonymous and file-backed parts of the RSS: code pages first touched late in a run show up in
# the second, memory the plugin allocates in the first.
rss_split() {
    awk '/^RssAnon:/ { a = $2 } /^RssFile:/ { f = $2 } END { print a "/" f }' "/proc/$plugin_pid/status"
}

open_fds() {
    find "/proc/$plugin_pid/fd" -mindepth 1 -maxdepth 1 | wc -l
}

mkdir -p "$work/kubelet/pods/soak" "$work/base"
socket="$work/csi.sock"
read -r -a plugin_env <<<"${SOAK_PLUGIN_ENV:-}"
env "${plugin_env[@]}" "$bin_dir/node-local-cache" \
    --mode=node \
    --node-name=soak \
    --kubelet-dir="$work/kubelet" \
    --base-dir="$work/base" \
    --csi-socket="unix://$socket" \
    --metrics-addr= \
    --log-level=warn \
    2>"$work/plugin.log" &
plugin_pid=$!
"$bin_dir/csi-bench" --probe --node-socket="$socket" --timeout=30s >/dev/null

# One volume for the whole soak: its dir stays, every target comes and goes.
volume="nlc-$(cat /proc/sys/kernel/random/uuid)"
fds_start="$(open_fds)"
rss_start="$(rss_kib)"
printf '%-10s %-10s %-14s %-8s %-12s %s\n' cycles rss_kib anon/file_kib fds cycles_per_s failed_calls
printf '%-10s %-10s %-14s %-8s %-12s %s\n' 0 "$rss_start" "$(rss_split)" "$fds_start" - -

done_cycles=0
rss_base=""
failed_total=0
started=$SECONDS
while [ "$done_cycles" -lt "$cycles" ]; do
    n=$((cycles - done_cycles))
    if [ "$n" -gt "$chunk" ]; then
        n=$chunk
    fi
    out="$work/chunk-$done_cycles.json"
    noisy=""
    if [ -n "$rss_base" ] && [ "$done_cycles" -eq "$chunk" ] && [ "$noise_mounts" -gt 0 ]; then
        add_noise
        noisy=" (+$noise_mounts other mounts)"
    fi
    # Failures are counted from the JSON below; a mount left behind makes csi-bench exit 1.
    if ! "$bin_dir/csi-bench" \
        --node-socket="$socket" \
        --target-root="$work/kubelet/pods/soak" \
        --volume-id="$volume" \
        --cycles="$n" \
        --concurrency="$concurrency" \
        --no-floor \
        --json >"$out"; then
        echo "soak: csi-bench failed after $done_cycles cycles (mounts left?):" >&2
        cat "$out" >&2
        exit 1
    fi
    if [ -n "$noisy" ]; then
        remove_noise
    fi
    done_cycles=$((done_cycles + n))
    failed=$(jq '[.driver.errors[]?.count, .round_trip.errors[]?.count] | add // 0' "$out")
    failed_total=$((failed_total + failed))
    if [ "$failed" -ne 0 ]; then
        jq -c '{driver: .driver.errors, round_trip: .round_trip.errors}' "$out" >&2
    fi
    rss="$(rss_kib)"
    if [ -z "$rss_base" ]; then
        rss_base=$rss
    fi
    printf '%-10s %-10s %-14s %-8s %-12s %s\n' "$done_cycles" "$rss" "$(rss_split)" "$(open_fds)" \
        "$(jq '.driver.throughput_per_s' "$out")" "$failed$noisy"
done
elapsed=$((SECONDS - started))

rss_end="$(rss_kib)"
fds_end="$(open_fds)"
left="$(mounts_in "$work" | wc -l)"
growth_pct=$(awk -v a="$rss_base" -v b="$rss_end" 'BEGIN { printf "%.1f", (b - a) * 100 / a }')

kill -TERM "$plugin_pid"
wait "$plugin_pid" || {
    echo "soak: the plugin exited with status $? on SIGTERM" >&2
    exit 1
}
plugin_pid=""

echo
echo "soak: $done_cycles cycles at concurrency $concurrency in ${elapsed}s${SOAK_PLUGIN_ENV:+ (plugin env: $SOAK_PLUGIN_ENV)}"
echo "  RSS after the first chunk ${rss_base} KiB, at the end ${rss_end} KiB: ${growth_pct} % (limit ${max_rss_growth_pct} %)"
echo "  open fds at the start ${fds_start}, at the end ${fds_end} (limit +${fd_slack})"
echo "  failed calls ${failed_total}, mounts left ${left}"

verdict=0
if awk -v g="$growth_pct" -v l="$max_rss_growth_pct" 'BEGIN { exit !(g >= l) }'; then
    echo "FAIL: RSS grew ${growth_pct} %" >&2
    verdict=1
fi
if [ "$fds_end" -gt $((fds_start + fd_slack)) ]; then
    echo "FAIL: open fds grew from ${fds_start} to ${fds_end}" >&2
    verdict=1
fi
if [ "$failed_total" -ne 0 ]; then
    echo "FAIL: ${failed_total} calls failed (errors printed above)" >&2
    verdict=1
fi
if [ "$left" -ne 0 ]; then
    echo "FAIL: ${left} mounts left" >&2
    verdict=1
fi
if [ "$verdict" -ne 0 ]; then
    exit 1
fi
echo "soak: OK"
