#!/usr/bin/env bash
# Side-by-side comparison of lorabroker, Mosquitto and nats-server's MQTT mode on the
# shapes of the performance targets (issue 4), in one run, with one command:
#
#   benches/compare.sh            # full run (a few minutes)
#   benches/compare.sh --quick    # smaller shapes, shorter runs (a smoke test)
#   benches/compare.sh --wait-quiet 20   # first wait (up to 20 min) for an idle machine
#   benches/compare.sh --report DIR      # print the table of an earlier run's results again
#   benches/compare.sh --quick --debug   # debug build: checks the script, figures meaningless
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
# Needs: cargo, jq, redis-server, nats-server, mosquitto (Debian: /usr/sbin). The shell it
# shares with benches/transports.sh is in benches/lib.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=benches/compare.sh
# shellcheck source=benches/lib.sh
. benches/lib.sh
parse_args "$@"

# Everything that starts servers and measures (skipped by --report).
measure() {
setup redis-server nats-server mosquitto

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
backends

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
mosquitto_start mosquitto "$MOSQ_PORT"
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
