#!/usr/bin/env bash
# Checks the shipped alert rules and dashboard with promtool (Debian: `apt-get install
# prometheus`): the rules' syntax, their unit tests, and every query of the dashboard
# (each is parsed as a recording rule, with Grafana's variables given values).
# That the metric names exist is checked against a live worker by tests/observability.rs.
set -euo pipefail
cd "$(dirname "$0")"
promtool check rules prometheus/alerts.yml
promtool test rules prometheus/alerts.test.yml
rules=$(mktemp --suffix=.yml)
trap 'rm -f "$rules"' EXIT
{
  echo 'groups: [{name: dashboard, rules: ['
  jq -r '[.. | objects | .expr? // empty] | to_entries[]
         | "{record: \"dashboard:query\(.key)\", expr: \(.value | tojson)},"' grafana/jelou-worker.json |
    sed -e 's/\$__rate_interval/5m/g' -e 's/\$instance/.*/g' \
        -e 's/\$jobs_queue/jelou.jobs/g' -e 's/\$dead_letter_queue/jelou.jobs.dead/g'
  echo ']}]'
} >"$rules"
echo "dashboard queries:"
promtool check rules "$rules"
