#!/usr/bin/env bash
# Checks the container image where Docker cannot run: builds the binaries exactly as the
# Dockerfile does, proves they are static, lays out a root dir holding only what the image holds,
# and runs the driver there under chroot as the controller runs in the cluster (non-root, on a
# read-only root, with the socket on a writable emptyDir stand-in). Probe and GetPluginInfo are
# then called on it from outside, and with the image's own csi-client from inside.
#
# Run as root (chroot and mounts): sudo scripts/image-check.sh
# Prints the binary sizes and the would-be image size; exits non-zero on any failure.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ "$(id -u)" -ne 0 ]; then
    echo "image-check.sh: run as root (chroot and mounts): sudo $0" >&2
    exit 2
fi

# A private mount namespace: the read-only root, /proc and the socket tmpfs vanish with it.
if [ -z "${NLC_IMAGE_CHECK_IN_NAMESPACE:-}" ]; then
    NLC_IMAGE_CHECK_IN_NAMESPACE=1 exec unshare --mount --propagation private "$BASH" "$0" "$@"
fi

fail() {
    echo "FAIL: $*" >&2
    exit 1
}

cd "$repo"
bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
# The non-root user the controller runs as in deploy/controller.yaml.
uid=65532

root="$(mktemp -d /tmp/nlc-image-root.XXXXXX)"
built="$(mktemp -d /tmp/nlc-image-bins.XXXXXX)"
driver_pid=""
cleanup() {
    local status=$?
    trap - EXIT
    if [ -n "$driver_pid" ]; then
        kill -KILL "$driver_pid" 2>/dev/null || true
        wait "$driver_pid" 2>/dev/null || true
    fi
    for m in "$root/csi" "$root/proc" "$root"; do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$root" "$built"
    exit "$status"
}
trap cleanup EXIT

echo "== build, as in the Dockerfile"
# (The linker's line per listed function it cannot find is left out; the count below says it.)
if ! NLC_CODE_ORDER_REPORT="$built/code-order" bash scripts/build-static.sh "$built" node-local-cache csi-client 2>&1 |
    { grep -v 'symbol ordering file: no such symbol' || true; }; then
    fail "the build failed"
fi

echo "== code order (scripts/code-order.txt)"
# On x86_64 the driver's everyday functions are linked first and together; a list whose names no
# longer match (a dependency or toolchain update) leaves them spread out again, and every node
# keeps ~1.7 MiB more of the binary resident. Then: scripts/code-order.sh.
read -r found listed <"$built/code-order" || true
if [ "$found" = unordered ]; then
    echo "not ordered on $(uname -m) (x86_64 only)"
elif [ $((found * 10)) -lt $((listed * 9)) ]; then
    fail "only $found of the $listed functions in scripts/code-order.txt are in the binary; run scripts/code-order.sh"
else
    echo "$found of $listed listed functions found"
fi

echo "== static?"
for bin in node-local-cache csi-client; do
    # static-pie: "statically linked"; plain static: "not a dynamic executable".
    linkage="$(ldd "$built/$bin" 2>&1 || true)"
    case "$linkage" in
    *"statically linked"* | *"not a dynamic executable"*) echo "$bin: $linkage" ;;
    *) fail "$bin is dynamically linked:"$'\n'"$linkage" ;;
    esac
    if readelf -l "$built/$bin" | grep -q 'program interpreter'; then
        fail "$bin asks for a program interpreter"
    fi
    # scripts/build-static.sh links a plain executable: nothing to relocate at start.
    readelf -h "$built/$bin" | grep -q 'Type: *EXEC' || fail "$bin is not a plain static executable (static-pie?)"
done

echo "== the image's filesystem: $root"
# Exactly the Dockerfile's final stage: the two binaries at the root, nothing else.
chmod 0755 "$root"
install -m 0755 "$built/node-local-cache" "$built/csi-client" "$root/"
image_bytes="$(du -sb --apparent-size "$root" | cut -f1)"
layer_gz_bytes="$(tar --numeric-owner --owner=0 --group=0 -C "$root" -cf - . | gzip -9 | wc -c)"
(cd "$root" && find . -mindepth 1 -printf '%M %10s %P\n')

# What a container runtime adds: mount points for /proc and the emptyDir at /csi, then the root
# made read-only (readOnlyRootFilesystem). None of these are files of the image.
mkdir "$root/proc" "$root/csi"
mount --bind "$root" "$root"
mount -o remount,bind,ro "$root"
mount -t proc proc "$root/proc"
mount -t tmpfs -o mode=1777,size=1m tmpfs "$root/csi"

echo "== run the driver in it: controller mode, uid $uid, empty environment"
chroot="$(command -v chroot)"
log="$built/driver.log"
env -i "$chroot" --userspec="$uid:$uid" "$root" /node-local-cache --mode=controller \
    --metrics-addr=127.0.0.1:0 --log-format=json >"$log" 2>&1 &
driver_pid=$!

client="$bin_dir/csi-client"
probe="$("$client" --socket "$root/csi/csi.sock" --wait --timeout 20s Probe)" ||
    fail "Probe from outside failed: $probe"$'\n'"$(cat "$log")"
echo "Probe from outside: $(tr -d ' \n' <<<"$probe")"
grep -q '"ready": true' <<<"$probe" || fail "the driver is not ready"

info="$("$client" --socket "$root/csi/csi.sock" --timeout 10s GetPluginInfo)" ||
    fail "GetPluginInfo from outside failed: $info"
echo "GetPluginInfo from outside: $(tr -d ' \n' <<<"$info")"
grep -q '"name": "node-local-cache.csi.io"' <<<"$info" || fail "unexpected plugin name"

inside="$(env -i "$chroot" --userspec="$uid:$uid" "$root" /csi-client --timeout 10s GetPluginCapabilities)" ||
    fail "the image's own csi-client failed: $inside"
echo "GetPluginCapabilities with the image's csi-client (default socket /csi/csi.sock): $(tr -d ' \n' <<<"$inside")"

port="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -n1 | cut -d: -f3)"
[ -n "$port" ] || fail "no metrics address in the log:"$'\n'"$(cat "$log")"
exec 3<>"/dev/tcp/127.0.0.1/$port"
printf 'GET /readyz HTTP/1.0\r\n\r\n' >&3
read -r status_line <&3 || true
exec 3>&-
case "$status_line" in
*" 200 "*) echo "/readyz on the metrics port: ${status_line%$'\r'}" ;;
*) fail "/readyz answered: $status_line" ;;
esac

kill -TERM "$driver_pid"
rc=0
wait "$driver_pid" || rc=$?
driver_pid=""
[ "$rc" -eq 0 ] || fail "the driver exited with $rc after SIGTERM:"$'\n'"$(cat "$log")"
if grep -qi '"level":"error"' "$log"; then
    fail "the driver logged errors:"$'\n'"$(cat "$log")"
fi
echo "SIGTERM: clean exit"

echo "== sizes"
for bin in node-local-cache csi-client; do
    size="$(stat -c %s "$built/$bin")"
    printf '%-18s %9d bytes (%s), %s gzipped\n' "$bin" "$size" "$(numfmt --to=iec "$size")" \
        "$(numfmt --to=iec "$(gzip -9 <"$built/$bin" | wc -c)")"
done
printf '%-18s %9d bytes (%s), one layer of %s gzipped\n' "image" "$image_bytes" \
    "$(numfmt --to=iec "$image_bytes")" "$(numfmt --to=iec "$layer_gz_bytes")"
echo "image-check: PASS"
