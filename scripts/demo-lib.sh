# shellcheck shell=bash disable=SC2034,SC2154
# (SC2034, SC2154: the variables this file sets and reads are shared with the scripts sourcing it.)
# What scripts/demo.sh and scripts/eviction-demo.sh share, sourced by both: root and tool checks,
# a private mount namespace (no mount can outlive the demo), headings, the release build, a temp
# dir, and the cleanup that stops the plugins and unmounts what is left in it, passed or failed.
#
# The caller sets `demo_name`, `demo_tools` (an array) and `repo`, then runs `demo_setup "$@"`.
# Afterwards it has: bold, note, step, `pids` (plugins to stop), `driver`, `client`, `work`,
# and the colours `b red green off`.

demo_setup() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$demo_name: run as root (the node plugins bind-mount): sudo $0" >&2
        exit 2
    fi
    local tool
    for tool in "${demo_tools[@]}"; do
        if ! command -v "$tool" >/dev/null; then
            echo "$demo_name: $tool is missing (cargo from rustup; cmake and util-linux from your distribution)" >&2
            exit 2
        fi
    done
    if [ -z "${NLC_DEMO_IN_NAMESPACE:-}" ]; then
        NLC_DEMO_IN_NAMESPACE=1 exec unshare --mount --propagation private "$BASH" "$0" "$@"
    fi

    # Bold headings and a coloured verdict on a terminal only, so a saved log stays plain text.
    if [ -t 1 ]; then
        b=$'\033[1m' red=$'\033[1;31m' green=$'\033[1;32m' off=$'\033[0m'
    else
        b='' red='' green='' off=''
    fi

    bold "==> cargo build --release"
    (cd "$repo" && cargo build --release)
    local bin_dir="${CARGO_TARGET_DIR:-$repo/target}/release"
    driver="$bin_dir/node-local-cache"
    client="$bin_dir/csi-client"

    work="$(mktemp -d "/tmp/nlc-$demo_name.XXXXXX")"
    work="$(cd "$work" && pwd -P)"
    pids=()
    current_step="setup"
    trap demo_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}

bold() { printf '\n%s%s%s\n' "$b" "$*" "$off"; }
note() { printf '    %s\n' "$*"; }

step() {
    current_step="$*"
    bold "==> $*"
}

# Stops every plugin the demo started.
stop_all() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}

demo_cleanup() {
    local status=$?
    trap - EXIT INT TERM
    stop_all
    # Deepest mount first; lazy, so a busy one cannot keep the temp dir alive.
    awk -v root="$work/" 'index($5, root) == 1 { print length($5), $5 }' /proc/self/mountinfo |
        sort -rn | cut -d' ' -f2- | while read -r mnt; do umount -l "$mnt" 2>/dev/null || true; done
    if [ "$status" -ne 0 ]; then
        printf '\n%sFAILED%s at: %s\n' "$red" "$off" "$current_step" >&2
        local log
        for log in "$work"/*.log; do
            [ -e "$log" ] || continue
            echo "--- last lines of $(basename "$log")" >&2
            tail -n 15 "$log" >&2
        done
    fi
    rm -rf "$work"
    exit "$status"
}
