#!/usr/bin/env bash
# Regenerates scripts/code-order.txt: the functions the node plugin runs from start through its
# everyday calls, sorted by name (the set is what counts; sorted, a new run of the script changes
# only the lines of functions that came or went). scripts/build-static.sh hands the list to the
# linker (lld's --symbol-ordering-file), which puts those functions first in the code, together.
# The kernel maps code a page cache folio at a time, around each page touched: with the code a
# node runs spread over the whole binary, nearly all of it was resident; packed together, the
# rest stays on disk. docs/performance.md has the figures.
#
#   scripts/code-order.sh    (as root: the workload bind-mounts; needs valgrind, python3, openssl)
#
# The workload: start, Probe, 40 publish/unpublish cycles at concurrency 4 (csi-bench), one
# publish of a volume with a size, NodeGetVolumeStats, NodeGetInfo, NodeGetCapabilities, a
# /metrics, /readyz and /livez scrape, unpublish, SIGTERM; all the while the cleanup protocol polls an
# API server over TLS every second (a stand-in made here with python3 and openssl, answering
# the node's reads as the real one does, managedFields and all). Run it again after a
# dependency or toolchain update (the symbol names change) or a change to what those calls do;
# scripts/image-check.sh fails when a tenth of the list no longer names a function in the
# binary.
set -euo pipefail
cd "$(dirname "$0")/.."
for tool in valgrind python3 openssl nm; do
    command -v "$tool" >/dev/null || { echo "code-order.sh needs $tool" >&2; exit 1; }
done
target_dir=${CARGO_TARGET_DIR:-target}

work=$(mktemp -d /tmp/nlc-code-order.XXXXXX)
pid=""
api_pid=""
cleanup() {
    if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    if [ -n "$api_pid" ]; then kill "$api_pid" 2>/dev/null || true; wait "$api_pid" 2>/dev/null || true; fi
    awk -v root="$work/" 'index($5, root) == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r m; do umount -l "$m" || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# The image's binary with its symbols (the names are the same as in the stripped one), and the
# tools that drive it.
NLC_KEEP_SYMBOLS=1 scripts/build-static.sh "$work/bin" node-local-cache
cargo build --release --locked --bin csi-bench --bin csi-client
bench="$target_dir/release/csi-bench"
client="$target_dir/release/csi-client"

# The API server stand-in: the cleanup index, an empty PV list, 404 for anything else.
# RSA, as kubeadm makes a cluster's CA and serving certificate.
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=code-order-ca \
    -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$work/api.key" -out "$work/api.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$work/api.ext"
openssl x509 -req -in "$work/api.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -CAcreateserial -days 1 \
    -extfile "$work/api.ext" -out "$work/api.crt" 2>/dev/null
echo "code-order-token" >"$work/token"
python3 - "$work" <<'PY' &
import http.server, json, ssl, sys
work = sys.argv[1]
def meta(name):
    return {"name": name, "namespace": "kube-system", "uid": "0b6f1c2e-5a7d-4e8f-9a0b-1c2d3e4f5a6b",
            "resourceVersion": "5429", "creationTimestamp": "2026-11-28T07:52:41Z",
            "managedFields": [{"manager": "node-local-cache", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-11-28T07:52:41Z", "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:data": {".": {}, "f:records": {}}}}]}
class Api(http.server.BaseHTTPRequestHandler):
    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def do_GET(self):
        with open(f"{work}/api.requests", "a") as log:
            log.write(f"{self.command} {self.path}\n")
        if "/configmaps/nlc-cleanup-index" in self.path:
            self.answer(200, {"kind": "ConfigMap", "apiVersion": "v1", "metadata": meta("nlc-cleanup-index"),
                              "data": {"records": ""}})
        elif "/persistentvolumes" in self.path:
            self.answer(200, {"kind": "PersistentVolumeList", "apiVersion": "v1",
                              "metadata": {"resourceVersion": "5429"}, "items": []})
        else:
            self.answer(404, {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": "not found", "reason": "NotFound", "code": 404})
    do_PATCH = do_POST = do_PUT = do_DELETE = do_GET
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
tls.load_cert_chain(f"{work}/api.crt", f"{work}/api.key")
server.socket = tls.wrap_socket(server.socket, server_side=True)
open(f"{work}/api.port.tmp", "w").write(str(server.server_address[1]))
__import__("os").rename(f"{work}/api.port.tmp", f"{work}/api.port")
server.serve_forever()
PY
api_pid=$!
for _ in $(seq 100); do [ -s "$work/api.port" ] && break; sleep 0.1; done
[ -s "$work/api.port" ] || { echo "the API server stand-in did not start" >&2; exit 1; }

tree="$work/tree"
mkdir -p "$tree/kubelet/pods/pod-a/volumes" "$tree/base"
socket="$tree/csi.sock"
valgrind --tool=callgrind --demangle=no --callgrind-out-file="$work/callgrind.out" \
    "$work/bin/node-local-cache" --mode=node --node-name=code-order --base-dir="$tree/base" \
    --kubelet-dir="$tree/kubelet" --csi-socket="unix://$socket" --metrics-addr=127.0.0.1:0 \
    --kube-api-url="https://127.0.0.1:$(cat "$work/api.port")" --kube-token-file="$work/token" \
    --kube-ca-file="$work/ca.crt" --namespace=kube-system --cleanup-poll-interval=1s \
    2>"$work/log" &
pid=$!
"$bench" --node-socket "$socket" --probe --timeout 120s >/dev/null
"$bench" --node-socket "$socket" --target-root "$tree/kubelet/pods" --no-floor --cycles 40 \
    --concurrency 4 --fail-on-error >/dev/null
volume=nlc-6f1a2b3c-4d5e-5f60-8172-839405a6b7c8
target="$tree/kubelet/pods/pod-a/volumes/mount"
cap='{"mount":{},"access_mode":{"mode":"MULTI_NODE_MULTI_WRITER"}}'
call() { "$client" --socket "$socket" "$1" --json "$2" >/dev/null; }
call NodePublishVolume "{\"volume_id\":\"$volume\",\"target_path\":\"$target\",\"volume_capability\":$cap,\"volume_context\":{\"node-local-cache.csi.io/capacity-bytes\":\"1073741824\",\"node-local-cache.csi.io/name\":\"pvc-code-order\"}}"
call NodeGetVolumeStats "{\"volume_id\":\"$volume\",\"volume_path\":\"$target\"}"
call NodeGetInfo '{}'
call NodeGetCapabilities '{}'
addr=$(sed -n 's|.*metrics on http://\([0-9.:]*\)/metrics.*|\1|p' "$work/log" | head -1)
for path in /metrics /readyz /livez; do
    exec 3<>"/dev/tcp/${addr%:*}/${addr##*:}"
    printf 'GET %s HTTP/1.0\r\n\r\n' "$path" >&3
    cat <&3 >/dev/null
    exec 3<&-
done
call NodeUnpublishVolume "{\"volume_id\":\"$volume\",\"target_path\":\"$target\"}"
# Three polls of the API at least, however slow the run under callgrind was.
for _ in $(seq 600); do
    [ "$(grep -c nlc-cleanup-index "$work/api.requests" 2>/dev/null || true)" -ge 3 ] && break
    sleep 0.1
done
[ "$(grep -c nlc-cleanup-index "$work/api.requests" 2>/dev/null || true)" -ge 3 ] ||
    { echo "the driver did not poll the API server stand-in; its log:" >&2; cat "$work/log" >&2; exit 1; }
kill -TERM "$pid"
wait "$pid"
pid=""

# Callgrind names a function once, `fn=(N) name` or `cfn=(N) name`, then by number; a cost line
# under `fn=` means it ran. Names callgrind could not tell (0x...) and its suffix for a second
# function of the same name ('2) are dropped, and only functions the binary defines are kept.
nm --defined-only "$work/bin/node-local-cache" | awk '$2 ~ /^[tTwW]$/ { print $3 }' | sort -u >"$work/defined"
awk '
    /^c?fn=\(/ {
        id = $1; sub(/^c?fn=/, "", id)
        name = substr($0, index($0, ")") + 2)
        if (name != "") names[id] = name
        if ($0 ~ /^fn=/) cur = id
        next
    }
    /^[0-9+*-]/ && cur != "" && !(cur in ran) { ran[cur] = 1; print names[cur] }
' "$work/callgrind.out" | sed "s/'[0-9]*\$//" | awk '!/^0x/ && !seen[$0]++' >"$work/ran"
awk 'NR == FNR { defined[$0] = 1; next } $0 in defined' "$work/defined" "$work/ran" |
    LC_ALL=C sort >scripts/code-order.txt
echo "scripts/code-order.txt: $(wc -l <scripts/code-order.txt) functions"
