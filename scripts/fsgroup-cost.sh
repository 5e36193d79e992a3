#!/usr/bin/env bash
# What `fsGroupPolicy: File` would cost a pod's start-up: kubelet's SetVolumeOwnership walks the
# whole volume before the pod starts and, for every entry, lstats it, lchowns it to the pod's
# fsGroup and chmods it (g+rw, or g+r read-only; directories also g+x and setgid). This times
# that walk on a volume of FILES files (default 100,000: 100 dirs of 1,000) on a tmpfs, so the
# figure is the syscalls and CPU alone; on a disk, and with cold caches, it can only be slower.
#
#   sudo scripts/fsgroup-cost.sh            # 100,000 files, 3 runs of each walk
#   FILES=1000000 RUNS=1 sudo scripts/fsgroup-cost.sh
#
# Two walks, each run with a new group, so ownership really changes every time (as it does
# when pods with different fsGroups take turns on a volume):
#   - one walk doing kubelet's three calls per entry (Python: slower per entry than kubelet's
#     Go, so an upper figure for the same syscalls);
#   - coreutils `chgrp -hR` then `chmod -R` and `find -type d -exec chmod g+s` (three walks in C:
#     the syscalls with the least user-space cost around them).
# Runs in a private mount namespace as root; the tmpfs goes away with it.
set -euo pipefail

files="${FILES:-100000}"
runs="${RUNS:-3}"
per_dir=1000
dirs=$(((files + per_dir - 1) / per_dir))

if [ "$(id -u)" -ne 0 ]; then
    echo "fsgroup-cost.sh: run as root (chown to another group needs it)" >&2
    exit 1
fi
if [ -z "${FSGROUP_COST_NS:-}" ]; then
    exec env FSGROUP_COST_NS=1 unshare -m --propagation private "$0" "$@"
fi

root="$(mktemp -d)"
mount -t tmpfs -o size=1g,nr_inodes=$((files + dirs + 1000)) fsgroup-cost "$root"
trap 'umount "$root"; rmdir "$root"' EXIT
vol="$root/volume"
mkdir -m 0777 "$vol"

echo "== making $((dirs * per_dir)) files in $dirs dirs on a tmpfs"
for d in $(seq "$dirs"); do
    mkdir "$vol/d$d"
    (cd "$vol/d$d" && printf 'f%d\0' $(seq "$per_dir") | xargs -0 touch)
done
entries="$(find "$vol" | wc -l)"
echo "   $entries entries (files and dirs, the volume dir included)"

kubelet_walk() {
    python3 - "$vol" "$1" <<'PY'
import os, stat, sys, time
vol, gid = sys.argv[1], int(sys.argv[2])
start = time.monotonic()
def visit(path):
    st = os.lstat(path)
    os.lchown(path, -1, gid)
    if stat.S_ISLNK(st.st_mode):
        return
    mode = stat.S_IMODE(st.st_mode) | 0o660
    if stat.S_ISDIR(st.st_mode):
        mode |= stat.S_ISGID | 0o110
        os.chmod(path, mode)
        for name in sorted(os.listdir(path)):
            visit(os.path.join(path, name))
    else:
        os.chmod(path, mode)
visit(vol)
print(f"{time.monotonic() - start:.3f}")
PY
}

coreutils_walk() {
    local start end
    start=$(date +%s.%N)
    chgrp -hR "$1" "$vol"
    chmod -R g+rw "$vol"
    find "$vol" -type d -exec chmod g+xs {} +
    end=$(date +%s.%N)
    echo "$start $end" | awk '{ printf "%.3f\n", $2 - $1 }'
}

gid=2000
declare -a k c
for i in $(seq "$runs"); do
    gid=$((gid + 1))
    k+=("$(kubelet_walk "$gid")")
    gid=$((gid + 1))
    c+=("$(coreutils_walk "$gid")")
    echo "   run $i: kubelet's walk ${k[-1]} s, coreutils ${c[-1]} s"
done
stat -c '   the volume dir after the last run: %A, group %g' "$vol"
min() { printf '%s\n' "$@" | sort -n | head -n 1; }
max() { printf '%s\n' "$@" | sort -n | tail -n 1; }
echo "fsGroup walk over $entries entries on tmpfs, $runs runs: kubelet's walk $(min "${k[@]}")-$(max "${k[@]}") s, coreutils $(min "${c[@]}")-$(max "${c[@]}") s"
