#!/usr/bin/env bash
# A coordinator that runs for months must not grow with the runs it has seen (issue 10):
# 20,000 short runs (one task each, 32 at once) through one coordinator with the
# JetStream journal, its resident memory printed every 1,000 runs. The growth that
# counts is from 2,000 runs (warmed up, the recent-runs set full) to the end.
#
#   scripts/runs_soak.sh [--runs 20000] [--concurrency 32] [--port 4447] [-- COORDINATOR ARGS]
#   (e.g. `-- --no-journal`: runs end 10x faster, and at most 4,000 ended runs are kept)
set -euo pipefail
cd "$(dirname "$0")/.."
port=4447 count=20000 concurrency=32
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --runs) count=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
nats=$(require_nats)
cargo build --release --example bench --example runs_soak >&2
bin=target/release/examples/bench
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

"$nats" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >/dev/null 2>&1 & pids+=($!)
sleep 0.4
export NATS_URL="nats://127.0.0.1:$port" PINAZU_CACHE_DIR="$work/cache"
"$bin" coordinator "$@" >"$work/coordinator.log" 2>&1 & coord=$!; pids+=("$coord")
"$bin" agent --agent-id soak-1 --slots 64 >/dev/null 2>&1 & pids+=($!)
for _ in $(seq 1 100); do
  [ "$("$bin" agents --json 2>/dev/null | grep -o agent_id | wc -l)" -ge 1 ] && break
  sleep 0.05
done
target/release/examples/runs_soak "$NATS_URL" "$coord" "$count" "$concurrency" | tee "$work/rss.jsonl"
python3 - "$work/rss.jsonl" "$count" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
at = {r["runs"]: r["rss_kib"] for r in rows}
base = at.get(2000, rows[0]["rss_kib"])
end = rows[-1]["rss_kib"]
secs = rows[-1].get("seconds", 0)
print(f"coordinator RSS: {at[0]/1024:.1f} MiB at start, {base/1024:.1f} MiB after 2,000 runs, "
      f"{end/1024:.1f} MiB after {rows[-1]['runs']:,} runs: growth {(end-base)/1024:+.1f} MiB "
      f"({(end-base)*1024/max(1,rows[-1]['runs']-2000):.0f} B per run) in {secs:.0f} s")
PY
