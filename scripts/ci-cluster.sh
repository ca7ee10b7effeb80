#!/usr/bin/env bash
# CI for the cluster tests (tests/it/cluster/, the `cluster::` module of the `it` test binary): start a throwaway 3-node RabbitMQ cluster
# (scripts/cluster.sh; the broker on 5672 is not touched), run the tests, and always
# stop the cluster, whether they pass, fail or are interrupted.
#
# Extra arguments go to the test binary, e.g. a test name to run just that one:
#   scripts/ci-cluster.sh freezing_the_workers_node
# Without any, the filter `cluster::` selects the module (its tests are the only
# ignored ones; `--ignored` runs them).
set -euo pipefail
cd "$(dirname "$0")/.."

stop_cluster() {
  scripts/cluster.sh stop || echo "ci-cluster: could not stop the cluster cleanly" >&2
}
trap stop_cluster EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

scripts/cluster.sh start

# Measurements (failover times, duplicates) go to target/tmp/cluster/report.txt.
report="${CARGO_TARGET_DIR:-target}/tmp/cluster/report.txt"
rm -f "$report"

status=0
JELOU_CLUSTER_TESTS=1 cargo test --locked --test it -- --ignored --test-threads=1 "${@:-cluster::}" || status=$?

if [[ -f "$report" ]]; then
  echo "--- cluster measurements ($report):"
  cat "$report"
fi
exit "$status"
