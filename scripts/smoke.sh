#!/usr/bin/env bash
# Smoke test on a real cluster (kind): build the image, load it into the nodes, apply deploy/,
# then check the product's promise end to end: a PVC any pod on any node can mount, each node
# with its own copy, and every copy gone once the PVC is deleted.
#
#   scripts/smoke.sh               create a 3-node kind cluster from scripts/kind-config.yaml
#                                  (unless it exists), test, then delete what it created
#   scripts/smoke.sh --no-create   use the kind cluster of the current kubectl context (the driver
#                                  is applied there and removed afterwards, unless --keep)
#   scripts/smoke.sh --keep        leave the cluster and the driver in place afterwards
#
# Needs docker (with a running engine), kind and kubectl, and pulls busybox for the test pods.
# Prints one PASS or FAIL line per step and exits non-zero on the first failure.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cluster="${KIND_CLUSTER_NAME:-nlc-smoke}"
test_ns=nlc-smoke
probe_image="${SMOKE_POD_IMAGE:-busybox:1.36}"
create=1
keep=0

# The comment block at the top of this file.
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
    case "$1" in
    --no-create) create=0 ;;
    --keep) keep=1 ;;
    -h | --help)
        usage
        exit 0
        ;;
    *)
        echo "smoke.sh: unknown argument $1" >&2
        usage >&2
        exit 2
        ;;
    esac
    shift
done

passed=0
failed=0
pass() {
    passed=$((passed + 1))
    echo "PASS $*"
}
fail() {
    failed=$((failed + 1))
    echo "FAIL $*"
    exit 1
}

missing=()
for tool in docker kind kubectl; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "smoke.sh: missing: ${missing[*]}. It needs Docker (https://docs.docker.com/engine/install/)," >&2
    echo "kind (https://kind.sigs.k8s.io/docs/user/quick-start/#installation) and kubectl" >&2
    echo "(https://kubernetes.io/docs/tasks/tools/)." >&2
    exit 2
fi
if ! docker info >/dev/null 2>&1; then
    echo "smoke.sh: docker is installed but no Docker engine answers (is the daemon running?)" >&2
    exit 2
fi

work="$(mktemp -d /tmp/nlc-smoke.XXXXXX)"
created_cluster=0
applied=0
overlay="$work/overlay"

cleanup() {
    local status=$?
    trap - EXIT
    if [ "$status" -ne 0 ] && [ "$applied" -eq 1 ]; then
        echo "--- diagnostics"
        kubectl get pods -A -o wide 2>&1 | grep -E 'NAME|node-local-cache|nlc-smoke' || true
        kubectl -n "$test_ns" describe pvc 2>&1 | tail -n 20 || true
        kubectl -n node-local-cache logs deploy/node-local-cache-controller --all-containers --tail=30 2>&1 || true
    fi
    if [ "$keep" -eq 0 ]; then
        kubectl delete namespace "$test_ns" --ignore-not-found --wait=false >/dev/null 2>&1 || true
        if [ "$created_cluster" -eq 1 ]; then
            kind delete cluster --name "$cluster" >/dev/null 2>&1 || true
        elif [ "$applied" -eq 1 ]; then
            kubectl delete -k "$overlay" --ignore-not-found --wait=false >/dev/null 2>&1 || true
        fi
    fi
    rm -rf "$work"
    echo "$passed passed, $failed failed"
    exit "$status"
}
trap cleanup EXIT

# 1. The cluster.
if [ "$create" -eq 1 ]; then
    if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
        kubectl config use-context "kind-$cluster" >/dev/null
        pass "cluster: reusing kind cluster $cluster"
    else
        kind create cluster --name "$cluster" --config "$repo/scripts/kind-config.yaml" --wait 120s \
            ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"} >"$work/kind.log" 2>&1 ||
            fail "cluster: kind create cluster ($(tail -n 3 "$work/kind.log" | tr '\n' ' '))"
        created_cluster=1
        pass "cluster: created kind cluster $cluster (3 nodes)"
    fi
else
    context="$(kubectl config current-context 2>/dev/null || true)"
    case "$context" in
    kind-*) cluster="${context#kind-}" ;;
    *) fail "cluster: --no-create needs the current context to be a kind cluster (kind-NAME), not '$context'" ;;
    esac
    kind get clusters 2>/dev/null | grep -qx "$cluster" || fail "cluster: no kind cluster named $cluster"
    pass "cluster: using the current context, kind cluster $cluster"
fi
mapfile -t kind_nodes < <(kind get nodes --name "$cluster" | sort)
mapfile -t workers < <(kubectl get nodes -l '!node-role.kubernetes.io/control-plane' \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)
[ "${#workers[@]}" -ge 2 ] || fail "cluster: need two worker nodes, found ${#workers[@]}"
node1="${workers[0]}"
node2="${workers[1]}"

# 2. The image, built from this tree and loaded into every node (no registry involved).
image="node-local-cache:smoke-$(date +%s)"
DOCKER_BUILDKIT=1 docker build -t "$image" "$repo" >"$work/build.log" 2>&1 ||
    fail "image: docker build ($(tail -n 5 "$work/build.log" | tr '\n' ' '))"
pass "image: built $image"
kind load docker-image "$image" --name "$cluster" >/dev/null ||
    fail "image: kind load docker-image"
pass "image: loaded into ${#kind_nodes[@]} nodes"

# 3. deploy/, with only the driver image overridden: the override names the image as deploy/
# has already set it (the released ghcr.io name).
released="$(awk '$1 == "newName:" { print $2 }' "$repo/deploy/kustomization.yaml")"
mkdir -p "$overlay"
cat >"$overlay/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$overlay" "$repo/deploy")
images:
  - name: $released
    newName: ${image%%:*}
    newTag: ${image#*:}
EOF
applied=1
kubectl apply -k "$overlay" >"$work/apply.log" 2>&1 ||
    fail "deploy: kubectl apply -k ($(tail -n 3 "$work/apply.log" | tr '\n' ' '))"
kubectl -n node-local-cache rollout status deployment/node-local-cache-controller --timeout=180s >/dev/null ||
    fail "deploy: the controller did not become ready"
kubectl -n node-local-cache rollout status daemonset/node-local-cache-node --timeout=180s >/dev/null ||
    fail "deploy: the node plugin did not become ready on every node"
pass "deploy: controller and node plugin running"

# 3b. deploy/admission-node.yaml: the node plugin's account, with the token the API server gives
# its pod (which names the pod's node), may write its own node's object and no other. Server-side
# dry runs: admission runs, nothing is stored. Only the token authenticates (no kubeconfig), so
# the admin's client certificate does not speak instead.
plugin_pod="$(kubectl -n node-local-cache get pods -l app.kubernetes.io/component=node \
    -o jsonpath='{.items[0].metadata.name} {.items[0].spec.nodeName}')"
plugin_node="${plugin_pod#* }"
plugin_pod="${plugin_pod%% *}"
kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' |
    base64 -d >"$work/ca.crt"
server="$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
token="$(kubectl -n node-local-cache create token node-local-cache-node \
    --bound-object-kind Pod --bound-object-name "$plugin_pod")"
: >"$work/no-kubeconfig"
as_plugin() {
    kubectl --kubeconfig="$work/no-kubeconfig" --server="$server" --certificate-authority="$work/ca.crt" \
        --token="$token" -n node-local-cache "$@" --dry-run=server -o name
}
own="nlc-node-$plugin_node"
out="$(as_plugin create configmap "$own" --from-literal=node="$plugin_node" 2>&1)" ||
    grep -q AlreadyExists <<<"$out" ||
    fail "admission: the node plugin on $plugin_node may not write $own ($out)"
for attempt in "nlc-node-not-$plugin_node node=not-$plugin_node" "$own node=not-$plugin_node" \
    "nlc-cleanup-index records="; do
    if out="$(as_plugin create configmap "${attempt%% *}" --from-literal="${attempt#* }" 2>&1)" ||
        ! grep -q "ValidatingAdmissionPolicy 'node-local-cache-node-writes' .* denied request" <<<"$out"; then
        fail "admission: the node plugin on $plugin_node was not refused ${attempt%% *} with ${attempt#* } ($out)"
    fi
done
pass "admission: the node plugin on $plugin_node writes $own only"

# 4. A PVC, bound at once (Immediate binding, no topology).
kubectl create namespace "$test_ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$test_ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: cache
spec:
  storageClassName: node-local-cache-delete
  accessModes: [ReadWriteMany]
  resources:
    requests:
      storage: 1Gi
EOF
kubectl -n "$test_ns" wait pvc/cache --for=jsonpath='{.status.phase}'=Bound --timeout=120s >/dev/null ||
    fail "pvc: not Bound"
pv="$(kubectl -n "$test_ns" get pvc cache -o jsonpath='{.spec.volumeName}')"
volume_id="$(kubectl get pv "$pv" -o jsonpath='{.spec.csi.volumeHandle}')"
[ -n "$volume_id" ] || fail "pvc: PV $pv has no CSI volume handle"
pass "pvc: bound to $pv, volume $volume_id"

# A pod on one node, running a shell command against the volume at /data; waits for it to end.
run_pod() {
    local name=$1 node=$2 script=$3
    kubectl -n "$test_ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata:
  name: $name
spec:
  nodeName: $node
  restartPolicy: Never
  containers:
    - name: main
      image: $probe_image
      command:
        - sh
        - -c
        - |
          $script
      volumeMounts:
        - name: cache
          mountPath: /data
  volumes:
    - name: cache
      persistentVolumeClaim:
        claimName: cache
EOF
    local phase="" deadline=$((SECONDS + 180))
    while [ "$SECONDS" -lt "$deadline" ]; do
        phase="$(kubectl -n "$test_ns" get pod "$name" -o jsonpath='{.status.phase}')"
        case "$phase" in Succeeded | Failed) break ;; esac
        sleep 2
    done
    [ "$phase" = Succeeded ]
}

# 5. A pod on node 1 writes; the file lands in node 1's copy.
run_pod writer "$node1" 'echo smoke > /data/hello.txt && sync' ||
    fail "write: pod on $node1 ($(kubectl -n "$test_ns" describe pod writer | tail -n 5 | tr '\n' ' '))"
docker exec "$node1" test -f "/var/node-local-cache/$volume_id/hello.txt" ||
    fail "write: /var/node-local-cache/$volume_id/hello.txt not on $node1"
pass "write: pod on $node1 wrote hello.txt into $node1's copy"

# 6. A pod on node 2 finds its own, empty copy.
run_pod reader "$node2" '! ls -A /data | grep -q .' ||
    fail "isolation: the volume on $node2 is not empty ($(kubectl -n "$test_ns" logs reader 2>&1 | tail -n 3))"
pass "isolation: pod on $node2 found an empty volume"

# 7. Pods gone, then the PVC: the PV goes once every node has wiped its copy.
kubectl -n "$test_ns" delete pod writer reader --wait=true --timeout=120s >/dev/null ||
    fail "cleanup: test pods not deleted"
kubectl -n "$test_ns" delete pvc cache --wait=true --timeout=120s >/dev/null ||
    fail "cleanup: PVC not deleted"
# Nodes poll every 30s and the controller waits up to 60s for them: allow a few rounds.
deadline=$((SECONDS + 300))
while kubectl get pv "$pv" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] ||
        fail "cleanup: PV $pv still there ($(kubectl get pv "$pv" -o jsonpath='{.metadata.finalizers}'))"
    sleep 5
done
pass "cleanup: PV $pv deleted"

left=()
for n in "${kind_nodes[@]}"; do
    deadline=$((SECONDS + 120))
    until docker exec "$n" test ! -e "/var/node-local-cache/$volume_id"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            left+=("$n")
            break
        fi
        sleep 5
    done
done
[ "${#left[@]}" -eq 0 ] || fail "cleanup: /var/node-local-cache/$volume_id still on ${left[*]}"
pass "cleanup: /var/node-local-cache/$volume_id gone on all ${#kind_nodes[@]} nodes"
