#!/usr/bin/env bash
# The dependency checks that need no advisory database (CI's `audit` job runs `cargo audit`
# against RustSec; this runs offline, in scripts/lint.sh):
#   1. the runtime graph (`cargo tree -e normal`) is exactly the crates README.md's Dependencies
#      table names, so a new crate cannot arrive unexplained;
#   2. it holds one version of each crate;
#   3. every advisory .cargo/audit.toml accepts is still needed (its crate is in Cargo.lock) and
#      still harmless (its crate is in no build, build scripts included, for the image's
#      platforms).
# Needs cargo; the crates come from the local cache (or crates.io on a fresh machine).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export LC_ALL=C
platforms=(x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu)
rc=0

graph="$(cargo tree --locked -e normal --prefix none | sed 's/ (\*)$//; s/ (proc-macro)$//' |
    grep -v '^node-local-cache ' | sort -u)"
crates="$(awk '{ print $1 }' <<<"$graph" | sort -u)"

# Crate names in backticks in the table rows of README.md's "## Dependencies" section.
readme="$(awk '/^## / { on = ($0 == "## Dependencies") } on && /^\|/' README.md |
    grep -o "\`[a-z0-9_-]*\`" | tr -d "\`" | sort -u)"
if [ -z "$readme" ]; then
    echo "README.md has no Dependencies table"
    rc=1
elif [ "$crates" != "$readme" ]; then
    echo "the runtime graph and README.md's Dependencies table differ:"
    diff <(echo "$crates") <(echo "$readme") | sed -n 's/^< /  in the graph, not in the README: /p; s/^> /  in the README, not in the graph: /p'
    rc=1
fi

dups="$(awk '{ print $1 }' <<<"$graph" | uniq -d)"
if [ -n "$dups" ]; then
    echo "more than one version in the runtime graph:"
    grep -F -w -f <(echo "$dups") <<<"$graph" | sed 's/^/  /'
    rc=1
fi

while read -r id crate; do
    if ! grep -qx "name = \"$crate\"" Cargo.lock; then
        echo ".cargo/audit.toml accepts $id for $crate, which is no longer in Cargo.lock: remove the entry"
        rc=1
        continue
    fi
    for p in "${platforms[@]}"; do
        if [ -n "$(cargo tree --locked -e all --target "$p" -i "$crate" 2>/dev/null)" ]; then
            echo "$crate ($id) is now in the build for $p: the acceptance in .cargo/audit.toml no longer holds"
            rc=1
        fi
    done
done < <(sed -n 's/^ *"\(RUSTSEC-[0-9]*-[0-9]*\)", *# *\([a-z0-9_-]*\):.*/\1 \2/p' .cargo/audit.toml)

[ "$rc" -eq 0 ] && echo "$(wc -l <<<"$crates") runtime crates, one version each, all in README.md; accepted advisories still needed and not built"
exit "$rc"
