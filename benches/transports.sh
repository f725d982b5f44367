#!/usr/bin/env bash
# Throughput and idle memory per transport (issue 10): lorabroker over TCP, TLS, WebSocket
# and WebSocket over TLS next to Mosquitto over the same four, on compare.sh's
# shapes, in one run, with one command:
#
#   benches/transports.sh            # full run (a few minutes after the release build)
#   benches/transports.sh --quick    # smaller shapes, shorter runs (a smoke test)
#   benches/transports.sh --wait-quiet 20   # first wait (up to 20 min) for an idle machine
#   benches/transports.sh --report DIR      # print the table of an earlier run again
#   benches/transports.sh --quick --debug   # debug build: checks the script, figures meaningless
#
# It makes a throw-away CA and a P-256 server certificate for localhost/127.0.0.1 with
# openssl, and for every transport starts a fresh broker (so that the idle-memory run,
# which goes first, sees a broker that has not served yet) on free loopback ports:
#   lorabroker-T   one `lorabroker serve` node on private NATS + Redis (as compare.sh),
#                  with TCP, TLS, WS and WSS listeners (mqtt.tls/ws/wss), upstream on NATS
#   mosquitto-T    `mosquitto -c`, anonymous, with TCP, TLS, WS and WSS listeners (the
#                  same certificate; WS and WSS are `protocol websockets`, served by its
#                  built-in libwebsockets); its upstream is an MQTT publisher over the same
#                  transport as the subscribers (lorabroker-load --transport)
# and runs `lorabroker-load --transport T` (trusting the CA): idle RSS per connection,
# fan-out (10 subscribers, 200 B) and many devices; rows per broker and transport.
# Every JSON line is kept in $OUT/results.jsonl; the Markdown table goes to $OUT/table.md.
#
# Needs: cargo, jq, openssl, redis-server, nats-server, mosquitto (Debian: /usr/sbin).
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=benches/transports.sh
# shellcheck source=benches/lib.sh
. benches/lib.sh
parse_args "$@"

LB_TRANSPORTS=(tcp tls ws wss)
MOSQ_TRANSPORTS=(tcp tls ws wss)

# shapes LABEL PIDS CONNECT-ARGS...: the measured shapes against one fresh broker.
shapes() {
  local label=$1 pids=$2; shift 2
  local args=(--label "$label" --broker-pid "$pids" "$@")
  echo "$label: $(load_state)" | tee -a "$OUT/machine.txt" >&2
  sleep 1
  run idle "${args[@]}" idle --connections "$IDLE"
  run fanout "${args[@]}" fanout --subscribers "$FANOUT_SUBS" --payload "$PAYLOAD" --rate max --duration "$DUR"
  run devices "${args[@]}" devices --subscribers "$DEVICES" --payload "$PAYLOAD" --rate max --duration "$DUR"
}

measure() {
  setup openssl redis-server nats-server mosquitto
  local certs="$WORK/certs"
  certificates "$certs"
  local tls=(--cafile "$certs/ca.pem" --server-name localhost --ws-path /mqtt)
  local t port tls_port ws_port wss_port
  backends
  for t in "${LB_TRANSPORTS[@]}"; do
    echo "== lorabroker over $t" >&2
    tls_port=$(free_port) ws_port=$(free_port) wss_port=$(free_port)
    node "lb-$t" \
      LORABROKER_MQTT__TLS__LISTEN="127.0.0.1:$tls_port" \
      LORABROKER_MQTT__TLS__CERT_FILE="$certs/server.pem" \
      LORABROKER_MQTT__TLS__KEY_FILE="$certs/server-key.pem" \
      LORABROKER_MQTT__WS__LISTEN="127.0.0.1:$ws_port" \
      LORABROKER_MQTT__WSS__LISTEN="127.0.0.1:$wss_port"
    for p in "$tls_port" "$ws_port" "$wss_port"; do wait_port "$p" "lorabroker lb-$t" "$NODE_PID"; done
    case $t in
      tcp) port=$NODE_PORT ;; tls) port=$tls_port ;; ws) port=$ws_port ;; wss) port=$wss_port ;;
    esac
    shapes "lorabroker-$t" "$NODE_PID" --mqtt "127.0.0.1:$port" --transport "$t" "${tls[@]}" \
      "${BACKENDS[@]}" "${AUX[@]}"
    stop "$NODE_PID"
  done

  for t in "${MOSQ_TRANSPORTS[@]}"; do
    echo "== mosquitto over $t" >&2
    port=$(free_port) tls_port=$(free_port) ws_port=$(free_port) wss_port=$(free_port)
    # Its websockets listeners start only next to a plain one (see RESULTS.md).
    mosquitto_start "mosquitto-$t" "$port" "listener $tls_port 127.0.0.1
certfile $certs/server.pem
keyfile $certs/server-key.pem
listener $ws_port 127.0.0.1
protocol websockets
listener $wss_port 127.0.0.1
protocol websockets
certfile $certs/server.pem
keyfile $certs/server-key.pem"
    for p in "$tls_port" "$ws_port" "$wss_port"; do wait_port "$p" "mosquitto-$t" "$MOSQ_PID"; done
    case $t in tls) port=$tls_port ;; ws) port=$ws_port ;; wss) port=$wss_port ;; esac
    shapes "mosquitto-$t" "$MOSQ_PID" --mqtt "127.0.0.1:$port" --transport "$t" "${tls[@]}"
    stop "$MOSQ_PID"
  done
}

# --- the table --------------------------------------------------------------------------------
# The columns: CASE and JQ-PATH of each figure.
COLUMNS=(
  "fanout .delivered_per_s" "fanout .loss" "fanout .broker_cpu_us_per_delivery"
  "devices .delivered_per_s" "devices .loss" "devices .broker_cpu_us_per_delivery"
  "idle .bytes_per_connection"
)
row() { # row TARGET -> its figures, then its msg/s divided by the same broker's over TCP
  local c cells="" tcp=${1%-*}-tcp
  for c in "${COLUMNS[@]}"; do cells+=" $(val ${c% *} "$1" "${c#* }") |"; done
  for c in fanout devices; do
    cells+=" $(ratio "$(val $c "$1" .delivered_per_s)" "$(val $c "$tcp" .delivered_per_s)") |"
  done
  echo "| $1 |$cells"
}
versus() { # versus TRANSPORT -> lorabroker's figures divided by Mosquitto's
  local c cells=""
  for c in "${COLUMNS[@]}"; do
    cells+=" $(ratio "$(val ${c% *} "lorabroker-$1" "${c#* }")" "$(val ${c% *} "mosquitto-$1" "${c#* }")") |"
  done
  echo "| lorabroker ÷ mosquitto, $1 |$cells | |"
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
  echo "| broker-transport | fan-out, $FANOUT_SUBS subs, ${PAYLOAD} B: delivered msg/s | fan-out loss | fan-out broker CPU µs/delivery | many devices, $DEVICES subs: delivered msg/s | many devices loss | many devices broker CPU µs/delivery | idle, $IDLE subscribed connections: broker RSS bytes/connection | fan-out ÷ same broker over tcp | many devices ÷ same broker over tcp |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  for t in "${LB_TRANSPORTS[@]}"; do row "lorabroker-$t"; done
  for t in "${MOSQ_TRANSPORTS[@]}"; do row "mosquitto-$t"; done
  for t in "${LB_TRANSPORTS[@]}"; do versus "$t"; done
  echo
  echo "lorabroker: one \`serve\` node (its NATS and Redis CPU is not in the broker CPU; it is in"
  echo "results.jsonl as aux_cpu_s). Ratios: higher is better for msg/s, lower for CPU and bytes."
  echo "TLS: 1.3 with a P-256 certificate, the load generator's rustls client (ring) on every"
  echo "connection. Raw results: $RESULTS"
} | tee "$OUT/table.md"
