#!/usr/bin/env bash
# The node plugin's footprint next to the project's goals, as one table:
#   - resident memory (VmRSS from /proc) idle, after start and a ready Probe;
#   - resident memory under csi-bench load (VmRSS sampled every 10 ms, and VmHWM after);
#   - time from exec to the first ready Probe (median of STARTS starts);
#   - the stripped release binary's size, and the unique runtime crates in `cargo tree`;
#   - publish+unpublish p50 against the syscall floor (csi-bench, same run as the load);
#   - NodeGetVolumeStats when cached and deletion against rm -rf (cargo bench --bench fs).
#
#   scripts/footprint.sh                 all of it, on the image's binary (static, built as the
#                                        Dockerfile builds it); the fs bench takes a few minutes
#   scripts/footprint.sh --dynamic       on target/release/node-local-cache as cargo build makes it
#   scripts/footprint.sh --no-fs-bench   skip the fs bench (its rows say "not run")
#   scripts/footprint.sh --no-build      use the binaries already in target/release
#   scripts/footprint.sh --plugin PATH   measure another build of the plugin (implies --no-build)
#   CYCLES=2000 CONCURRENCY=16 STARTS=5 NLC_BENCH_FILES=100000 scripts/footprint.sh
#
# The plugin runs as in production (default log level, metrics on, here on 127.0.0.1:0) in a
# temporary tree. Readiness is timed by `csi-bench --probe -- <plugin>`, which starts the plugin
# itself and polls Probe every 0.1 ms, so the figure is exec to ready with no shell or client
# start-up in it. The fs bench deletes on a tmpfs only (NLC_BENCH_DELETE=tmpfs) unless told
# otherwise: see benches/fs.rs. Needs root (bind mounts) and jq; honours CARGO_TARGET_DIR.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
plugin="$target_dir/release/node-local-cache"
bench="$target_dir/release/csi-bench"
cycles="${CYCLES:-2000}"
concurrency="${CONCURRENCY:-16}"
starts="${STARTS:-5}"
files="${NLC_BENCH_FILES:-100000}"
fs_bench=1
build=1
static=1

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
    case "$1" in
    --no-fs-bench) fs_bench=0 ;;
    --no-build) build=0 ;;
    --dynamic) static=0 ;;
    --plugin)
        plugin="$2"
        build=0
        shift
        ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "footprint.sh: unknown argument $1" >&2
        usage >&2
        exit 2
        ;;
    esac
    shift
done

if [ "$(id -u)" -ne 0 ]; then
    echo "footprint.sh: must run as root (bind mounts, dropping caches)" >&2
    exit 2
fi
command -v jq >/dev/null || {
    echo "footprint.sh: needs jq" >&2
    exit 2
}
tree="$(mktemp -d /tmp/nlc-footprint.XXXXXX)"
pid=""

# The plugin is csi-bench's child, not ours: stop it by pid and poll until it is gone.
stop_plugin() {
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 200); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    pid=""
}

cleanup() {
    stop_plugin
    awk -v root="$tree/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf "$tree"
}
trap cleanup EXIT

if [ "$build" -eq 1 ]; then
    cargo build --release --bins
    if [ "$static" -eq 1 ]; then
        # As the Dockerfile does.
        bash scripts/build-static.sh "$tree" node-local-cache
        plugin="$tree/node-local-cache"
    fi
fi
kind="$(if file -b "$plugin" | grep -q 'static'; then echo static; else echo dynamic; fi)"

# A field of /proc/<pid>/status in kB, read without forking so sampling stays cheap.
status_kb() {
    local key val rest
    while read -r key val rest; do
        if [ "$key" = "$2:" ]; then
            echo "$val"
            return 0
        fi
    done <"/proc/$1/status"
    echo 0
}

mib() { awk -v kb="$1" 'BEGIN { printf "%.1f", kb / 1024 }'; }
# 1 when "$1 <= $2" numerically.
within() { awk -v a="$1" -v b="$2" 'BEGIN { print (a <= b) ? 1 : 0 }'; }
verdict() { if [ "$1" = 1 ]; then echo met; else echo MISSED; fi; }

mkdir -p "$tree/kubelet/pods" "$tree/base"
plugin_args=(
    --mode=node --node-name=footprint
    --base-dir="$tree/base" --kubelet-dir="$tree/kubelet"
    --csi-socket="unix://$tree/csi.sock" --metrics-addr=127.0.0.1:0
)

echo "== machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)," \
    "kernel $(uname -r), /tmp on $(findmnt -n -o FSTYPE -T /tmp), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== plugin: $plugin ($kind)"

echo "== readiness: $starts starts"
ready=()
for i in $(seq "$starts"); do
    "$bench" --node-socket "$tree/csi.sock" --probe --json --timeout 10s -- "$plugin" "${plugin_args[@]}" \
        2>>"$tree/plugin.log" >"$tree/ready.json"
    pid="$(jq -r .pid "$tree/ready.json")"
    ready+=("$(jq -r .ready_ms "$tree/ready.json")")
    echo "start $i: ready after ${ready[-1]} ms"
    [ "$i" -eq "$starts" ] || stop_plugin
done
ready_median="$(printf '%s\n' "${ready[@]}" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }')"

sleep 1
idle_rss="$(status_kb "$pid" VmRSS)"
idle_anon="$(status_kb "$pid" RssAnon)"
echo "== idle: VmRSS $idle_rss kB (RssAnon $idle_anon kB, RssFile $(status_kb "$pid" RssFile) kB)," \
    "VmHWM $(status_kb "$pid" VmHWM) kB"

echo "== load: csi-bench $cycles cycles, $concurrency workers"
"$bench" --node-socket "$tree/csi.sock" --target-root "$tree/kubelet/pods" \
    --cycles "$cycles" --concurrency "$concurrency" --json >"$tree/load.json" &
bench_pid=$!
load_rss=0
while kill -0 "$bench_pid" 2>/dev/null; do
    rss="$(status_kb "$pid" VmRSS)"
    [ "$rss" -le "$load_rss" ] || load_rss="$rss"
    sleep 0.01
done
bench_status=0
wait "$bench_pid" || bench_status=$?
load_hwm="$(status_kb "$pid" VmHWM)"
echo "== load: max sampled VmRSS $load_rss kB, VmHWM $load_hwm kB, csi-bench exit $bench_status"
jq -c '{cycle: .driver.cycle, floor: .floor.cycle, ratio: .cycle_p50_vs_floor,
        throughput: .driver.throughput_per_s, errors: .driver.errors, mounts_left}' "$tree/load.json"
ratio="$(jq -r '.cycle_p50_vs_floor // "n/a"' "$tree/load.json")"
stop_plugin

strip -o "$tree/stripped" "$plugin"
size_bytes="$(stat -c %s "$tree/stripped")"
size_mb="$(awk -v b="$size_bytes" 'BEGIN { printf "%.2f", b / 1e6 }')"

cargo tree -e normal --prefix none | sed 's/ (\*)$//' | sort -u | grep -v '^node-local-cache ' >"$tree/crates"
crates="$(wc -l <"$tree/crates")"
macro_only="$(grep -c '(proc-macro)$' "$tree/crates" || true)"

stats="not run"
delete="not run"
stats_met=""
delete_met=""
delete_where=""
if [ "$fs_bench" -eq 1 ]; then
    echo "== fs bench (cargo bench --bench fs, $files files)"
    NLC_BENCH_JSON="$tree/fs.json" NLC_BENCH_DELETE="${NLC_BENCH_DELETE:-tmpfs}" cargo bench --bench fs
    stats_p99="$(jq -r .stats_cached_p99_ms "$tree/fs.json")"
    stats="$stats_p99 ms p99"
    stats_met="$(within "$stats_p99" 5)"
    delete_where="$(jq -r '.delete | if has("tmpfs") then "tmpfs" else keys[0] end' "$tree/fs.json")"
    delete_ratio="$(jq -r ".delete.$delete_where.ratio_best" "$tree/fs.json")"
    delete="${delete_ratio}x"
    delete_met="$(within "$delete_ratio" 1.1)"
fi

row() { printf '%-44s %-22s %-12s %s\n' "$@"; }
echo
row "figure" "measured" "goal" ""
row "idle RSS (VmRSS after start + Probe)" "$(mib "$idle_rss") MiB ($(mib "$idle_anon") anon)" "<= 6 MiB" "$(verdict "$(within "$idle_rss" 6144)")"
row "RSS under load (max of VmRSS, VmHWM)" "$(mib "$((load_rss > load_hwm ? load_rss : load_hwm))") MiB" "<= 12 MiB" \
    "$(verdict "$(within "$((load_rss > load_hwm ? load_rss : load_hwm))" 12288)")"
row "exec to ready Probe (median of $starts)" "$ready_median ms" "<= 50 ms" "$(verdict "$(within "$ready_median" 50)")"
row "stripped $kind binary (MB = 10^6 B)" "$size_mb MB" "<= 5.2 MB" "$(verdict "$(within "$size_mb" 5.2)")"
row "unique runtime crates (cargo tree -e normal)" "$crates ($macro_only proc-macro)" "<= 64" "$(verdict "$(within "$crates" 64)")"
row "publish+unpublish p50 / syscall floor p50" "${ratio}x" "<= 2x" \
    "$(if [ "$ratio" = n/a ]; then echo "n/a"; else verdict "$(within "$ratio" 2)"; fi)"
row "NodeGetVolumeStats, $files files, cached" "$stats" "<= 5 ms" "${stats_met:+$(verdict "$stats_met")}"
row "delete $files files / rm -rf (${delete_where:-tmpfs}, best)" "$delete" "<= 1.1x" "${delete_met:+$(verdict "$delete_met")}"
if [ "$bench_status" -ne 0 ]; then
    echo "footprint.sh: csi-bench failed (exit $bench_status); see the load line above" >&2
    exit 1
fi
