#!/usr/bin/env bash
# Several coordinators, real faults: 3 coordinators and 3 agents on one nats-server, one
# run of N tasks of W ms; the coordinator that owns the run is SIGKILLed K times (each
# replaced by a new one) and SIGSTOPped once past its lease (then SIGCONT). The run must
# end with the exact sum, the `run` client must never fail, and the agents must have
# started each call once (a handful more allowed for attempts whose agent also died:
# none here). Prints the failover time of each fault: from the signal to the log line
# of the coordinator that took the run over.
#
#   scripts/ha_faults.sh [--n 20000] [--work-ms 5] [--kills 2] [--stops 1] [--port 4335]
#
# For the failover distribution (docs/benchmarks.md): --n 400000 --kills 20 --stops 0
set -euo pipefail
cd "$(dirname "$0")/.."

n=20000 work_ms=5 kills=2 stops=1 port=4335
while [ $# -gt 0 ]; do
  case "$1" in
    --n) n=$2; shift 2 ;;
    --work-ms) work_ms=$2; shift 2 ;;
    --kills) kills=$2; shift 2 ;;
    --stops) stops=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

. scripts/lib.sh
nats=$(require_nats)
cargo build --release --example parallel_flow >&2
bin=target/release/examples/parallel_flow
work=$(mktemp -d)
export NATS_URL="nats://127.0.0.1:$port" PINAZU_CACHE_DIR="$work/cache"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -CONT "$p" 2>/dev/null || true; kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
log() { printf '[%s] %s\n' "$(date +%H:%M:%S.%3N)" "$*"; }
now_ms() { date +%s%3N; }

"$nats" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
pids+=("$!"); disown
sleep 0.5

coords=0
start_coordinator() {
  coords=$((coords + 1))
  "$bin" coordinator >"$work/coordinator-$coords.log" 2>&1 &
  pids+=("$!"); disown
}
for _ in 1 2 3; do start_coordinator; done
for i in 1 2 3; do
  "$bin" agent --agent-id "agent-$i" --slots 16 >"$work/agent-$i.log" 2>&1 &
  pids+=("$!"); disown
done
for _ in $(seq 1 100); do
  [ "$("$bin" agents --json 2>/dev/null | grep -o agent_id | wc -l)" -ge 3 ] && break
  sleep 0.2
done

id=$(cat /proc/sys/kernel/random/uuid)
"$bin" run --no-progress --flow-run-id "$id" --n="$n" --work-ms="$work_ms" >"$work/run.out" 2>"$work/run.err" &
run_pid=$!
log "run $id: $n tasks of $work_ms ms, 3 coordinators, 3 agents x 16 slots"

# the owner (coordinator id) of the run, as `status` says; empty while none answers
owner() {
  "$bin" status "$id" --json 2>/dev/null | python3 -c 'import json,sys
try: print(json.load(sys.stdin).get("owner") or "")
except Exception: print("")' || true
}
# the pid of a coordinator, by its id in the logs
pid_of() {
  local f
  f=$(grep -l "coordinator lease taken coordinator=\"$1\"" "$work"/coordinator-*.log | head -n1)
  [ -n "$f" ] || return 1
  # the process whose stderr is that log
  for p in "${pids[@]}"; do
    [ "$(readlink "/proc/$p/fd/2" 2>/dev/null)" = "$f" ] && { echo "$p"; return 0; }
  done
  return 1
}
completed() {
  "$bin" status "$id" --json 2>/dev/null | python3 -c 'import json,sys
try: print(json.load(sys.stdin)["completed"])
except Exception: print("?")' || true
}

times=()
# takeovers logged so far, and the time (ms) of the last one
takeovers() { cat "$work"/coordinator-*.log | grep -c "took over runs" || true; }
last_takeover_ms() {
  local ts
  ts=$(cat "$work"/coordinator-*.log | grep "took over runs" | sort | tail -n1 | cut -d' ' -f1)
  date -d "$ts" +%s%3N
}
fault() { # kill|stop
  local o p t0 o2 t before
  for _ in $(seq 1 100); do o=$(owner); [ -n "$o" ] && break; sleep 0.1; done
  p=$(pid_of "$o") || { log "cannot find the owner's process ($o)"; return 1; }
  before=$(takeovers)
  t0=$(now_ms)
  if [ "$1" = kill ]; then
    kill -9 "$p"
    log "completed $(completed): SIGKILL owner $o (pid $p)"
  else
    kill -STOP "$p"
    log "completed $(completed): SIGSTOP owner $o (pid $p)"
  fi
  # owned again: a coordinator logged that it took the run over (its log time)
  while :; do
    if [ "$(takeovers)" -gt "$before" ]; then o2=$(owner); break; fi
    if ! kill -0 "$run_pid" 2>/dev/null; then
      log "the run ended (before or while it was taken over)"
      [ "$1" = stop ] && kill -CONT "$p"
      return 0
    fi
    if [ $(( $(now_ms) - t0 )) -gt 30000 ]; then log "no new owner within 30 s"; return 1; fi
    sleep 0.05
  done
  t=$(( $(last_takeover_ms) - t0 ))
  times+=("$t")
  log "owned again by $o2 after $t ms"
  if [ "$1" = kill ]; then
    start_coordinator
  else
    sleep 1
    kill -CONT "$p"
    log "SIGCONT $o: it must let the run go"
  fi
}

sleep 2
for _ in $(seq 1 "$kills"); do fault kill; sleep 1.5; done
for _ in $(seq 1 "$stops"); do fault stop; sleep 1.5; done

wait "$run_pid" || { log "the run client failed:"; cat "$work/run.err" >&2; exit 1; }
line=$(tail -n1 "$work/run.out")
echo "$line"
expected=$(python3 -c "print(sum(i*i for i in range($n)))")
got=$(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["result"])')
executions=$(echo "$line" | python3 -c 'import json,sys; print(json.load(sys.stdin)["stats"]["executions"])')
starts=$(cat "$work"/agent-*.log | grep -c "attempt started" || true)
log "result $got (expected $expected); stats.executions $executions; attempt starts in the agents' logs $starts (calls: $n)"
python3 - "${times[@]}" <<'EOF'
import sys
t = sorted(int(x) for x in sys.argv[1:])
if t:
    q = lambda p: t[min(len(t) - 1, int(round(p * (len(t) - 1))))]
    print(f"failover ms over {len(t)} faults: min {t[0]}, p50 {q(0.5)}, p99 {q(0.99)}, max {t[-1]}")
EOF
fail=0
[ "$got" = "$expected" ] || { log "WRONG RESULT"; fail=1; }
[ "$starts" -ge "$n" ] && [ "$starts" -le $((n + 5)) ] || { log "attempt starts $starts for $n calls"; fail=1; }
if grep -q "lets it go\|lease lapsed" "$work"/coordinator-*.log || [ "$stops" = 0 ]; then :; else
  log "the stopped coordinator did not let go"; fail=1
fi
[ "$fail" = 0 ] && log "OK" || { log "logs in $work"; trap - EXIT; cleanup; exit 1; }
