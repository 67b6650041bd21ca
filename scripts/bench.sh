#!/usr/bin/env bash
# The benchmark: workloads W1-W4 of ../shared/workloads.md, embedded and distributed
# (one nats-server, one coordinator, two agents on loopback), journal off and on; prints
# one JSON line per figure and a Markdown table. Takes under two minutes after the build.
#
#   scripts/bench.sh [--port 4444] [--runs 3]   (the dashboard on 127.0.0.1:18299)
set -euo pipefail
cd "$(dirname "$0")/.."
port=4444 runs=3 hport=18299
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
nats=$(require_nats)
cargo build --release --example bench >&2
bin=target/release/examples/bench
work=$(mktemp -d)
out="$work/results.jsonl"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# peak RSS (VmHWM) of a pid, in MiB
rss() { awk '/VmHWM/ {printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo 0; }

# run MODE LABEL FLOW ARGS... : best-of-N median; one JSON line per run kept
measure() {
  local mode=$1 label=$2; shift 2
  # one warm-up run, not recorded (first runs pay for allocator growth, the payload
  # directory, connection set-up); then the measured runs
  local first=0
  [ "$label" = W3 ] && first=1 # 10 s of sleeps: nothing to warm up
  for i in $(seq "$first" "$runs"); do
    local line
    if [[ "$mode" == embedded* ]]; then
      # (default settings keep the local journal, in the work directory)
      local jn=(--no-journal); [ "$mode" = embedded-default ] && jn=()
      line=$(env -u NATS_URL PINAZU_JOURNAL_DIR="$work/journal" "$bin" "${jn[@]}" --no-progress "$@" 2>/dev/null | tail -n1)
    else
      line=$(NATS_URL="nats://127.0.0.1:$port" "$bin" run --no-progress "$@" 2>/dev/null | tail -n1)
    fi
    [ "$i" -gt 0 ] && echo "{\"mode\":\"$mode\",\"label\":\"$label\",\"run\":$i,\"line\":$line}" >>"$out"
  done
  return 0
}

start_cluster() { # SLOTS(N|default) JOURNAL(on|off)
  local slots=$1 journal=$2 jflag="" sflag=()
  [ "$slots" != default ] && sflag=(--slots "$slots")
  [ "$journal" = off ] && jflag="--no-journal"
  rm -rf "$work/js"
  "$nats" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >/dev/null 2>&1 & nats_pid=$!; pids+=("$nats_pid")
  sleep 0.4
  export NATS_URL="nats://127.0.0.1:$port" PINAZU_CACHE_DIR="$work/cache"
  "$bin" coordinator $jflag --http "127.0.0.1:$hport" >"$work/coordinator.log" 2>&1 & coord_pid=$!; pids+=("$coord_pid")
  "$bin" agent --agent-id bench-1 "${sflag[@]}" >/dev/null 2>&1 & a1=$!; pids+=("$a1")
  "$bin" agent --agent-id bench-2 "${sflag[@]}" >/dev/null 2>&1 & a2=$!; pids+=("$a2")
  for _ in $(seq 1 100); do
    [ "$("$bin" agents --json 2>/dev/null | grep -o agent_id | wc -l)" -ge 2 ] && break
    sleep 0.05
  done
  unset NATS_URL
}
stop_cluster() { kill -9 "$a1" "$a2" "$coord_pid" "$nats_pid" 2>/dev/null || true; sleep 0.3; }

echo "embedded..." >&2
measure embedded W1 --flow w1_fanout --n=10000 --agents=2 --slots=256
measure embedded-limit-1000 W1 --flow w1_limited --n=10000 --agents=2 --slots=256
measure embedded W2 --flow w2_chain --n=300 --agents=2 --slots=4
measure embedded W3 --flow w3_sleepy --n=400 --ms=50 --total-slots=2 --agents=1 --slots=2
measure embedded W4 --flow w4_payload --n=50 --bytes=1048576 --agents=2 --slots=16

echo "distributed, journal off..." >&2
start_cluster 512 off
measure distributed W1 w1_fanout --n=10000
measure distributed-limit-1000 W1 w1_limited --n=10000
echo "{\"rss\":{\"nats\":$(rss $nats_pid),\"coordinator\":$(rss $coord_pid),\"agent1\":$(rss $a1),\"agent2\":$(rss $a2)}}" >>"$out"
measure distributed W2 w2_chain --n=300
measure distributed W4 w4_payload --n=50 --bytes=1048576
stop_cluster
start_cluster 1 off
measure distributed W3 w3_sleepy --n=400 --ms=50 --total-slots=2
stop_cluster

echo "distributed, journal on (JetStream)..." >&2
start_cluster 512 on
measure distributed-journal W1 w1_fanout --n=10000
measure distributed-journal W2 w2_chain --n=300
# the same W1 with the dashboard open on the running run and /metrics scraped: once a
# second, what an open run page asks (its live event: the run and the table's counts;
# a screen of rows; the timeline) and a Prometheus scrape
dash_poll() {
  local h="http://127.0.0.1:$hport" id
  while :; do
    id=$(curl -s "$h/api/runs?status=RUNNING&limit=1" | grep -o '"flow_run_id":"[^"]*"' | head -1 | cut -d'"' -f4)
    if [ -n "$id" ]; then
      curl -s "$h/api/runs/$id" >/dev/null
      curl -s "$h/api/runs/$id/calls?limit=1&offset=1000000000" >/dev/null
      curl -s "$h/api/runs/$id/calls?limit=40" >/dev/null
      curl -s "$h/api/runs/$id/calls?limit=1&offset=1000000000&width=1000" >/dev/null
    fi
    curl -s "$h/metrics" >/dev/null
    sleep 1
  done
}
# (100,000 calls: a 10,000-call W1 ends before a poller sees it)
measure distributed-journal-100k W1 w1_fanout --n=100000
dash_poll & poll_pid=$!; pids+=("$poll_pid")
measure distributed-journal-dashboard W1 w1_fanout --n=100000
kill "$poll_pid" 2>/dev/null || true
stop_cluster

# default settings: what a user gets with no flags (embedded: an agent per core, 4 slots
# each; distributed: the JetStream journal, two agents of 64 slots) -- issue 13's rows
echo "default settings..." >&2
measure embedded-default W1 --flow w1_fanout --n=10000
measure embedded-default W2 --flow w2_chain --n=300
start_cluster default on
measure distributed-default W1 w1_fanout --n=10000
measure distributed-default W2 w2_chain --n=300
# the floor under W2: one NATS request/reply round trip, coordinator to agent
measure nats-floor W2 nats_floor --n=1000 --agent=bench-1
measure distributed-default W4 w4_payload --n=50 --bytes=1048576
stop_cluster
# the big run: 1,000,000 calls in one flow (10,000 in flight), once, on a fresh cluster;
# the coordinator's peak RSS with it
start_cluster default on
line=$(NATS_URL="nats://127.0.0.1:$port" "$bin" run --no-progress w1_big --n=1000000 2>/dev/null | tail -n1)
echo "{\"mode\":\"distributed-default-1M\",\"label\":\"W1\",\"run\":1,\"line\":$line}" >>"$out"
echo "{\"big\":{\"coordinator_rss_mib\":$(rss $coord_pid)}}" >>"$out"
stop_cluster

# the S3 cache on (s3s-fs on loopback), when s3s-fs is installed: W1 twice under one run id
# with ENABLE_S3_CACHING=true; the second run is all cache hits
s3s="${S3S_FS_BIN:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}"
if [ -x "$s3s" ]; then
  echo "embedded with the S3 cache..." >&2
  s3port=$((port + 1))
  mkdir -p "$work/s3/flow-cache-bucket"
  "$s3s" --host 127.0.0.1 --port "$s3port" --access-key benchAK --secret-key benchSECRETKEY "$work/s3" >/dev/null 2>&1 & pids+=("$!")
  sleep 0.5
  for i in $(seq 1 "$runs"); do
    rid=$(cat /proc/sys/kernel/random/uuid)
    for pass in first second; do
      line=$(env -u NATS_URL ENABLE_S3_CACHING=true FLOW_RUN_ID="$rid" AWS_ACCESS_KEY_ID=benchAK \
        AWS_SECRET_ACCESS_KEY=benchSECRETKEY AWS_ENDPOINT_URL="http://127.0.0.1:$s3port" \
        "$bin" --no-journal --no-progress --flow w1_fanout --n=10000 --agents=2 --slots=256 2>/dev/null | tail -n1)
      echo "{\"mode\":\"embedded-s3-$pass\",\"label\":\"W1\",\"run\":$i,\"line\":$line}" >>"$out"
    done
    # the limit: bare aws-sdk-s3 PUTs then GETs, as many at once as the cache's bound
    line=$(env -u NATS_URL AWS_ACCESS_KEY_ID=benchAK AWS_SECRET_ACCESS_KEY=benchSECRETKEY \
      AWS_ENDPOINT_URL="http://127.0.0.1:$s3port" \
      "$bin" --no-journal --no-progress --flow s3_limit --n=10000 --concurrency=64 2>/dev/null | tail -n1)
    echo "{\"s3limit\":$line}" >>"$out"
  done
fi

python3 - "$out" <<'PY'
import json, statistics, sys
rows, rss, big, s3 = {}, None, None, []
for l in open(sys.argv[1]):
    d = json.loads(l)
    if "rss" in d:
        rss = d["rss"]; continue
    if "big" in d:
        big = d["big"]; continue
    if "s3limit" in d:
        s3.append((d["s3limit"].get("result") or {})); continue
    r = d["line"].get("result") or {}
    rows.setdefault((d["mode"], d["label"]), []).append(r)
def med(vals): return statistics.median(vals) if vals else float("nan")
figure = {"W1": ("tasks_per_s", "tasks/s"), "W2": ("median_us", "µs median"), "W3": ("efficiency", "efficiency"), "W4": ("mb_per_s", "MB/s")}
out = []
for (mode, label), rs in sorted(rows.items()):
    key, unit = figure[label]
    v = med([r[key] for r in rs if key in r])
    line = {"mode": mode, "workload": label, "figure": key, "value": round(v, 3), "runs": len(rs)}
    print(json.dumps(line)); out.append((mode, label, v, unit))
if rss:
    print(json.dumps({"peak_rss_mib_during_w1": rss, "total": round(sum(rss.values()), 1)}))
print()
print("| mode | W1 tasks/s | W2 µs median | W3 efficiency | W4 MB/s |")
print("|---|---|---|---|---|")
for mode in ["embedded-default", "distributed-default", "nats-floor", "distributed-default-1M", "embedded", "embedded-limit-1000", "distributed", "distributed-limit-1000", "distributed-journal", "distributed-journal-100k", "distributed-journal-dashboard", "embedded-s3-first", "embedded-s3-second"]:
    cells = []
    for w in ["W1", "W2", "W3", "W4"]:
        v = next((v for m, l, v, u in out if m == mode and l == w), None)
        if all(x is None for x in [v]) and mode.startswith("embedded-s3") and w != "W1":
            cells.append("-"); continue
        cells.append("-" if v is None else (f"{v:,.0f}" if w in ("W1", "W4") else (f"{v:.3f}" if w == "W3" else f"{v:,.0f}")))
    if any(c != "-" for c in cells):
        print(f"| {mode} | " + " | ".join(cells) + " |")
w1 = {m: v for m, l, v, u in out if l == "W1"}
if w1.get("distributed-journal-100k") and w1.get("distributed-journal-dashboard"):
    print(f"\nW1 (100,000 calls) with the dashboard open and /metrics scraped: {w1['distributed-journal-dashboard'] / w1['distributed-journal-100k']:.2f} of W1 without")
for m in ["embedded", "distributed"]:
    if w1.get(m) and w1.get(m + "-limit-1000"):
        print(f"\nW1 ({m}) with a concurrency limit of 1,000 on the task: {w1[m + '-limit-1000'] / w1[m]:.2f} of W1 without")
if big is not None and w1.get("distributed-default-1M"):
    print(f"\nThe big run (1,000,000 calls, default settings): {1e6 / w1['distributed-default-1M']:.1f} s; coordinator peak RSS {big['coordinator_rss_mib']} MiB")
if s3:
    put = med([r["put_per_s"] for r in s3 if "put_per_s" in r]); get = med([r["get_per_s"] for r in s3 if "get_per_s" in r])
    print(f"\nS3 limit (bare aws-sdk-s3, 64 at once): PUT {put:,.0f}/s, GET {get:,.0f}/s")
    for m, lim, what in [("embedded-s3-first", put, "PUT"), ("embedded-s3-second", get, "GET")]:
        if w1.get(m):
            print(f"  {m}: {w1[m]:,.0f} tasks/s = {w1[m] / lim:.2f} of the bare {what} loop")
if rss:
    print(f"\nPeak RSS during W1 (distributed, MiB): " + ", ".join(f"{k} {v}" for k, v in rss.items()) + f"; total {sum(rss.values()):.1f}")
PY
