#!/usr/bin/env bash
# The full `cargo deny check` (advisories, bans, licenses, sources; see deny.toml), as
# CI runs it: offline, against a snapshot of the RustSec advisory database.
#
#   scripts/deny-check.sh                               # the snapshot in ../shared/advisory-db
#   ADVISORY_DB_SNAPSHOT=DIR scripts/deny-check.sh      # another copy
#   cargo deny check                                    # the live database (needs GitHub)
#
# CI cannot reach GitHub, where cargo-deny fetches the database from. The snapshot is
# plain files (read-only in CI); cargo-deny reads its database from a git clone under
# deny.toml's `db-path` and takes its age from that clone's HEAD. So the snapshot is
# copied there and committed with its own date, never a newer one, and
# `cargo deny --frozen` (no network) refuses it once older than deny.toml's
# `maximum-db-staleness`. Without a snapshot, the check runs against the live database.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deny >/dev/null || {
  echo "deny-check: cargo-deny is missing: cargo install cargo-deny --locked" >&2
  exit 1
}
snapshot="${ADVISORY_DB_SNAPSHOT:-../shared/advisory-db}"
# deny.toml's db-path, and in it the directory cargo-deny derives from its default
# database URL (https://github.com/RustSec/advisory-db).
db=target/advisory-dbs/advisory-db-3157b0e258782691

if [[ ! -d "$snapshot/crates" ]]; then
  echo "deny-check: no advisory database snapshot at $snapshot: checking against the live database"
  exec cargo deny --locked check --hide-inclusion-graph
fi

# The date of the upstream commit the snapshot was taken from (its SNAPSHOT.md), else
# that of its newest advisory.
date=$(grep -ohE 'GIT_COMMITTER_DATE=[0-9][0-9T:+-]+' "$snapshot/SNAPSHOT.md" 2>/dev/null | head -n1 | cut -d= -f2 || true)
if [[ -z "$date" ]]; then
  date="$(grep -rhoE '^date = "[0-9-]+"' "$snapshot/crates" | cut -d'"' -f2 | sort | tail -n1)T00:00:00Z"
fi
rm -rf "$db"
mkdir -p "$db"
cp -R "$snapshot"/. "$db"/
chmod -R u+w "$db" # a copy of a read-only tree is read-only
git -C "$db" init -q
git -C "$db" symbolic-ref HEAD refs/heads/main
git -C "$db" add -A
GIT_AUTHOR_DATE="$date" GIT_COMMITTER_DATE="$date" git -C "$db" \
  -c user.name="advisory-db snapshot" -c user.email=snapshot@invalid -c commit.gpgsign=false \
  commit -q -m "RustSec advisory-db snapshot of $date"
# cargo-deny takes the newer of HEAD's commit date and the HEAD file's time.
touch -d "$date" "$db/.git/HEAD"
# So that a later online `cargo deny check` updates this clone to the live database.
git -C "$db" remote add origin https://github.com/RustSec/advisory-db
echo "deny-check: RustSec advisory database snapshot of $date ($(( ($(date +%s) - $(date -d "$date" +%s)) / 86400 )) days old), from $snapshot"

# --frozen: no network at all; the crates' manifests come from cargo's cache, filled here.
cargo fetch --locked --quiet
cargo deny --frozen check --hide-inclusion-graph
