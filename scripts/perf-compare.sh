#!/usr/bin/env bash
# Interleaved A/B runs of two node plugin binaries under the same csi-bench load, so both see the
# same machine state. Prints one line per run: throughput, cycle p50, the plugin's CPU time per
# cycle (utime+stime from /proc/PID/stat over the run) and its resident memory idle (after
# start-up) and at its peak (VmHWM); at the end, each round's ratios and their medians. Needs root
# (bind mounts) and jq.
#
#   scripts/perf-compare.sh BASE_BINARY NEW_BINARY [ROUNDS] [CYCLES] [CONCURRENCY]
#
# csi-bench is taken from CSI_BENCH, else from beside NEW_BINARY. With TREE_FS=tmpfs the base
# dir and the targets are on a tmpfs: the disk's own cost of making and removing the target dirs
# (large and varying on ext4) then stays out of the comparison of the two plugins.
# Each start first drops the binary from the page cache: how much of the binary a process maps
# depends on the size of the page cache's folios, and those depend on how the file got there
# (written by the linker or cp, or read in on an earlier start). Read in afresh by every start,
# the same binary shows the same idle RSS (±0.1 MiB instead of ±0.3).
set -euo pipefail

base=${1:?usage: perf-compare.sh BASE_BINARY NEW_BINARY [ROUNDS] [CYCLES] [CONCURRENCY]}
new=${2:?usage: perf-compare.sh BASE_BINARY NEW_BINARY [ROUNDS] [CYCLES] [CONCURRENCY]}
rounds=${3:-3}
cycles=${4:-2000}
concurrency=${5:-16}
bench=${CSI_BENCH:-$(dirname "$new")/csi-bench}
ticks=$(getconf CLK_TCK)

tree=""
pid=""
results=$(mktemp)
cleanup() {
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
    if [ -n "$tree" ]; then
        awk -v root="$tree/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo |
            sort -r | while read -r m; do umount -l "$m" || true; done
        if [ "${TREE_FS:-}" = tmpfs ]; then umount -l "$tree" || true; fi
        rm -rf "$tree"
    fi
}
trap 'cleanup; rm -f "$results"' EXIT

# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# A field of /proc/PID/status in KiB.
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

run_one() {
    local label=$1 bin=$2
    tree=$(mktemp -d /tmp/nlc-perf.XXXXXX)
    if [ "${TREE_FS:-}" = tmpfs ]; then mount -t tmpfs -o mode=0755 nlc-perf "$tree"; fi
    mkdir -p "$tree/kubelet/pods" "$tree/base"
    dd if="$bin" iflag=nocache count=0 status=none
    "$bin" --mode=node --node-name=perf --base-dir="$tree/base" --kubelet-dir="$tree/kubelet" \
        --csi-socket="unix://$tree/csi.sock" --metrics-addr= --log-level=warn 2>"$tree/log" &
    pid=$!
    "$bench" --node-socket "$tree/csi.sock" --probe --timeout 30s >/dev/null
    sleep 1
    local idle cpu0 cpu1 hwm
    idle=$(status_kib "$pid" VmRSS)
    cpu0=$(cpu_ticks "$pid")
    "$bench" --node-socket "$tree/csi.sock" --target-root "$tree/kubelet/pods" --no-floor \
        --cycles "$cycles" --concurrency "$concurrency" --json --fail-on-error >"$tree/out.json"
    cpu1=$(cpu_ticks "$pid")
    hwm=$(status_kib "$pid" VmHWM)
    jq -r --arg name "$label" --argjson cpu "$((cpu1 - cpu0))" --argjson ticks "$ticks" \
        --argjson idle "$idle" --argjson hwm "$hwm" --argjson cycles "$cycles" \
        '"\($name)\tcycles/s \(.driver.throughput_per_s | floor)\tcycle p50 \(.driver.cycle.p50_ms) ms\tcpu/cycle \(($cpu / $ticks * 1e6 / $cycles) | floor) us\tidle RSS \($idle / 1024 * 10 | floor / 10) MiB\tpeak RSS \($hwm / 1024 * 10 | floor / 10) MiB"' \
        "$tree/out.json" | tee -a "$results"
    cleanup
    tree=""
    pid=""
}

# Per round, new against base, and the median over the rounds: the machine's speed moves from
# round to round by more than most changes, so the medians are what to compare.
summary() {
    awk -F'\t' '
        function median(a, n,    i, j, t) {
            for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        {
            split($2, tp, " "); split($3, p50, " "); split($4, cpu, " ")
            if ($1 == "base") { btp = tp[2]; bp50 = p50[3]; bcpu = cpu[2]; next }
            n++; t[n] = tp[2] / btp; l[n] = p50[3] / bp50; c[n] = 100 * (cpu[2] / bcpu - 1)
            ts = ts sprintf(" %.2f", t[n]); ls = ls sprintf(" %.2f", l[n]); cs = cs sprintf(" %.0f", c[n])
        }
        END {
            if (n == 0) exit
            printf "new against base, per round:\n"
            printf "  throughput:%s (median %.2f)\n", ts, median(t, n)
            printf "  cycle p50:%s (median %.2f)\n", ls, median(l, n)
            printf "  CPU per cycle, %%:%s (median %.1f)\n", cs, median(c, n)
        }' "$1"
}

echo "csi-bench: $cycles cycles at concurrency $concurrency, $rounds interleaved rounds, tree on ${TREE_FS:-the filesystem of /tmp}"
for ((r = 1; r <= rounds; r++)); do
    run_one base "$base"
    run_one new "$new"
done
summary "$results"
