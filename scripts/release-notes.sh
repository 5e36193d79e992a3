#!/usr/bin/env bash
# Checks that a release tag agrees with the tree and prints its release notes: the CHANGELOG.md
# section of that version. The release workflow runs it before anything is built or pushed;
# scripts/lint.sh runs it with --draft on every change.
#
#   scripts/release-notes.sh v0.1.0 OWNER   the tag and the GitHub owner it is published under
#   scripts/release-notes.sh --draft        the same checks for Cargo.toml's version and the owner
#                                           deploy/ names; an "unreleased" section is accepted
#
# The tag must be "v" + Cargo.toml's version and deploy/kustomization.yaml's image tag, and the
# image must be ghcr.io/OWNER/node-local-cache (owner names are lowercase in image references).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)"
image="$(awk '$1 == "newName:" { print $2 }' deploy/kustomization.yaml)"
image_tag="$(awk '$1 == "newTag:" { gsub(/"/, "", $2); print $2 }' deploy/kustomization.yaml)"
draft=0
if [ "${1:-}" = --draft ] && [ $# -eq 1 ]; then
    draft=1
    tag="v$version"
    owner="$(sed -n 's|^ghcr\.io/\([^/]*\)/node-local-cache$|\1|p' <<<"$image")"
elif [ $# -eq 2 ]; then
    tag="$1"
    owner="$(tr '[:upper:]' '[:lower:]' <<<"$2")"
else
    echo "usage: scripts/release-notes.sh TAG OWNER | --draft" >&2
    exit 2
fi

fail() {
    echo "release-notes.sh: $*" >&2
    exit 1
}
[ "$tag" = "v$version" ] || fail "tag $tag is not v + Cargo.toml's version ($version)"
[ "$image_tag" = "$tag" ] || fail "deploy/kustomization.yaml's newTag is $image_tag, not $tag"
if [ -z "$owner" ] || [ "$image" != "ghcr.io/$owner/node-local-cache" ]; then
    fail "deploy/kustomization.yaml's newName is $image, not ghcr.io/$owner/node-local-cache: set the owner there"
fi

# The section from "## <version>" to the next "## " heading, without the heading.
heading="$(grep -m 1 "^## $version\\b" CHANGELOG.md || true)"
[ -n "$heading" ] || fail "CHANGELOG.md has no section '## $version'"
if [ "$draft" -eq 0 ] && grep -qi unreleased <<<"$heading"; then
    fail "CHANGELOG.md's heading '$heading' still says unreleased: give it the release date"
fi
notes="$(awk -v h="$heading" '$0 == h { on = 1; next } on && /^## / { exit } on' CHANGELOG.md | sed '/./,$!d')"
[ -n "$(tr -d '[:space:]' <<<"$notes")" ] || fail "CHANGELOG.md's section for $version is empty"
printf '%s\n' "$notes"
