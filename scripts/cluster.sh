#!/usr/bin/env bash
# A local cluster for demos and benchmarks: nats-server, one coordinator and N agents of
# one example app, all on this machine.
#
#   scripts/cluster.sh start [--app parallel_flow] [--agents 3] [--slots 64] [--port 4222] [--build]
#   scripts/cluster.sh stop
#   scripts/cluster.sh status
#
# The app is built (release) only when its binary is missing, or with --build. Logs,
# pids, the JetStream store and the cache go to $PINAZU_CLUSTER_DIR (default
# ${TMPDIR:-/tmp}/pinazu-cluster-<uid>), not into the repository. `stop` stops the
# agents first and waits for them to drain (they hand their last results to the
# coordinator), then the coordinator, then nats-server.
set -euo pipefail
cd "$(dirname "$0")/.."

state=${PINAZU_CLUSTER_DIR:-${TMPDIR:-/tmp}/pinazu-cluster-$(id -u)}
cmd=${1:-}
shift || true
app=parallel_flow agents=3 slots=64 port=4222 build=0
while [ $# -gt 0 ]; do
  case "$1" in
    --app) app=$2; shift 2 ;;
    --agents) agents=$2; shift 2 ;;
    --slots) slots=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    --build) build=1; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

. scripts/lib.sh

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# TERM the processes of these pid files, then wait up to $2 seconds for them to exit
stop_group() {
  local pattern=$1 wait_s=$2 f left
  for f in $pattern; do
    [ -f "$f" ] && alive "$f" && kill -TERM "$(cat "$f")" 2>/dev/null || true
  done
  for _ in $(seq 1 $((wait_s * 10))); do
    left=0
    for f in $pattern; do [ -f "$f" ] && alive "$f" && left=1; done
    [ $left -eq 0 ] && break
    sleep 0.1
  done
  for f in $pattern; do
    if [ -f "$f" ] && alive "$f"; then
      echo "$(basename "$f" .pid) did not stop in ${wait_s}s; killing it" >&2
      kill -KILL "$(cat "$f")" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

stop() {
  [ -d "$state" ] || { echo "no cluster running"; return 0; }
  # agents first: they finish what runs and hand their results to the coordinator (up
  # to their drain timeout, 30 s), which needs the coordinator and NATS up
  stop_group "$state/agent-*.pid" 40
  stop_group "$state/coordinator.pid" 20
  stop_group "$state/nats.pid" 10
  echo "cluster stopped (logs in $state/)"
}

case "$cmd" in
  start)
    if alive "$state/nats.pid"; then echo "a cluster is already running (scripts/cluster.sh stop)" >&2; exit 1; fi
    nats=$(require_nats)
    bin=target/release/examples/$app
    if [ "$build" = 1 ] || ! [ -x "$bin" ]; then
      cargo build --release --example "$app"
    fi
    mkdir -p "$state/js"
    export NATS_URL="nats://127.0.0.1:$port" PINAZU_CACHE_DIR="$state/cache" PINAZU_JOURNAL_DIR="$state/journal"
    "$nats" -a 127.0.0.1 -p "$port" -js -sd "$state/js" >"$state/nats.log" 2>&1 &
    echo $! >"$state/nats.pid"
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
    "$bin" coordinator >"$state/coordinator.log" 2>&1 &
    echo $! >"$state/coordinator.pid"
    for i in $(seq 1 "$agents"); do
      "$bin" agent --agent-id "agent-$i" --slots "$slots" >"$state/agent-$i.log" 2>&1 &
      echo $! >"$state/agent-$i.pid"
    done
    for _ in $(seq 1 100); do
      n=$("$bin" agents --json 2>/dev/null | grep -o '"agent_id"' | wc -l || true)
      [ "$n" -ge "$agents" ] && break
      sleep 0.1
    done
    "$bin" agents
    echo
    "$bin" --list
    echo
    echo "cluster up (logs in $state/): export NATS_URL=$NATS_URL"
    echo "then: $bin run [FLOW] --PARAM=VALUE ...   (the flows and their parameters are above)"
    ;;
  stop) stop ;;
  status)
    for f in "$state"/*.pid; do
      [ -f "$f" ] || continue
      name=$(basename "$f" .pid)
      if alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: stopped"; fi
    done
    ;;
  *) echo "usage: scripts/cluster.sh start|stop|status [--app APP] [--agents N] [--slots N] [--port P]" >&2; exit 2 ;;
esac
