#!/usr/bin/env bash
# Bounded caches without a cluster: the real binaries (one controller, one node plugin) on a
# 64 MiB tmpfs base dir, played through with csi-client. Three idle cache copies fill the node
# past its --max-cache-bytes budget and the least recently used one is evicted; a copy that grew
# past its PVC's capacity while mounted is reported abnormal and trimmed once the pod lets go.
#
# Run as root (the node plugin bind-mounts): sudo scripts/eviction-demo.sh
# Everything runs in a private mount namespace and a temp dir removed on exit.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

demo_name=eviction-demo
demo_tools=(cargo unshare mountpoint)
# shellcheck source=scripts/demo-lib.sh
source "$repo/scripts/demo-lib.sh"
demo_setup "$@"

# csi-client against one socket, quietly; the reply is left in $last_reply.
csi() {
    last_reply="$("$client" --socket "$work/$1.sock" --timeout 10s "$2" --json "${3:-{\}}")"
}

start() {
    local name=$1
    shift
    env -u KUBERNETES_SERVICE_HOST "$driver" "$@" --csi-socket="unix://$work/$name.sock" \
        --log-level=info >>"$work/$name.log" 2>&1 &
    pids+=("$!")
    "$client" --socket "$work/$name.sock" --timeout 20s --wait Probe >/dev/null
}

mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

# Each copy in the base dir with its size and files.
show_base() {
    for dir in "$work/base"/nlc-*; do
        [ -d "$dir" ] || continue
        local id name
        id="$(basename "$dir")"
        name="${names[$id]:-?}"
        note "$(printf "%-10s %s  %9s  %3d files" "$name" "$id" "$(mib "$(du -sB1 "$dir" | cut -f1)")" \
            "$(find "$dir" -type f | wc -l)")"
    done
}

cap='{"mount":{},"access_mode":{"mode":"MULTI_NODE_MULTI_WRITER"}}'
declare -A ids names contexts

# CreateVolume on the controller with a capacity and an eviction policy; remembers id and context.
create() {
    local pvc=$1 bytes=$2 policy=$3
    csi controller CreateVolume "{\"name\":\"$pvc\",\"capacity_range\":{\"required_bytes\":$bytes},\"parameters\":{\"eviction\":\"$policy\"},\"volume_capabilities\":[$cap]}"
    ids[$pvc]="$(printf '%s\n' "$last_reply" | sed -n 's/^ *"volume_id": "\(nlc-[0-9a-f-]*\)".*/\1/p')"
    names[${ids[$pvc]}]=$pvc
    contexts[$pvc]="{$(printf '%s\n' "$last_reply" | awk '
        /"volume_context": \{/ { inside = 1; next }
        inside && /^ *\}/     { exit }
        inside                { sub(/^ +/, ""); sub(/,$/, ""); printf "%s%s", (n++ ? "," : ""), $0 }')}"
    note "$pvc: $(mib "$bytes"), eviction: $policy -> ${ids[$pvc]}"
}

target_of() { printf '%s/kubelet/pods/pod-%s/volumes/kubernetes.io~csi/%s/mount' "$work" "$1" "$1"; }

publish() {
    local pvc=$1 target
    target="$(target_of "$pvc")"
    mkdir -p "$(dirname "$target")"
    csi node NodePublishVolume "{\"volume_id\":\"${ids[$pvc]}\",\"target_path\":\"$target\",\"volume_capability\":$cap,\"volume_context\":${contexts[$pvc]}}"
}

unpublish() {
    csi node NodeUnpublishVolume "{\"volume_id\":\"${ids[$1]}\",\"target_path\":\"$(target_of "$1")\"}"
}

# A pod writes `count` files of 1 MiB, each `spacing` minutes older than the next.
fill() {
    local pvc=$1 count=$2 target i
    target="$(target_of "$pvc")"
    for ((i = 0; i < count; i++)); do
        head -c 1048576 /dev/zero >"$target/part-$(printf '%02d' "$i")"
        touch -d "-$(((count - i) * 10)) minutes" "$target/part-$(printf '%02d' "$i")"
    done
}

wait_log() {
    local needle=$1 tries=100
    until grep -q -- "$needle" "$work/node.log"; do
        tries=$((tries - 1))
        [ "$tries" -gt 0 ] || { echo "the node never logged: $needle" >&2; return 1; }
        sleep 0.1
    done
}

metrics() {
    local addr port
    addr="$(sed -n 's|.*metrics on http://\([0-9.:]*\)/metrics.*|\1|p' "$work/node.log" | tail -n 1)"
    port="${addr##*:}"
    exec 3<>"/dev/tcp/127.0.0.1/$port"
    printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
    grep -E '^node_local_cache_(copy_bytes|copies_evicted_total|eviction_freed_bytes_total|copies_over_capacity)' <&3 |
        grep -v ' 0$' | sed 's/^/    /'
    exec 3<&-
}

step "A node whose base dir is a 64 MiB filesystem, a controller beside it"
mkdir -p "$work/base" "$work/kubelet/pods"
mount -t tmpfs -o size=64m,mode=0700 tmpfs "$work/base"
start controller --mode=controller --metrics-addr=
node_flags=(--mode=node --node-name=node-a --base-dir="$work/base" --kubelet-dir="$work/kubelet"
    --metrics-addr=127.0.0.1:0 --eviction-interval=1s)
start node "${node_flags[@]}"
note "base dir: $work/base (tmpfs, 64 MiB); a pass every second (--eviction-interval=1s)"

step "CreateVolume for four caches (StorageClass parameter eviction: lru-files | whole-copy | none)"
create pvc-small $((8 << 20)) lru-files
create pvc-oldest $((16 << 20)) lru-files
create pvc-middle $((16 << 20)) whole-copy
create pvc-newest $((16 << 20)) none
note "each capacity and policy reaches the node in the volume context, e.g. pvc-small:"
note "${contexts[pvc-small]}"

step "A pod writes 12 MiB into pvc-small (capacity 8 MiB): never touched while mounted"
publish pvc-small
fill pvc-small 12
sleep 1.5
csi node NodeGetVolumeStats "{\"volume_id\":\"${ids[pvc-small]}\",\"volume_path\":\"$(target_of pvc-small)\"}"
printf '%s\n' "$last_reply" | grep -A3 '"volume_condition"' | sed 's/^/    /'
printf '%s\n' "$last_reply" | grep -q '"abnormal": true' || { echo "not reported abnormal" >&2; exit 1; }
note "files in the pod: $(find "$(target_of pvc-small)" -type f | wc -l)"

step "The pod goes away: the next pass trims pvc-small to 90 % of 8 MiB, oldest files first"
unpublish pvc-small
wait_log "volume ${ids[pvc-small]}: trimmed"
grep "volume ${ids[pvc-small]}: trimmed" "$work/node.log" | sed 's/^/    /'
note "\$ ls $work/base/${ids[pvc-small]}"
note "$(find "$work/base/${ids[pvc-small]}" -type f -printf '%f\n' | sort | tr '\n' ' ')"

step "Pods use three more caches and go away, one after the other: 12 MiB each"
for pvc in pvc-oldest pvc-middle pvc-newest; do
    publish "$pvc"
    fill "$pvc" 12
    unpublish "$pvc"
    note "$pvc: 12 MiB written, pod gone"
    sleep 1.1
done
show_base

step "The node restarts with a budget of 30 MiB (--max-cache-bytes=30Mi)"
stop_all
start node "${node_flags[@]}" --max-cache-bytes=30Mi
note "43 MiB against 30 MiB: down to the low-water mark of 27 MiB, 16 MiB to free. Least recently"
note "used first: pvc-small goes whole (7 MiB), then 9 MiB of pvc-oldest's oldest files."
wait_log "volume ${ids[pvc-oldest]}: trimmed"
grep -E "evicted|volume ${ids[pvc-oldest]}: trimmed" "$work/node.log" | sed 's/^/    /'
show_base
[ ! -e "$work/base/${ids[pvc-small]}" ] || { echo "pvc-small was not evicted" >&2; exit 1; }

step "A pod that uses an evicted cache again starts with an empty one, as on a new node"
publish pvc-small
note "\$ ls $(target_of pvc-small)"
if [ -n "$(ls -A "$(target_of pvc-small)")" ]; then echo "not empty" >&2; exit 1; fi
note "(empty)"
unpublish pvc-small

step "What the node's metrics say"
sleep 1.1
metrics

stop_all
printf '\n%sEviction demo passed.%s\n' "$green" "$off"
