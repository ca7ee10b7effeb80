#!/usr/bin/env bash
# A throwaway 3-node RabbitMQ cluster on this machine, for the failover tests
# (tests/it/cluster/, run by scripts/ci-cluster.sh) and for trying the worker against a
# cluster by hand.
#
#   scripts/cluster.sh start      fresh cluster c1..c3@localhost (a leftover one is stopped first)
#   scripts/cluster.sh stop       kill the cluster's own nodes, remove its folder
#   scripts/cluster.sh status     which nodes run, and the cluster's view of itself
#   scripts/cluster.sh pid N      OS pid of node cN (from its pid file; fails if not running)
#   scripts/cluster.sh port N     AMQP port of node cN (5680+N)
#   scripts/cluster.sh url        the comma-separated amqp.url naming all three nodes
#   scripts/cluster.sh revive N   start cN again after it was killed; it rejoins the cluster
#   scripts/cluster.sh ctl N ...  rabbitmqctl -n cN@localhost ...
#
# Node cN listens for AMQP on 127.0.0.1:568N and for Erlang distribution on 2568N. Its
# data, logs, pid file and configuration live under ${JELOU_CLUSTER_DIR:-/tmp/jelou-cluster}/cN.
# JELOU_CLUSTER_SIZE=1 (or 2) starts fewer nodes: a lone c1 compares a single node with
# the cluster on equal terms (benchmarks). The tests need all three.
#
# The broker on 5672 (rabbit@localhost) is never touched: nodes are only ever stopped
# through their own pid files (or, for a node whose folder is gone, the owner of its
# distribution port), and a pid is killed only after checking that the process is the
# node we mean (its environment holds RABBITMQ_NODENAME=cN@localhost). Nothing is killed
# by process name.
#
# The nodes run as the `rabbitmq` user so that they share the Erlang cookie in
# /var/lib/rabbitmq/.erlang.cookie with each other and with rabbitmqctl (which, run as
# root, switches to that user too). Run this script as root or as rabbitmq.
set -euo pipefail

DIR="${JELOU_CLUSTER_DIR:-/tmp/jelou-cluster}"
SIZE="${JELOU_CLUSTER_SIZE:-3}"
[[ "$SIZE" =~ ^[123]$ ]] || { echo "cluster.sh: JELOU_CLUSTER_SIZE must be 1, 2 or 3" >&2; exit 2; }
read -r -a NODES <<<"$(seq -s ' ' 1 "$SIZE")"
RMQ_HOME_DIR=/var/lib/rabbitmq # where the shared .erlang.cookie is
START_TIMEOUT_SECS=120

# The RabbitMQ scripts proper. /usr/sbin/rabbitmq-server is a Debian wrapper that, run
# as rabbitmq, sends the output to the shared broker's /var/log/rabbitmq/startup_log.
if [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
  RMQ_BIN=/usr/lib/rabbitmq/bin
else
  RMQ_BIN="$(dirname "$(command -v rabbitmq-server)")"
fi

die() {
  echo "cluster.sh: $*" >&2
  exit 1
}

# Runs a command as the rabbitmq user, with the home directory that holds the cookie.
as_rabbitmq() {
  if [[ "$(id -u)" == "$(id -u rabbitmq)" ]]; then
    env HOME="$RMQ_HOME_DIR" "$@"
  elif [[ "$(id -u)" == 0 ]]; then
    runuser -u rabbitmq -- env HOME="$RMQ_HOME_DIR" "$@"
  else
    die "run me as root or as the rabbitmq user (the nodes must share its Erlang cookie)"
  fi
}

node_name() { echo "c$1@localhost"; }
amqp_port() { echo $((5680 + $1)); }
dist_port() { echo $((25680 + $1)); }
node_dir() { echo "$DIR/c$1"; }
pid_file() { echo "$(node_dir "$1")/c$1.pid"; }

check_n() {
  [[ "${1:-}" =~ ^[123]$ ]] || die "expected a node number 1, 2 or 3, got '${1:-}'"
}

ctl() {
  local n="$1"
  shift
  # Bounded: rabbitmqctl waits forever on a frozen (SIGSTOPped) node.
  (cd "$RMQ_HOME_DIR" && as_rabbitmq timeout "${CTL_TIMEOUT_SECS:-60}" \
    "$RMQ_BIN/rabbitmqctl" -q -n "$(node_name "$n")" "$@")
}

# True if $1 is a live process that is node cN: not the shared broker, not a pid reused
# by something else. The node name is not on a 3.10 node's command line, but it is in
# the environment it was started with.
is_node_pid() {
  local pid="$1" n="$2"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ -r "/proc/$pid/environ" ]] || return 1
  tr '\0' '\n' 2>/dev/null <"/proc/$pid/environ" | grep -qx "RABBITMQ_NODENAME=$(node_name "$n")"
}

# The pid of node cN, found from its pid file or, for a node whose folder was removed
# while it ran, from the owner of its distribution port; empty if it is not running.
find_pid() {
  local n="$1" pid=""
  if [[ -f "$(pid_file "$n")" ]]; then
    pid="$(tr -dc '0-9' <"$(pid_file "$n")")"
    if is_node_pid "$pid" "$n"; then
      echo "$pid"
      return 0
    fi
  fi
  pid="$(ss -Hltnp "sport = :$(dist_port "$n")" 2>/dev/null | grep -o 'pid=[0-9]*' | head -1 | cut -d= -f2 || true)"
  if [[ -n "$pid" ]] && is_node_pid "$pid" "$n"; then
    echo "$pid"
  fi
}

kill_node() {
  local n="$1" pid
  pid="$(find_pid "$n")"
  [[ -z "$pid" ]] && return 0
  # A frozen (SIGSTOPped) node must be able to die too.
  kill -CONT "$pid" 2>/dev/null || true
  kill -9 "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    [[ -d "/proc/$pid" ]] || return 0
    sleep 0.1
  done
  die "node $(node_name "$n") (pid $pid) did not exit after kill -9"
}

write_node_files() {
  local n="$1" d
  d="$(node_dir "$n")"
  mkdir -p "$d/mnesia" "$d/log"
  cat >"$d/rabbitmq.conf" <<EOF
# Node $(node_name "$n") of the jelou-worker test cluster (scripts/cluster.sh).
listeners.tcp.local = 127.0.0.1:$(amqp_port "$n")
loopback_users.guest = true
# A node cut off for longer than net_ticktime (60 s), e.g. frozen that long, leaves a
# partition behind; autoheal restarts the losing side once all nodes see each other
# again, so the throwaway cluster mends itself.
cluster_partition_handling = autoheal
log.console = false
log.file.level = info
EOF
  echo '[].' >"$d/enabled_plugins"
  # Replaces /etc/rabbitmq/rabbitmq-env.conf, which names the shared broker.
  cat >"$d/rabbitmq-env.conf" <<'EOF'
ERL_EPMD_ADDRESS=127.0.0.1
export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"
EOF
}

start_node() {
  local n="$1" d
  d="$(node_dir "$n")"
  rm -f "$(pid_file "$n")"
  (
    cd "$d"
    as_rabbitmq env \
      RABBITMQ_NODENAME="$(node_name "$n")" \
      RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
      RABBITMQ_NODE_PORT="$(amqp_port "$n")" \
      RABBITMQ_DIST_PORT="$(dist_port "$n")" \
      RABBITMQ_MNESIA_BASE="$d/mnesia" \
      RABBITMQ_LOG_BASE="$d/log" \
      RABBITMQ_PID_FILE="$(pid_file "$n")" \
      RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
      RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
      RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" \
      RABBITMQ_CONF_ENV_FILE="$d/rabbitmq-env.conf" \
      "$RMQ_BIN/rabbitmq-server" -detached >"$d/log/startup.out" 2>&1
  ) || die "rabbitmq-server for $(node_name "$n") failed: $(cat "$d/log/startup.out")"
}

# Waits until node cN runs RabbitMQ (the app, not just the Erlang VM).
await_node() {
  local n="$1" deadline=$((SECONDS + START_TIMEOUT_SECS))
  until ctl "$n" await_startup --timeout 10 >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then
      echo "--- last lines of $(node_dir "$n")/log:" >&2
      tail -n 30 "$(node_dir "$n")"/log/*.log >&2 2>/dev/null || true
      die "$(node_name "$n") did not start within ${START_TIMEOUT_SECS} s"
    fi
    sleep 0.5
  done
}

running_nodes() {
  ctl "$1" eval 'rabbit_nodes:all_running().' 2>/dev/null | tr -dc 'a-z0-9@,' | tr ',' '\n' | sort | tr '\n' ' '
}

# "c1@localhost c2@localhost ... " for the nodes of this cluster, as running_nodes prints.
all_nodes() {
  local n
  for n in "${NODES[@]}"; do printf '%s ' "$(node_name "$n")"; done
}

await_clustered() {
  local deadline=$((SECONDS + 60)) want
  want="$(all_nodes)"
  until [[ "$(running_nodes 1)" == "$want" ]]; do
    ((SECONDS > deadline)) && die "the cluster did not form: c1 sees '$(running_nodes 1)'"
    sleep 0.5
  done
}

cmd_stop() {
  # All three, whatever JELOU_CLUSTER_SIZE says: a leftover may be of another size.
  for n in 1 2 3; do kill_node "$n"; done
  rm -rf "$DIR"
}

cmd_start() {
  command -v "$RMQ_BIN/rabbitmq-server" >/dev/null || die "rabbitmq-server not found"
  id rabbitmq >/dev/null 2>&1 || die "there is no rabbitmq user"
  # A leftover cluster from an interrupted run is stopped first.
  cmd_stop
  mkdir -p "$DIR"
  for n in "${NODES[@]}"; do write_node_files "$n"; done
  chown -R rabbitmq:rabbitmq "$DIR" 2>/dev/null || true
  as_rabbitmq test -w "$DIR" || die "$DIR is not writable by the rabbitmq user (JELOU_CLUSTER_DIR)"
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in "${NODES[@]}"; do await_node "$n"; done
  for n in "${NODES[@]:1}"; do
    ctl "$n" stop_app >/dev/null
    # join_cluster prints harmless feature-flag errors on 3.10; its exit status counts.
    ctl "$n" join_cluster "$(node_name 1)" >"$(node_dir "$n")/log/join.out" 2>&1 ||
      die "$(node_name "$n") could not join: $(cat "$(node_dir "$n")/log/join.out")"
    ctl "$n" start_app >/dev/null
    await_node "$n"
  done
  await_clustered
  echo "cluster up: $(cmd_url)"
}

cmd_revive() {
  local n="$1"
  [[ -d "$(node_dir "$n")" ]] || die "no cluster in $DIR: run start"
  if [[ -z "$(find_pid "$n")" ]]; then
    start_node "$n"
  fi
  await_node "$n"
  await_clustered
}

# Exit status 0 only when all the nodes run and each sees all of them.
cmd_status() {
  local code=0 want
  want="$(all_nodes)"
  for n in "${NODES[@]}"; do
    local pid
    pid="$(find_pid "$n")"
    if [[ -n "$pid" ]]; then
      local state view
      state="$(ps -o state= -p "$pid" | tr -d ' ')"
      # A frozen node (state T) cannot answer rabbitmqctl.
      if [[ "$state" == T ]]; then
        view="(frozen)"
      else
        view="$(CTL_TIMEOUT_SECS=15 running_nodes "$n")"
      fi
      echo "$(node_name "$n") pid $pid amqp 127.0.0.1:$(amqp_port "$n") state $state sees: $view"
      [[ "$view" == "$want" ]] || code=1
    else
      echo "$(node_name "$n") not running"
      code=1
    fi
  done
  return $code
}

cmd_url() {
  local urls=()
  for n in "${NODES[@]}"; do urls+=("amqp://guest:guest@127.0.0.1:$(amqp_port "$n")/%2f"); done
  (IFS=,; echo "${urls[*]}")
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  url) cmd_url ;;
  port) check_n "${2:-}"; amqp_port "$2" ;;
  pid)
    check_n "${2:-}"
    pid="$(find_pid "$2")"
    [[ -n "$pid" ]] || die "$(node_name "$2") is not running"
    echo "$pid"
    ;;
  revive) check_n "${2:-}"; cmd_revive "$2" ;;
  ctl) check_n "${2:-}"; n="$2"; shift 2; ctl "$n" "$@" ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
