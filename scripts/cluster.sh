#!/usr/bin/env bash
# A local cluster for demos and benchmarks: nats-server, one coordinator and N agents of
# one example app, all on this machine.
#
#   scripts/cluster.sh start [--app parallel_flow] [--agents 3] [--slots 4] [--port 4222]
#   scripts/cluster.sh stop
#   scripts/cluster.sh status
#
# Logs and pids go to .pinazu/cluster/. After `start`, run flows with e.g.
#   NATS_URL=nats://127.0.0.1:4222 target/release/examples/parallel_flow run --n=20000
set -euo pipefail
cd "$(dirname "$0")/.."

state=.pinazu/cluster
cmd=${1:-}
shift || true
app=parallel_flow agents=3 slots=4 port=4222
while [ $# -gt 0 ]; do
  case "$1" in
    --app) app=$2; shift 2 ;;
    --agents) agents=$2; shift 2 ;;
    --slots) slots=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

. scripts/lib.sh

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  [ -d "$state" ] || { echo "no cluster running"; return 0; }
  # agents first (they drain), then the coordinator, then the server
  for f in "$state"/agent-*.pid "$state"/coordinator.pid "$state"/nats.pid; do
    [ -f "$f" ] || continue
    if alive "$f"; then kill -TERM "$(cat "$f")" 2>/dev/null || true; fi
  done
  for _ in $(seq 1 100); do
    left=0
    for f in "$state"/*.pid; do [ -f "$f" ] && alive "$f" && left=1; done
    [ $left -eq 0 ] && break
    sleep 0.1
  done
  for f in "$state"/*.pid; do
    [ -f "$f" ] && alive "$f" && kill -KILL "$(cat "$f")" 2>/dev/null || true
    rm -f "$f"
  done
  echo "cluster stopped"
}

case "$cmd" in
  start)
    if alive "$state/nats.pid"; then echo "a cluster is already running (scripts/cluster.sh stop)" >&2; exit 1; fi
    nats=$(require_nats)
    cargo build --release --example "$app"
    bin=target/release/examples/$app
    mkdir -p "$state/js"
    export NATS_URL="nats://127.0.0.1:$port" PINAZU_CACHE_DIR="$PWD/.pinazu/cache"
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
    echo "cluster up: export NATS_URL=$NATS_URL"
    echo "then: $bin run --n=20000    (logs in $state/)"
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
