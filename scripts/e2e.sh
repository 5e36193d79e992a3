#!/usr/bin/env bash
# Kubernetes' external storage e2e suite (focus External.Storage) against node-local-cache, as
# deploy/testing/testdriver.yaml declares it, on the kind cluster `scripts/smoke.sh --keep` leaves
# (the driver installed, the current kubectl context pointing at it).
#
#   scripts/e2e.sh BIN_DIR    BIN_DIR holds e2e.test and ginkgo, from the Kubernetes release's
#                             kubernetes-test-linux-amd64.tar.gz (kubernetes/test/bin) of the
#                             cluster's version
#
# The CI `smoke` job runs it after the smoke test. Results go to $E2E_REPORT_DIR (default a
# temporary dir, printed at the end).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -ne 1 ] || [ ! -x "$1/e2e.test" ] || [ ! -x "$1/ginkgo" ]; then
    echo "usage: scripts/e2e.sh BIN_DIR (with e2e.test and ginkgo in it)" >&2
    exit 2
fi
bin="$1"
report="${E2E_REPORT_DIR:-$(mktemp -d /tmp/nlc-e2e.XXXXXX)}"

# Skipped, each with its reason.
skip=(
    # Each node has its own copy by design: the test has a pod on a second node read what the
    # first wrote, and asks that of every driver that offers ReadWriteMany.
    'should concurrently access the single volume from pods on different node'
    # Restart kubelet or nodes; kind's nodes are containers on one runner.
    '\[Disruptive\]'
    # Features this driver does not offer (snapshots, VolumeAttributesClass, ...).
    '\[Feature:'
)
skip_re="$(
    IFS='|'
    echo "${skip[*]}"
)"

"$bin/ginkgo" --procs=4 --timeout=2h --focus='External.Storage' --skip="$skip_re" \
    "$bin/e2e.test" -- \
    -storage.testdriver="$repo/deploy/testing/testdriver.yaml" \
    -kubeconfig="${KUBECONFIG:-$HOME/.kube/config}" \
    -report-dir="$report"
echo "e2e reports in $report"
