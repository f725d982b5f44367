#!/usr/bin/env bash
# 100,000 connections on one node (issue 13, items 5 and 6): lorabroker's RSS per idle
# subscribed connection over TCP, TLS and WebSocket, Mosquitto's for comparison, and a scale
# run of N subscribed connections with uplinks at 10k msg/s spread over them, in one command:
#
#   benches/scale.sh                       # N = 100,000 (or as many as the file limit allows)
#   benches/scale.sh --connections 50000   # another N
#   benches/scale.sh --quick               # N = 2,000, 2k msg/s for 3 s (a smoke test)
#   benches/scale.sh --quick --debug       # debug build: checks the script, figures meaningless
#   benches/scale.sh --out DIR             # results.jsonl, table.md and the logs go to DIR
#   benches/scale.sh --report DIR          # print the table of an earlier run again
#   benches/scale.sh --wait-quiet 20       # first wait (up to 20 min) for an idle machine
#   benches/scale.sh --source-addrs 4      # the load's sockets from 127.0.0.2-127.0.0.5
#
# Every connection is a descriptor on both sides: the load generator and the broker each
# need N plus a few hundred under the hard RLIMIT_NOFILE (`ulimit -Hn`). When the hard
# limit is lower, N is capped to fit and the run says so (raise it with `ulimit -Hn` as
# root, or LimitNOFILE= in a service unit, for the full N). Past about 25k connections the
# load generator binds its sockets to several loopback source addresses (127.0.0.2, …;
# `--source-addrs auto`, its default), since one source address has only the ephemeral
# port range (net.ipv4.ip_local_port_range) towards one listener.
#
# Each measurement gets a fresh broker on free loopback ports:
#   lorabroker-tcp   `lorabroker serve` on private NATS + Redis (as compare.sh, with
#                    mqtt.max_connections above N): idle at N (RSS per connection, setup
#                    time); then, on another fresh node, the scale run: N connections each
#                    subscribed to its own device's uplinks, uplinks on NATS at RATE msg/s
#                    for SCALE_DUR spread over the devices; RSS before / connected / peak,
#                    CPU of the node and of NATS+Redis (% of one core, µs per delivery),
#                    loss, p50/p99 latency
#   lorabroker-tls, lorabroker-ws   idle at min(N, 20000) over TLS and WebSocket
#   mosquitto-tcp    `mosquitto -c`, anonymous: idle at N
# The summary goes to $OUT/table.md, every JSON line to $OUT/results.jsonl.
#
# Needs: cargo, jq, openssl, redis-server, nats-server, mosquitto (Debian: /usr/sbin).
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=benches/scale.sh
# shellcheck source=benches/lib.sh
. benches/lib.sh

# This script's own options; the others are lib.sh's (parse_args).
ALL_ARGS="$*"
CONNECTIONS="" SOURCE_ADDRS=auto
rest=()
while (($#)); do
  case $1 in
    --connections) CONNECTIONS=$2; shift ;;
    --source-addrs) SOURCE_ADDRS=$2; shift ;;
    *) rest+=("$1") ;;
  esac
  shift
done
parse_args "${rest[@]}"
ARGS=$ALL_ARGS
if ((QUICK)); then
  N=${CONNECTIONS:-2000}; RATE=2000; SCALE_DUR=3s
else
  N=${CONNECTIONS:-100000}; RATE=10000; SCALE_DUR=10s
fi
ASKED=$N
TRANSPORT_MAX=20000 # TLS and WebSocket idle runs at min(N, this)
# Descriptors each process needs besides the connections (the load generator reserves 128;
# a node has its listeners, NATS, Redis, HTTP and logs).
MARGIN=256
TARGET_BYTES=1228.8 # 1.2 KiB per idle subscribed TCP connection (issue 13, item 5)
SHAPE_VARS+=(N ASKED RATE SCALE_DUR TRANSPORT_MAX)

# cap_connections: N, lowered (with a message) to what the descriptor limit allows; the
# limit is the one setup raised, which the servers inherit.
cap_connections() {
  local limit max
  limit=$(ulimit -n)
  [[ $limit == unlimited ]] && return 0
  max=$((limit - MARGIN))
  if ((N > max)); then
    echo "== $N connections need about $((N + MARGIN)) file descriptors in the load generator and in the broker each, but the limit here is $limit (hard: $(ulimit -Hn)): measuring at N = $max instead; raise it with \`ulimit -Hn\` (as root) or LimitNOFILE= for the full run" |
      tee -a "$OUT/machine.txt" >&2
    N=$max
  fi
  declare -p "${SHAPE_VARS[@]}" | sed 's/^declare -[-a-z]* //' >"$OUT/shapes.sh"
}

measure() {
  setup openssl redis-server nats-server mosquitto
  cap_connections
  local certs="$WORK/certs"
  certificates "$certs"
  local tls=(--cafile "$certs/ca.pem" --server-name localhost --ws-path /mqtt)
  local load=(--source-addrs "$SOURCE_ADDRS")
  local max_conn=LORABROKER_MQTT__MAX_CONNECTIONS=$((N + 1000))
  local t port small=$((N < TRANSPORT_MAX ? N : TRANSPORT_MAX))
  backends

  echo "== lorabroker over tcp: idle at $N" >&2
  node lb-idle "$max_conn"
  echo "lorabroker-tcp: $(load_state)" | tee -a "$OUT/machine.txt" >&2
  run idle --label lorabroker-tcp --broker-pid "$NODE_PID" --mqtt "127.0.0.1:$NODE_PORT" \
    "${BACKENDS[@]}" "${AUX[@]}" "${load[@]}" idle --connections "$N"
  stop "$NODE_PID"

  echo "== lorabroker over tcp: scale, $N connections, $RATE msg/s for $SCALE_DUR" >&2
  node lb-scale "$max_conn"
  run scale --label lorabroker-tcp --broker-pid "$NODE_PID" --mqtt "127.0.0.1:$NODE_PORT" \
    "${BACKENDS[@]}" "${AUX[@]}" "${load[@]}" \
    scale --connections "$N" --rate "$RATE" --duration "$SCALE_DUR"
  stop "$NODE_PID"

  for t in tls ws; do
    echo "== lorabroker over $t: idle at $small" >&2
    local tls_port ws_port
    tls_port=$(free_port) ws_port=$(free_port)
    node "lb-idle-$t" "$max_conn" \
      LORABROKER_MQTT__TLS__LISTEN="127.0.0.1:$tls_port" \
      LORABROKER_MQTT__TLS__CERT_FILE="$certs/server.pem" \
      LORABROKER_MQTT__TLS__KEY_FILE="$certs/server-key.pem" \
      LORABROKER_MQTT__WS__LISTEN="127.0.0.1:$ws_port"
    for port in "$tls_port" "$ws_port"; do wait_port "$port" "lorabroker lb-idle-$t" "$NODE_PID"; done
    [[ $t == tls ]] && port=$tls_port || port=$ws_port
    run idle --label "lorabroker-$t" --broker-pid "$NODE_PID" --mqtt "127.0.0.1:$port" \
      --transport "$t" "${tls[@]}" "${BACKENDS[@]}" "${AUX[@]}" "${load[@]}" \
      idle --connections "$small"
    stop "$NODE_PID"
  done

  echo "== mosquitto over tcp: idle at $N" >&2
  port=$(free_port)
  mosquitto_start mosquitto-tcp "$port"
  run idle --label mosquitto-tcp --broker-pid "$MOSQ_PID" --mqtt "127.0.0.1:$port" \
    "${load[@]}" idle --connections "$N"
  stop "$MOSQ_PID"
}

# --- the summary -------------------------------------------------------------------------------
# fmt_int FIGURE: thousands separators (integers), anything else as is.
fmt_int() {
  awk -v v="$1" 'BEGIN {
    if (v !~ /^[0-9]+(\.[0-9]+)?$/) { print v; exit }
    s = sprintf("%.0f", v); out = ""
    while (length(s) > 3) { out = "," substr(s, length(s) - 2) out; s = substr(s, 1, length(s) - 3) }
    print s out
  }'
}
mib() { awk -v v="$1" 'BEGIN { if (v == "-") print "-"; else printf "%.1f", v / 1048576 }'; }

idle_row() { # idle_row CASE TARGET
  local c=$1 t=$2 bytes
  bytes=$(val "$c" "$t" .bytes_per_connection)
  echo "| $t ($c) | $(fmt_int "$(val "$c" "$t" .connections)") | $(fmt_int "$bytes") | $(val "$c" "$t" .setup_seconds) | $(fmt_int "$(val "$c" "$t" .connects_per_s)") | $(val "$c" "$t" .source_addrs) |"
}

target_line() {
  local bytes conns verdict
  bytes=$(val idle lorabroker-tcp .bytes_per_connection)
  conns=$(val idle lorabroker-tcp .connections)
  if [[ $bytes == - ]]; then
    verdict="not measured"
  elif awk -v b="$bytes" -v t="$TARGET_BYTES" 'BEGIN { exit !(b <= t) }'; then
    verdict="MET ($(fmt_int "$bytes") B)"
  else
    verdict="MISSED ($(fmt_int "$bytes") B, $(awk -v b="$bytes" -v t="$TARGET_BYTES" 'BEGIN { printf "%.2f", b / t }')× the target)"
  fi
  local why=""
  if ((N < ASKED)); then
    why=" (not the target's 100,000: capped by the descriptor limit, see above)"
  elif [[ $conns != 100000 ]]; then
    why=" (not the target's 100,000: --quick or --connections)"
  fi
  echo "Target (issue 13, item 5): ≤ 1.2 KiB (1,229 B) of broker RSS per idle subscribed TCP connection at 100,000 connections: $verdict at $(fmt_int "$conns") connections$why."
}

summary() {
  cat "$OUT/machine.txt"
  echo
  echo "| broker-transport (run) | connections | broker RSS bytes/connection | setup s | connects/s | source addresses |"
  echo "|---|---:|---:|---:|---:|---:|"
  idle_row idle lorabroker-tcp
  idle_row scale lorabroker-tcp
  idle_row idle lorabroker-tls
  idle_row idle lorabroker-ws
  idle_row idle mosquitto-tcp
  echo
  echo "| scale run, lorabroker-tcp | |"
  echo "|---|---:|"
  local s=(scale lorabroker-tcp)
  echo "| subscribed connections (one device each) | $(fmt_int "$(val "${s[@]}" .connections)") |"
  echo "| uplinks on NATS, spread over the devices | $(fmt_int "$RATE") msg/s for $SCALE_DUR |"
  echo "| published / delivered / loss | $(fmt_int "$(val "${s[@]}" .published)") / $(fmt_int "$(val "${s[@]}" .delivered)") / $(val "${s[@]}" .loss) |"
  echo "| broker RSS before / connected / peak (MiB) | $(mib "$(val "${s[@]}" .rss_before_bytes)") / $(mib "$(val "${s[@]}" .rss_connected_bytes)") / $(mib "$(val "${s[@]}" .rss_peak_bytes)") |"
  echo "| node CPU, % of one core | $(val "${s[@]}" .broker_cpu_percent) |"
  echo "| NATS+Redis CPU, % of one core | $(val "${s[@]}" .aux_cpu_percent) |"
  echo "| CPU µs per delivery: node / NATS+Redis / both | $(val "${s[@]}" .broker_cpu_us_per_delivery) / $(val "${s[@]}" .aux_cpu_us_per_delivery) / $(val "${s[@]}" .cpu_us_per_delivery) |"
  echo "| latency p50 / p99 (µs) | $(val "${s[@]}" .latency_us.p50) / $(val "${s[@]}" .latency_us.p99) |"
  echo
  target_line
  echo "Per-connection RSS is (RSS with N subscribed connections − RSS before) ÷ N, read 2 s after"
  echo "the last SUBACK; the scale row reads it the same way before its traffic starts. TLS and"
  echo "WebSocket run at min(N, $(fmt_int "$TRANSPORT_MAX")). Raw results: $RESULTS"
}

if [[ -n $REPORT ]]; then
  use_report "$REPORT"
else
  measure
  echo "end: $(load_state)" >>"$OUT/machine.txt"
fi
summary | tee "$OUT/table.md"
