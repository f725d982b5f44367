#!/usr/bin/env bash
# Side-by-side comparison of lorabroker, Mosquitto and nats-server's MQTT mode on the
# shapes of the performance targets (issue 4), in one run, with one command:
#
#   benches/compare.sh            # full run (a few minutes)
#   benches/compare.sh --quick    # smaller shapes, shorter runs (a smoke test)
#   benches/compare.sh --wait-quiet 20   # first wait (up to 20 min) for an idle machine
#   benches/compare.sh --report DIR      # print the table of an earlier run's results again
#
# It builds the release binaries, starts its own servers on free loopback ports (never the
# default 1883/4222/6379, so it runs beside anything else), runs `lorabroker-load` against
#   lorabroker-1   one `lorabroker serve` node (NATS + Redis), the upstream on NATS
#   lorabroker-2   two nodes on the same NATS + Redis, connections spread over both
#   mosquitto      `mosquitto -c`, anonymous, the upstream an MQTT publisher
#   nats-mqtt      `nats-server` with JetStream and `mqtt { port }`, anonymous, likewise
# and prints a Markdown table with the ratios. Every JSON line is kept in
# $OUT/results.jsonl (default: a new directory under /tmp; `--out DIR` to choose).
#
# Needs: cargo, jq, redis-server, nats-server, mosquitto (Debian: /usr/sbin).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

ARGS="$*"
QUICK=0
OUT=""
WAIT_QUIET=0
REPORT=""
while (($#)); do
  case "$1" in
    --quick) QUICK=1 ;;
    --out) OUT="$2"; shift ;;
    --wait-quiet) WAIT_QUIET="$2"; shift ;;
    --report) REPORT="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
  shift
done

# Shapes. The full run uses the targets' shapes; --quick shrinks them.
if ((QUICK)); then
  DUR=2s; LAT_DUR=2s; DEVICES=200; IDLE=2000; STORM=1000; STORM_MISS=300; ROUNDS=1; DL_RATE=1000
else
  DUR=8s; LAT_DUR=5s; DEVICES=1000; IDLE=10000; STORM=5000; STORM_MISS=2000; ROUNDS=4; DL_RATE=2000
fi
FANOUT_SUBS=10
PAYLOAD=200
LATENCY_RATE=5000 # messages/s to 10 subscribers: 50,000 deliveries/s

# Everything that starts servers and measures (skipped by --report).
measure() {
for tool in cargo jq redis-server nats-server mosquitto; do
  command -v "$tool" >/dev/null || { echo "compare.sh needs $tool on PATH" >&2; exit 1; }
done

# Many connections from one process: raise the descriptor limit as far as allowed.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "== building release binaries" >&2
cargo build --release --quiet --bin lorabroker --bin lorabroker-load
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)

WORK=$(mktemp -d /tmp/lorabroker-compare.XXXXXX)
OUT=${OUT:-$WORK}
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: >"$RESULTS"
# Private copies, so that a concurrent build cannot swap the binaries mid-run.
cp "$TARGET_DIR/release/lorabroker" "$TARGET_DIR/release/lorabroker-load" "$WORK/"
LB="$WORK/lorabroker"
LOAD="$WORK/lorabroker-load"

# What the figures were measured on; the state is sampled again before each broker.
load_state() {
  echo "$(date -u +%H:%M:%S) $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15-min load), $(pgrep -c rustc || true) rustc running"
}
if ((WAIT_QUIET)); then
  echo "== waiting up to $WAIT_QUIET min for a quiet machine (no rustc, 1-min load < 0.5)" >&2
  for _ in $(seq 1 $((WAIT_QUIET * 6))); do
    if ! pgrep -x rustc >/dev/null && awk '{ exit !($1 < 0.5) }' /proc/loadavg; then break; fi
    sleep 10
  done
fi
{
  echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(uname -sr)"
  echo "lorabroker: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' (with uncommitted changes in src/)'), $(rustc --version)"
  echo "mosquitto: $(mosquitto -h 2>/dev/null | head -n1); nats-server: $(nats-server --version); redis: $(redis-server --version | awk '{print $3}')"
  echo "command: benches/compare.sh $ARGS (ulimit -n $(ulimit -n))"
  echo "start: $(load_state)"
} | tee "$OUT/machine.txt" >&2

PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK/nats-js" "$WORK/nats-mqtt-js"
}
trap cleanup EXIT

# A free loopback port below the ephemeral range (so that no outgoing connection of the
# load generator can hold it), away from the well-known ones and from each other.
USED=" 1883 4222 6379 8080 "
EPHEMERAL_MIN=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
free_port() {
  local p
  while :; do
    p=$((10000 + RANDOM % (EPHEMERAL_MIN - 10000)))
    [[ $USED == *" $p "* ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      USED+="$p "
      echo "$p"
      return
    fi
  done
}

wait_port() { # wait_port PORT WHAT PID
  local port=$1 what=$2 pid=$3
  for _ in $(seq 1 300); do
    kill -0 "$pid" 2>/dev/null || break
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "$what did not open port $port (or exited); its log is in $OUT" >&2
  exit 1
}

stop() {
  local pid
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
}

# run CASE ARGS...: one lorabroker-load run; its JSON line goes to $RESULTS tagged with CASE.
run() {
  local case=$1; shift
  local line
  echo "-- $case: lorabroker-load $*" >&2
  if line=$("$LOAD" "$@" 2>>"$OUT/load.log"); then
    jq -c --arg case "$case" '. + {case: $case}' <<<"$line" >>"$RESULTS"
    jq -r '"   " + ([to_entries[] | select(.key|test("per_s|loss|bytes_per|cpu")) | "\(.key)=\(.value)"] | join(" "))' <<<"$line" >&2
    jq -r '"   latency p50=\(.latency_us.p50 // "-")µs p99=\(.latency_us.p99 // "-")µs"' <<<"$line" >&2
  else
    echo "   FAILED (see $OUT/load.log)" >&2
  fi
}

# scenarios LABEL PIDS CONNECT-ARGS...: every scenario against one broker (started fresh,
# so that the idle-memory run, which goes first, sees a broker that has not served yet).
scenarios() {
  local label=$1 pids=$2; shift 2
  local args=(--label "$label" --broker-pid "$pids" "$@")
  echo "$label: $(load_state)" | tee -a "$OUT/machine.txt" >&2
  sleep 1
  run idle "${args[@]}" idle --connections "$IDLE"
  run fanout "${args[@]}" fanout --subscribers "$FANOUT_SUBS" --payload "$PAYLOAD" --rate max --duration "$DUR"
  run devices "${args[@]}" devices --subscribers "$DEVICES" --payload "$PAYLOAD" --rate max --duration "$DUR"
  # Tail latency on a shared machine is noisy: three runs, the table shows the median.
  for _ in 1 2 3; do
    run latency "${args[@]}" fanout --subscribers "$FANOUT_SUBS" --payload "$PAYLOAD" \
      --rate "$LATENCY_RATE" --duration "$LAT_DUR"
  done
  run storm_hit "${args[@]}" storm --connections "$STORM" --rounds "$ROUNDS"
  if [[ $label == lorabroker* ]]; then
    run storm_miss "${args[@]}" storm --connections "$STORM_MISS" --rounds "$ROUNDS" --distinct-keys
    run downlink "${args[@]}" downlink --clients 10 --devices 100 --rate "$DL_RATE" --duration "$DUR"
  fi
}

# --- lorabroker: private Redis and NATS, then one and two nodes -------------------------
REDIS_PORT=$(free_port)
NATS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$WORK" >"$OUT/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
nats-server -js -a 127.0.0.1 -p "$NATS_PORT" -sd "$WORK/nats-js" >"$OUT/nats.log" 2>&1 &
NATS_PID=$!
PIDS+=("$NATS_PID")
wait_port "$REDIS_PORT" redis-server "$REDIS_PID"
wait_port "$NATS_PORT" nats-server "$NATS_PID"
BACKENDS=(--nats-url "nats://127.0.0.1:$NATS_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT")
# The load generator reports their CPU apart from the nodes' (--aux-pid).
AUX=(--aux-pid "$NATS_PID,$REDIS_PID")

node() { # node NAME -> starts a node, sets NODE_PID and NODE_PORT
  NODE_PORT=$(free_port)
  local http
  http=$(free_port)
  # The load comes from one address with one key, and the other brokers run without
  # limits: lorabroker's rate limits and connection quotas are off for the comparison.
  LORABROKER_LIMITS__ACCEPTS_PER_IP__PER_SECOND=0 \
  LORABROKER_LIMITS__CONNECTS_PER_KEY__PER_SECOND=0 \
  LORABROKER_LIMITS__DOWNLINKS_PER_KEY__PER_SECOND=0 \
  LORABROKER_LIMITS__DOWNLINKS_PER_APPLICATION__PER_SECOND=0 \
  LORABROKER_LIMITS__SUBSCRIBES_PER_CONNECTION__PER_SECOND=0 \
  LORABROKER_LIMITS__MAX_CONNECTIONS_PER_APPLICATION=0 \
  LORABROKER_LIMITS__MAX_CONNECTIONS_PER_KEY=0 \
  LORABROKER_LOG__LEVEL=warn "$LB" serve --mqtt-listen "127.0.0.1:$NODE_PORT" \
    --http-listen "127.0.0.1:$http" --node-name "$1" "${BACKENDS[@]}" >"$OUT/$1.log" 2>&1 &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  wait_port "$NODE_PORT" "lorabroker $1" "$NODE_PID"
}

echo "== lorabroker, one node" >&2
node lb1
scenarios lorabroker-1 "$NODE_PID" --mqtt "127.0.0.1:$NODE_PORT" "${BACKENDS[@]}" "${AUX[@]}"
stop "$NODE_PID"

echo "== lorabroker, two nodes" >&2
node lb2a
A_PID=$NODE_PID A_PORT=$NODE_PORT
node lb2b
scenarios lorabroker-2 "$A_PID,$NODE_PID" --mqtt "127.0.0.1:$A_PORT,127.0.0.1:$NODE_PORT" "${BACKENDS[@]}" "${AUX[@]}"
stop "$A_PID" "$NODE_PID"

# --- Mosquitto ----------------------------------------------------------------------------
echo "== mosquitto" >&2
MOSQ_PORT=$(free_port)
cat >"$WORK/mosquitto.conf" <<EOF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
connection_messages false
EOF
mosquitto -c "$WORK/mosquitto.conf" >"$OUT/mosquitto.log" 2>&1 &
MOSQ_PID=$!
PIDS+=("$MOSQ_PID")
wait_port "$MOSQ_PORT" mosquitto "$MOSQ_PID"
scenarios mosquitto "$MOSQ_PID" --mqtt "127.0.0.1:$MOSQ_PORT"
stop "$MOSQ_PID"

# --- nats-server in MQTT mode ---------------------------------------------------------------
echo "== nats-server MQTT" >&2
NM_PORT=$(free_port)
NM_MQTT=$(free_port)
cat >"$WORK/nats-mqtt.conf" <<EOF
listen: 127.0.0.1:$NM_PORT
server_name: lorabroker_compare
jetstream {
  store_dir: "$WORK/nats-mqtt-js"
}
mqtt {
  host: 127.0.0.1
  port: $NM_MQTT
}
EOF
nats-server -c "$WORK/nats-mqtt.conf" >"$OUT/nats-mqtt.log" 2>&1 &
NM_PID=$!
PIDS+=("$NM_PID")
wait_port "$NM_MQTT" "nats-server MQTT" "$NM_PID"
scenarios nats-mqtt "$NM_PID" --mqtt "127.0.0.1:$NM_MQTT"
stop "$NM_PID"

}

# --- the table --------------------------------------------------------------------------------
# val CASE TARGET JQ-PATH -> the figure (the median when a case ran more than once), or "-"
val() {
  jq -s -r --arg c "$1" --arg t "$2" "[.[] | select(.case == \$c and .target == \$t) | $3 | numbers]
    | sort | if length == 0 then \"-\" else .[(length - 1) / 2 | floor] end" "$RESULTS"
}
ratio() { # ratio A B -> A/B with two decimals, or "-"
  awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'
}
row() { # row TITLE CASE JQ-PATH
  local l1 l2 m n
  l1=$(val "$2" lorabroker-1 "$3"); l2=$(val "$2" lorabroker-2 "$3")
  m=$(val "$2" mosquitto "$3"); n=$(val "$2" nats-mqtt "$3")
  echo "| $1 | $l1 | $l2 | $m | $n | $(ratio "$l1" "$m") | $(ratio "$l1" "$n") |"
}

# verdict NAME VALUE OP GOAL: "met" or "missed", with the figures (OP is >= or <=).
verdict() {
  awk -v name="$1" -v v="$2" -v op="$3" -v goal="$4" 'BEGIN {
    if (v == "-" || goal == "-") { printf "- %s: not measured\n", name; exit }
    ok = (op == ">=") ? (v >= goal) : (v <= goal)
    printf "- %s: %s (lorabroker-1 %s, goal %s %.0f, %.0f%% of the goal)\n", name, ok ? "MET" : "MISSED",
      v, op, goal, (op == ">=") ? 100 * v / goal : 100 * goal / v
  }'
}
# Goals of issue 4, checked on lorabroker-1 (one node).
targets() {
  local f fm fn d dm dn p pm pn best c cm cn i
  f=$(val fanout lorabroker-1 .delivered_per_s); fm=$(val fanout mosquitto .delivered_per_s)
  fn=$(val fanout nats-mqtt .delivered_per_s)
  d=$(val devices lorabroker-1 .delivered_per_s); dm=$(val devices mosquitto .delivered_per_s)
  dn=$(val devices nats-mqtt .delivered_per_s)
  p=$(val latency lorabroker-1 .latency_us.p99); pm=$(val latency mosquitto .latency_us.p99)
  pn=$(val latency nats-mqtt .latency_us.p99)
  c=$(val storm_hit lorabroker-1 .connects_per_s); cm=$(val storm_hit mosquitto .connects_per_s)
  cn=$(val storm_hit nats-mqtt .connects_per_s)
  i=$(val idle lorabroker-1 .bytes_per_connection)
  mul() { awk -v a="$1" -v k="$2" 'BEGIN { if (a == "-") print "-"; else print a * k }'; }
  best() { awk -v a="$1" -v b="$2" -v w="$3" 'BEGIN { if (a == "-" || b == "-") print "-";
    else if (w == "max") print (a > b ? a : b); else print (a < b ? a : b) }'; }
  echo "Targets of issue 4 (lorabroker-1 against the same run's figures):"
  verdict "fan-out >= nats-mqtt" "$f" ">=" "$fn"
  verdict "fan-out >= 5x mosquitto" "$f" ">=" "$(mul "$fm" 5)"
  verdict "many devices >= nats-mqtt" "$d" ">=" "$dn"
  verdict "many devices >= 2x mosquitto" "$d" ">=" "$(mul "$dm" 2)"
  verdict "idle <= 2 KiB per connection" "$i" "<=" 2048
  verdict "storm (cached key) >= 2x the better anonymous rate" "$c" ">=" "$(mul "$(best "$cm" "$cn" max)" 2)"
  verdict "p99 at 50k deliveries/s <= half the better p99" "$p" "<=" "$(mul "$(best "$pm" "$pn" min)" 0.5)"
}

if [[ -n $REPORT ]]; then
  OUT=$REPORT
  RESULTS="$OUT/results.jsonl"
else
  measure
  echo "end: $(load_state)" >>"$OUT/machine.txt"
fi
{
  cat "$OUT/machine.txt"
  echo
  echo "| shape | lorabroker-1 | lorabroker-2 | mosquitto | nats-mqtt | lb-1 ÷ mosquitto | lb-1 ÷ nats-mqtt |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  row "fan-out, $FANOUT_SUBS subs, ${PAYLOAD} B: delivered msg/s" fanout .delivered_per_s
  row "fan-out: loss" fanout .loss
  row "fan-out: broker CPU µs per delivery" fanout .broker_cpu_us_per_delivery
  row "fan-out: NATS+Redis CPU µs per delivery (lorabroker's bus)" fanout \
    '(if .aux_cpu_s then (.aux_cpu_s * 1e8 / .delivered | round / 100) else null end)'
  row "many devices, $DEVICES subs on $DEVICES topics: delivered msg/s" devices .delivered_per_s
  row "many devices: loss" devices .loss
  row "many devices: broker CPU µs per delivery" devices .broker_cpu_us_per_delivery
  row "many devices: NATS+Redis CPU µs per delivery (lorabroker's bus)" devices \
    '(if .aux_cpu_s then (.aux_cpu_s * 1e8 / .delivered | round / 100) else null end)'
  row "latency at $((LATENCY_RATE * FANOUT_SUBS)) deliveries/s (median of 3 runs): p50 µs" latency .latency_us.p50
  row "latency at $((LATENCY_RATE * FANOUT_SUBS)) deliveries/s (median of 3 runs): p99 µs" latency .latency_us.p99
  row "latency run: loss" latency .loss
  row "connection storm, $ROUNDS×$STORM clients (cached key / anonymous): connects/s" storm_hit .connects_per_s
  row "connection storm: broker CPU µs per connect+disconnect" storm_hit .broker_cpu_us_per_connection
  row "connection storm, $ROUNDS×$STORM_MISS distinct keys (cache miss): connects/s" storm_miss .connects_per_s
  row "idle, $IDLE subscribed connections: broker RSS bytes/connection" idle .bytes_per_connection
  row "downlink push at $DL_RATE/s: down/queued events/s" downlink .queued_events_per_s
  row "downlink: push → down/queued p99 µs" downlink .latency_us.p99
  echo
  targets
  echo
  echo "Ratios: lorabroker-1's figure divided by the other broker's (higher is better for msg/s"
  echo "and connects/s, lower is better for latency, bytes and CPU). Broker CPU is the nodes'"
  echo "user+system time during the measured phase; for lorabroker the NATS and Redis it needs"
  echo "are not included there (they are in results.jsonl as aux_cpu_s). Raw results: $RESULTS"
} | tee "$OUT/table.md"
