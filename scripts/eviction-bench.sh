#!/usr/bin/env bash
# What trimming a big copy costs the node plugin: the real binary trims one idle copy of N small
# files (default 1,000,000, in 1,000 directories) by about a tenth, on the disk under
# /var/tmp, and the script reports the trim's time (from its log line) and the plugin's
# resident memory before the pass and at its peak during it.
#
#   sudo scripts/eviction-bench.sh [files]
#
# Resident memory is read from /proc/<pid>/status; the peak (VmHWM) is reset just before the pass
# (echo 5 > /proc/<pid>/clear_refs), so it shows what the pass itself needed. Times depend on the
# disk and on whatever else runs: take them as an order of magnitude.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
files="${1:-1000000}"
dirs=1000
per_dir=$((files / dirs))
[ "$per_dir" -ge 1 ] || { echo "eviction-bench.sh: at least $dirs files" >&2; exit 2; }

if [ "$(id -u)" -ne 0 ]; then
    echo "eviction-bench.sh: run as root (the node plugin bind-mounts): sudo $0" >&2
    exit 2
fi
if [ -z "${NLC_BENCH_IN_NAMESPACE:-}" ]; then
    NLC_BENCH_IN_NAMESPACE=1 exec unshare --mount --propagation private "$BASH" "$0" "$@"
fi

(cd "$repo" && cargo build --release --quiet)
bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
driver="$bin_dir/node-local-cache"
client="$bin_dir/csi-client"

work="$(mktemp -d /var/tmp/nlc-eviction-bench.XXXXXX)"
pid=""
cleanup() {
    [ -z "$pid" ] || { kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; } || true
    awk -v root="$work/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo |
        while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/base" "$work/kubelet/pods/pod/volumes/kubernetes.io~csi/pv"
volume=nlc-00000000-0000-5000-8000-000000000001
copy="$work/base/$volume"
mkdir -p "$copy"
echo "making $files files of 1 byte in $dirs directories under $copy ..."
started=$(date +%s)
for ((d = 0; d < dirs; d++)); do
    mkdir "$copy/d$d"
    # split writes one file per byte: $per_dir files in one process.
    (cd "$copy/d$d" && head -c "$per_dir" /dev/zero | split -b 1 -a 6 - f)
done
sync
echo "made in $(($(date +%s) - started))s"
bytes=$(du -sB1 "$copy" | cut -f1)
# 90 % of the capacity is the low-water mark: a capacity of 99 % of the copy trims about 11 %.
capacity=$((bytes * 99 / 100))

start() {
    env -u KUBERNETES_SERVICE_HOST "$driver" --mode=node --node-name=bench --base-dir="$work/base" \
        --kubelet-dir="$work/kubelet" --csi-socket="unix://$work/node.sock" --metrics-addr= \
        --min-free-percent=0 --log-level=debug "$@" >>"$work/node.log" 2>&1 &
    pid=$!
    "$client" --socket "$work/node.sock" --timeout 20s --wait Probe >/dev/null
}

# One publish and unpublish, as a pod would: the node records the capacity and the last use.
start --eviction-interval=1h
target="$work/kubelet/pods/pod/volumes/kubernetes.io~csi/pv/mount"
cap='{"mount":{},"access_mode":{"mode":"MULTI_NODE_MULTI_WRITER"}}'
context="{\"node-local-cache.csi.io/capacity-bytes\":\"$capacity\",\"node-local-cache.csi.io/eviction\":\"lru-files\"}"
"$client" --socket "$work/node.sock" NodePublishVolume \
    --json "{\"volume_id\":\"$volume\",\"target_path\":\"$target\",\"volume_capability\":$cap,\"volume_context\":$context}" >/dev/null
"$client" --socket "$work/node.sock" NodeUnpublishVolume \
    --json "{\"volume_id\":\"$volume\",\"target_path\":\"$target\"}" >/dev/null
kill -TERM "$pid"
wait "$pid" || true

status() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status"; }
start --eviction-interval=3s
echo 5 >"/proc/$pid/clear_refs"
rss_before=$(status VmRSS)
until grep -q "volume $volume: trimmed" "$work/node.log"; do sleep 0.2; done
peak=$(status VmHWM)
rss_after=$(status VmRSS)
until grep -q "eviction pass:" "$work/node.log"; do sleep 0.2; done
line="$(grep "volume $volume: trimmed" "$work/node.log")"
pass="$(grep "eviction pass:" "$work/node.log" | head -n 1)"
left=$(find "$copy" -type f | wc -l)

echo
echo "copy: $files files, $bytes bytes; capacity $capacity bytes"
echo "${line#*eviction: }"
echo "${pass#*eviction: }"
echo "files left: $left"
echo "resident memory: ${rss_before} kB before the pass, ${peak} kB at its peak, ${rss_after} kB after"
