#!/usr/bin/env bash
# node-local-cache without a cluster: builds the driver, starts the real binary as one controller
# and two node plugins (node-a, node-b) on Unix sockets in a temp dir, and walks a volume through
# its life with csi-client, playing kubelet's and csi-provisioner's parts.
#
# Run as root (the node plugins bind-mount): sudo scripts/demo.sh
# Everything runs in a private mount namespace, so no mount can outlive the demo, and the temp
# dir is removed on exit, whether the demo passed or failed.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

demo_name=demo
demo_tools=(cargo cmake unshare mountpoint)
# shellcheck source=scripts/demo-lib.sh
source "$repo/scripts/demo-lib.sh"
demo_setup "$@"

# csi-client against one socket; echoes the command so each step can be repeated by hand.
csi() {
    local socket=$1 method=$2
    shift 2
    local shown="csi-client --socket $socket $method"
    if [ $# -gt 0 ]; then shown+=" --json '$1'"; fi
    printf '    $ %s\n' "$shown"
    local out rc=0
    if [ $# -gt 0 ]; then
        out="$("$client" --socket "$socket" --timeout 10s "$method" --json "$1")" || rc=$?
    else
        out="$("$client" --socket "$socket" --timeout 10s "$method")" || rc=$?
    fi
    printf '%s\n' "$out" | sed 's/^/    /'
    last_reply="$out"
    return "$rc"
}

start() {
    local name=$1
    shift
    # No KUBERNETES_SERVICE_HOST: even when run inside a pod, the demo stays off any cluster.
    env -u KUBERNETES_SERVICE_HOST "$driver" "$@" --csi-socket="unix://$work/$name.sock" \
        --metrics-addr= --log-level=info >"$work/$name.log" 2>&1 &
    pids+=("$!")
    note "$name: pid $! (log: $work/$name.log)"
}

wait_ready() {
    local name=$1
    if ! "$client" --socket "$work/$name.sock" --timeout 20s --wait Probe >/dev/null; then
        echo "$name did not become ready" >&2
        return 1
    fi
}

pod_uid() { cat /proc/sys/kernel/random/uuid; }

step "Start one controller and two node plugins (node-a, node-b), each node with its own base dir and fake kubelet dir"
for node in node-a node-b; do
    mkdir -p "$work/$node/base" "$work/$node/kubelet/pods"
done
start controller --mode=controller
start node-a --mode=node --node-name=node-a --base-dir="$work/node-a/base" --kubelet-dir="$work/node-a/kubelet"
start node-b --mode=node --node-name=node-b --base-dir="$work/node-b/base" --kubelet-dir="$work/node-b/kubelet"
for name in controller node-a node-b; do wait_ready "$name"; done
csi "$work/controller.sock" GetPluginInfo
csi "$work/node-b.sock" NodeGetInfo

pv=pvc-demo
cap='{"mount":{},"access_mode":{"mode":"MULTI_NODE_MULTI_WRITER"}}'

step "CreateVolume (csi-provisioner's call when a PVC is created): a name and an id, no storage yet, no topology"
csi "$work/controller.sock" CreateVolume "{\"name\":\"$pv\",\"capacity_range\":{\"required_bytes\":1073741824},\"volume_capabilities\":[$cap]}"
volume_id="$(printf '%s\n' "$last_reply" | sed -n 's/^ *"volume_id": "\(nlc-[0-9a-f-]*\)".*/\1/p')"
[ -n "$volume_id" ] || { echo "no volume_id in the reply" >&2; exit 1; }
# kubelet hands CreateVolume's volume_context (the PV's volumeAttributes) to every publish.
volume_context="$(printf '%s\n' "$last_reply" | awk '
    /"volume_context": \{/ { inside = 1; next }
    inside && /^ *\}/     { exit }
    inside                { sub(/^ +/, ""); sub(/,$/, ""); printf "%s%s", (n++ ? "," : ""), $0 }')"
volume_context="{$volume_context}"
note "volume id: $volume_id"

# Target dirs as kubelet lays them out: the parent exists, the driver makes "mount" itself.
target_a="$work/node-a/kubelet/pods/$(pod_uid)/volumes/kubernetes.io~csi/$pv/mount"
target_b="$work/node-b/kubelet/pods/$(pod_uid)/volumes/kubernetes.io~csi/$pv/mount"
mkdir -p "$(dirname "$target_a")" "$(dirname "$target_b")"

step "NodePublishVolume on node-a and node-b (kubelet's call when a pod using the PVC starts there)"
for node in node-a node-b; do
    target=$target_a
    [ "$node" = node-b ] && target=$target_b
    csi "$work/$node.sock" NodePublishVolume \
        "{\"volume_id\":\"$volume_id\",\"target_path\":\"$target\",\"volume_capability\":$cap,\"volume_context\":$volume_context}"
    mountpoint -q "$target" || { echo "$target is not a mount point" >&2; exit 1; }
    note "$target is now a bind mount of $work/$node/base/$volume_id"
done

step "A pod on node-a writes a file into the volume"
printf 'written on node-a at %s\n' "$(date -u +%FT%TZ)" >"$target_a/hello.txt"
note "\$ find <node-a target> -type f"
find "$target_a" -type f -printf '    %M %u %6s %P\n'

step "A pod on node-b sees an empty volume: each node keeps its own copy"
note "\$ find <node-b target> -mindepth 1"
if [ -n "$(find "$target_b" -mindepth 1 -print -quit)" ]; then
    find "$target_b" -mindepth 1 -printf '    %P\n'
    echo "node-b's target is not empty" >&2
    exit 1
fi
note "(empty)"

step "NodeGetVolumeStats on node-a (kubelet asks about once a minute for the volume's usage)"
csi "$work/node-a.sock" NodeGetVolumeStats "{\"volume_id\":\"$volume_id\",\"volume_path\":\"$target_a\"}"

step "NodeUnpublishVolume on both nodes (the pods went away)"
for node in node-a node-b; do
    target=$target_a
    [ "$node" = node-b ] && target=$target_b
    csi "$work/$node.sock" NodeUnpublishVolume "{\"volume_id\":\"$volume_id\",\"target_path\":\"$target\"}"
    if [ -e "$target" ]; then
        echo "$target is still there" >&2
        exit 1
    fi
    note "$target is unmounted and removed"
done

step "node-a's copy survives in its base dir for the next pod on node-a (a cache, not scratch space)"
note "\$ cat $work/node-a/base/$volume_id/hello.txt"
sed 's/^/    /' "$work/node-a/base/$volume_id/hello.txt"

step "DeleteVolume (csi-provisioner's call when the PVC is deleted)"
csi "$work/controller.sock" DeleteVolume "{\"volume_id\":\"$volume_id\"}"
note "In a cluster, this starts the cleanup protocol over the Kubernetes API and every node wipes"
note "its copy. Here there is no API server, so the driver runs standalone and the copies stay"
note "until the temp dir is removed."

step "Stop everything with SIGTERM"
for i in "${!pids[@]}"; do
    kill -TERM "${pids[$i]}"
    rc=0
    wait "${pids[$i]}" || rc=$?
    [ "$rc" -eq 0 ] || { echo "pid ${pids[$i]} exited with $rc after SIGTERM" >&2; exit 1; }
done
note "all three exited cleanly"
pids=()

printf '\n%sDemo passed.%s Every step above can be repeated by hand with target/release/csi-client.\n' "$green" "$off"
"$repo/scripts/eviction-demo.sh"
