#!/usr/bin/env bash
# Runs examples/long_flow on a local cluster and breaks things underneath it: an agent
# SIGKILLed (and replaced), the coordinator SIGKILLed and restarted, nats-server killed and
# restarted on its JetStream store. The run must still end with the same checksum as a
# clean embedded run.
#
#   scripts/long_flow_faults.sh [--stages 12] [--width 200] [--work-ms 50] [--port 4333]
set -euo pipefail
cd "$(dirname "$0")/.."

stages=12 width=200 work_ms=50 port=4333
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) stages=$2; shift 2 ;;
    --width) width=$2; shift 2 ;;
    --work-ms) work_ms=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

. scripts/lib.sh
nats=$(require_nats)

cargo build --release --example long_flow
bin=target/release/examples/long_flow
work=$(mktemp -d)
export NATS_URL="nats://127.0.0.1:$port" PINAZU_CACHE_DIR="$work/cache" PINAZU_JOURNAL_DIR="$work/journal"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

expected=$(env -u NATS_URL "$bin" --no-journal --stages="$stages" --width="$width" --work-ms=0 2>/dev/null | tail -n1 | sed -E 's/.*"result":([0-9]+).*/\1/')
log "expected checksum (clean embedded run): $expected"

# (disown: no "Killed" notices from the shell when the faults hit)
start_nats() { "$nats" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >>"$work/nats.log" 2>&1 & nats_pid=$!; disown; pids+=("$nats_pid"); sleep 0.5; }
start_coordinator() { "$bin" coordinator >>"$work/coordinator.log" 2>&1 & coord_pid=$!; disown; pids+=("$coord_pid"); }
start_agent() { "$bin" agent --agent-id "$1" --slots 4 >>"$work/$1.log" 2>&1 & eval "agent_$2=$!"; disown; pids+=("$!"); }

start_nats
start_coordinator
start_agent agent-1 1; start_agent agent-2 2; start_agent agent-3 3
sleep 1.5
id=$(cat /proc/sys/kernel/random/uuid)
"$bin" run --detach --flow-run-id "$id" --stages="$stages" --width="$width" --work-ms="$work_ms" >/dev/null
log "submitted run $id ($stages stages x $width tasks x $work_ms ms)"
status() { "$bin" status "$id" --json 2>/dev/null | sed -E 's/.*"completed":([0-9]+).*/\1/' || echo "?"; }

sleep 2;  log "completed $(status); SIGKILL agent-1";        kill -9 "$agent_1"; start_agent agent-4 4
sleep 2;  log "completed $(status); SIGKILL the coordinator"; kill -9 "$coord_pid"; sleep 1; start_coordinator
sleep 2;  log "completed $(status); restart nats-server";     kill -9 "$nats_pid"; sleep 1; start_nats
sleep 2;  log "completed $(status); SIGKILL agent-2 and the coordinator together"
kill -9 "$agent_2" "$coord_pid"; sleep 1; start_coordinator; start_agent agent-5 5

log "waiting for the run to end"
line=$("$bin" run --flow-run-id "$id" --stages="$stages" --width="$width" --work-ms="$work_ms" 2>/dev/null | tail -n1)
echo "$line"
got=$(echo "$line" | sed -E 's/.*"result":([0-9]+).*/\1/')
if [ "$got" = "$expected" ]; then
  log "OK: checksum $got matches the clean run"
else
  log "MISMATCH: got $got, expected $expected (logs in $work)"; trap - EXIT; cleanup; exit 1
fi
