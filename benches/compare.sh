#!/usr/bin/env bash
# Side-by-side comparison of lorabroker, Mosquitto and nats-server's MQTT mode on the
# shapes of the performance targets (issue 13), in one run, with one command:
#
#   benches/compare.sh            # full run (about 16 min of measuring); rewrites the docs
#   benches/compare.sh --quick    # smaller shapes, 1 s probes (a smoke test; docs untouched)
#   benches/compare.sh --wait-quiet 20   # first wait (up to 20 min) for an idle machine
#   benches/compare.sh --report DIR      # print the table of an earlier run's results again
#   benches/compare.sh --report DIR --update-docs   # and rewrite the docs from that run
#   benches/compare.sh --no-update-docs  # a full run that leaves README.md and RESULTS.md alone
#   benches/compare.sh --quick --debug   # debug build: checks the script, figures meaningless
#   benches/compare.sh --shapes qos1,store_cost   # only these shapes (see below); only
#                                  # their docs blocks are rewritten
#
# It builds the release binaries, starts its own servers on free loopback ports (never the
# default 1883/4222/6379, so it runs beside anything else), runs `lorabroker-load` against
#   lorabroker-1   one `lorabroker serve` node (NATS + Redis), the upstream on NATS
#   lorabroker-2   two nodes on the same NATS + Redis, connections spread over both
#   mosquitto      `mosquitto -c`, anonymous, the upstream an MQTT publisher
#   nats-mqtt      `nats-server` with JetStream and `mqtt { port }`, anonymous, likewise
# and, per broker: idle memory; p99 latency at 50k deliveries/s (median of 3); CPU per
# delivered message at 50k msg/s in the many-devices shape; the zero-loss rates of fan-out
# (10 subscribers) and many devices (1000 subscribers) by bisection over fixed-rate runs
# (`bisect` in benches/lib.sh: 3 s probes, at most 7, within 5 %); delivery and loss at
# full speed; connection storms. Then QoS 1 with persistent sessions (issue 14), against
#   lorabroker-1   one node with `[sessions] enabled` (JetStream file storage, as deployed)
#   mosquitto      `persistence true` (a temporary persistence_location)
#   nats-mqtt      as above (it keeps QoS 1 sessions in JetStream anyway)
# : delivered msg/s at full speed (1 and QOS1_SUBS persistent subscribers), the zero-loss rate
# (1 subscriber, bisection), p50/p99 at a fixed rate (median of 3), and the storage cost
# per message stored for an absent subscriber (`store-cost`: stream bytes, disk, RSS; then
# its replay). It prints a Markdown table with the ratios and the
# targets of issue 13 (MET/MISSED). Every JSON line is kept in $OUT/results.jsonl (default:
# a new directory under /tmp; `--out DIR` to choose), the table in $OUT/table.md.
#
# Shapes (`--shapes LIST`, comma-separated; default all): idle latency devices_cpu fanout
# devices storm downlink (the issue-13 table) and qos1 store_cost (the QoS 1 table).
# Brokers none of the asked shapes need are not started.
#
# Docs: a full release run (and any run or --report with --update-docs) rewrites the
# generated blocks of README.md (## Performance) and benches/RESULTS.md (machine, results,
# targets, raw JSON lines; qos1 in both): the text between `<!-- compare.sh:begin NAME -->`
# and `<!-- compare.sh:end NAME -->`; everything outside the markers is left as it is. A
# run of some shapes only rewrites the blocks of those (qos1 and store_cost: the qos1 blocks).
#
# Needs: cargo, jq, python3, redis-server, nats-server, mosquitto (Debian: /usr/sbin). The
# shell it shares with benches/transports.sh is in benches/lib.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
SCRIPT=benches/compare.sh
# shellcheck source=benches/lib.sh
. benches/lib.sh
parse_args "$@"

# main_shapes: whether any shape of the issue-13 table was asked for.
main_shapes() {
  local shape
  for shape in idle latency devices_cpu fanout devices storm downlink; do
    if want "$shape"; then return 0; fi
  done
  return 1
}
# qos1_shapes: whether any shape of the QoS 1 table was asked for.
qos1_shapes() { want qos1 || want store_cost; }

# Everything that starts servers and measures (skipped by --report).
measure() {
setup python3 redis-server nats-server mosquitto

# scenarios LABEL PIDS CONNECT-ARGS...: every scenario against one broker (started fresh,
# so that the idle-memory run, which goes first, sees a broker that has not served yet).
scenarios() {
  local label=$1 pids=$2; shift 2
  local args=(--label "$label" --broker-pid "$pids" "$@")
  echo "$label: $(load_state)" | tee -a "$OUT/machine.txt" >&2
  sleep 1
  want idle && run idle "${args[@]}" idle --connections "$IDLE"
  # Tail latency on a shared machine is noisy: three runs, the table shows the median.
  if want latency; then
    for _ in 1 2 3; do
      run latency "${args[@]}" fanout --subscribers "$FANOUT_SUBS" --payload "$PAYLOAD" \
        --rate "$LATENCY_RATE" --duration "$LAT_DUR"
    done
  fi
  want devices_cpu && run devices_cpu "${args[@]}" devices --subscribers "$DEVICES" --payload "$PAYLOAD" \
    --rate "$CPU_RATE" --duration "$CPU_DUR"
  if want fanout; then
    bisect fanout "$FANOUT_LO" "$FANOUT_HI" "${args[@]}" fanout --subscribers "$FANOUT_SUBS" --payload "$PAYLOAD"
  fi
  if want devices; then
    bisect devices "$DEVICES_LO" "$DEVICES_HI" "${args[@]}" devices --subscribers "$DEVICES" --payload "$PAYLOAD"
  fi
  want fanout && run fanout "${args[@]}" fanout --subscribers "$FANOUT_SUBS" --payload "$PAYLOAD" --rate max --duration "$DUR"
  want devices && run devices "${args[@]}" devices --subscribers "$DEVICES" --payload "$PAYLOAD" --rate max --duration "$DUR"
  want storm && run storm_hit "${args[@]}" storm --connections "$STORM" --rounds "$ROUNDS"
  if [[ $label == lorabroker* ]]; then
    want storm && run storm_miss "${args[@]}" storm --connections "$STORM_MISS" --rounds "$ROUNDS" --distinct-keys
    want downlink && run downlink "${args[@]}" downlink --clients 10 --devices 100 --rate "$DL_RATE" --duration "$DUR"
  fi
  return 0
}

# qos1_scenarios LABEL PIDS STORE-COST-ARGS... -- CONNECT-ARGS...: QoS 1 with persistent
# sessions against one broker: full speed with 1 and QOS1_SUBS subscribers, the zero-loss
# rate of one, p50/p99 at QOS1_LATENCY_RATE (median of 3), then the storage cost per message.
qos1_scenarios() {
  local label=$1 pids=$2; shift 2
  local store=()
  while [[ $1 != -- ]]; do store+=("$1"); shift; done
  shift
  local args=(--label "$label" --broker-pid "$pids" "$@")
  echo "$label (QoS 1): $(load_state)" | tee -a "$OUT/machine.txt" >&2
  if want qos1; then
    run qos1_max "${args[@]}" qos1 --subscribers 1 --payload "$PAYLOAD" --rate max --duration "$DUR"
    run qos1_max_subs "${args[@]}" qos1 --subscribers "$QOS1_SUBS" --payload "$PAYLOAD" --rate max --duration "$DUR"
    bisect qos1 "$QOS1_LO" "$QOS1_HI" "${args[@]}" qos1 --subscribers 1 --payload "$PAYLOAD"
    for _ in 1 2 3; do
      run qos1_latency "${args[@]}" qos1 --subscribers 1 --payload "$PAYLOAD" \
        --rate "$QOS1_LATENCY_RATE" --duration "$LAT_DUR"
    done
  fi
  if want store_cost; then
    run store_cost "${args[@]}" store-cost --messages "$STORE_MESSAGES" --payload "$PAYLOAD" "${store[@]}"
  fi
  return 0
}

# nats_mqtt_start: a fresh nats-server with JetStream and an MQTT listener; sets NM_PID,
# NM_PORT (NATS), NM_MQTT and NM_STORE (its store_dir).
nats_mqtt_start() {
  NM_PORT=$(free_port)
  NM_MQTT=$(free_port)
  NM_STORE="$WORK/nats-mqtt-$NM_PORT-js"
  cat >"$WORK/nats-mqtt.conf" <<EOF
listen: 127.0.0.1:$NM_PORT
server_name: lorabroker_compare
jetstream {
  store_dir: "$NM_STORE"
}
mqtt {
  host: 127.0.0.1
  port: $NM_MQTT
}
EOF
  nats-server -c "$WORK/nats-mqtt.conf" >>"$OUT/nats-mqtt.log" 2>&1 &
  NM_PID=$!
  PIDS+=("$NM_PID")
  wait_port "$NM_MQTT" "nats-server MQTT" "$NM_PID"
}


# --- lorabroker: private Redis and NATS, then one and two nodes -------------------------
backends

if main_shapes; then
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

  # --- Mosquitto --------------------------------------------------------------------------
  echo "== mosquitto" >&2
  MOSQ_PORT=$(free_port)
  mosquitto_start mosquitto "$MOSQ_PORT"
  scenarios mosquitto "$MOSQ_PID" --mqtt "127.0.0.1:$MOSQ_PORT"
  stop "$MOSQ_PID"

  # --- nats-server in MQTT mode -------------------------------------------------------------
  echo "== nats-server MQTT" >&2
  nats_mqtt_start
  scenarios nats-mqtt "$NM_PID" --mqtt "127.0.0.1:$NM_MQTT"
  stop "$NM_PID"
fi

# --- QoS 1 with persistent sessions (issue 14) ----------------------------------------------
if qos1_shapes; then
  echo "== lorabroker, one node, persistent sessions (JetStream file storage)" >&2
  node lbq LORABROKER_SESSIONS__ENABLED=true LORABROKER_SESSIONS__STORAGE=file
  qos1_scenarios lorabroker-1 "$NODE_PID" --store-pid "$NATS_PID" --store-dir "$NATS_STORE" -- \
    --mqtt "127.0.0.1:$NODE_PORT" "${BACKENDS[@]}" "${AUX[@]}"
  stop "$NODE_PID"

  echo "== mosquitto, persistence on" >&2
  MOSQ_PORT=$(free_port)
  mkdir -p "$WORK/mosquitto-persist"
  # Mosquitto started as root writes as its own user.
  chmod 711 "$WORK" && chmod 777 "$WORK/mosquitto-persist"
  # max_queued_messages: Mosquitto's default (1000 per client) would drop most of what an
  # absent subscriber misses; 100000 matches lorabroker's sessions.max_pending_messages.
  mosquitto_start mosquitto-persist "$MOSQ_PORT" "" "persistence true
persistence_location $WORK/mosquitto-persist/
max_queued_messages 100000"
  qos1_scenarios mosquitto "$MOSQ_PID" --store-pid "$MOSQ_PID" -- --mqtt "127.0.0.1:$MOSQ_PORT"
  stop "$MOSQ_PID"

  echo "== nats-server MQTT (QoS 1 in JetStream)" >&2
  nats_mqtt_start
  qos1_scenarios nats-mqtt "$NM_PID" --js-url "nats://127.0.0.1:$NM_PORT" --stream '$MQTT_msgs' \
    --store-pid "$NM_PID" --store-dir "$NM_STORE" -- --mqtt "127.0.0.1:$NM_MQTT"
  stop "$NM_PID"
fi
}


# --- the tables -------------------------------------------------------------------------------
BROKERS=(lorabroker-1 lorabroker-2 mosquitto nats-mqtt)

# fmt FIGURE: thousands separators, rounded to an integer from 100 up; anything else as is.
fmt() {
  awk -v v="$1" 'BEGIN {
    if (v !~ /^-?[0-9]+(\.[0-9]+)?$/ || (v < 100 && v > -100)) { print v; exit }
    s = sprintf("%.0f", v); neg = (substr(s, 1, 1) == "-"); if (neg) s = substr(s, 2)
    out = ""; while (length(s) > 3) { out = "," substr(s, length(s) - 2) out; s = substr(s, 1, length(s) - 3) }
    print (neg ? "-" : "") s out
  }'
}

# zl CASE TARGET FIELD -> a zero-loss figure (zero_loss_per_s or zero_loss_deliveries_per_s)
# as shown: "< LO" when even the lowest rate lost, "≥ N" when no probe failed, "-" if absent.
zl() {
  local r
  r=$(jq -s -r --arg c "${1}_zero_loss" --arg t "$2" --arg f "$3" '[.[] | select(.case == $c and .target == $t)]
    | if length == 0 then "-" else .[-1] | if .zero_loss_per_s == null then
        (if $f == "zero_loss_per_s" and .below_per_s then "<\(.below_per_s)" else "-" end)
      elif .[$f] == null then "-" elif .at_upper_bound then ">=\(.[$f])" else "\(.[$f])" end end' "$RESULTS")
  case $r in
    "<"*) echo "< $(fmt "${r#<}")" ;;
    ">="*) echo "≥ $(fmt "${r#>=}")" ;;
    *) fmt "$r" ;;
  esac
}
# zl_num CASE TARGET [BELOW] -> the zero-loss publish rate as a number, or "-"; when even the
# lowest rate lost: 0, or with BELOW=bound that rate (an upper bound, for a goal).
zl_num() {
  jq -s -r --arg c "${1}_zero_loss" --arg t "$2" --arg b "${3:-}" '[.[] | select(.case == $c and .target == $t)]
    | if length == 0 then "-" else .[-1] | (.zero_loss_per_s
        // (if .below_per_s then (if $b == "bound" then .below_per_s else 0 end) else "-" end)) end' "$RESULTS"
}
# failing CASE TARGET -> the lowest failing probe rate and why, or "-".
failing() {
  jq -s -r --arg c "${1}_zero_loss" --arg t "$2" '[.[] | select(.case == $c and .target == $t)]
    | if length == 0 or .[-1].first_failing_per_s == null then "-"
      else .[-1] | "\(.first_failing_per_s)\t\(.first_failing_why)" end' "$RESULTS" |
    while IFS=$'\t' read -r rate why; do [[ $rate == - ]] && echo - || echo "$(fmt "$rate")/s: $why"; done
}

# Per-delivery CPU of the broker's bus (lorabroker's NATS+Redis), and of broker + bus.
AUX_PER='(if .aux_cpu_s then (.aux_cpu_s * 1e8 / .delivered | round / 100) else null end)'
TOTAL_PER='(if .broker_cpu_s then ((.broker_cpu_s + (.aux_cpu_s // 0)) * 1e8 / .delivered | round / 100) else null end)'

row() { # row TITLE CASE JQ-PATH: one figure per broker, then lb-1's ratios
  local b cells="" l1 m n
  for b in "${BROKERS[@]}"; do cells+=" $(fmt "$(val "$2" "$b" "$3")") |"; done
  l1=$(val "$2" lorabroker-1 "$3"); m=$(val "$2" mosquitto "$3"); n=$(val "$2" nats-mqtt "$3")
  echo "| $1 |$cells $(ratio "$l1" "$m") | $(ratio "$l1" "$n") |"
}
zl_row() { # zl_row TITLE CASE FIELD: a zero-loss figure per broker, then lb-1's ratios
  local b cells="" jp=".$3"
  for b in "${BROKERS[@]}"; do cells+=" $(zl "$2" "$b" "$3") |"; done
  echo "| $1 |$cells $(ratio "$(val "${2}_zero_loss" lorabroker-1 "$jp")" "$(val "${2}_zero_loss" mosquitto "$jp")") | $(ratio "$(val "${2}_zero_loss" lorabroker-1 "$jp")" "$(val "${2}_zero_loss" nats-mqtt "$jp")") |"
}
fail_row() { # fail_row TITLE CASE: the lowest failing probe per broker
  local b cells=""
  for b in "${BROKERS[@]}"; do cells+=" $(failing "$2" "$b") |"; done
  echo "| $1 |$cells - | - |"
}

# The full table, every broker (benches/RESULTS.md's results block).
results_table() {
  local deliveries=$((LATENCY_RATE * FANOUT_SUBS)) zero="bisection over ${PROBE_DUR} fixed-rate runs"
  echo "| shape | lorabroker-1 | lorabroker-2 | mosquitto | nats-mqtt | lb-1 ÷ mosquitto | lb-1 ÷ nats-mqtt |"
  echo "|---|---:|---:|---:|---:|---:|---:|"
  zl_row "fan-out, $FANOUT_SUBS subs, ${PAYLOAD} B: zero-loss publishes/s ($zero)" fanout zero_loss_per_s
  zl_row "fan-out at the zero-loss rate: deliveries/s" fanout zero_loss_deliveries_per_s
  row "fan-out at the zero-loss rate: broker CPU µs per delivery" fanout_zero_loss .broker_cpu_us_per_delivery
  row "fan-out at the zero-loss rate: NATS+Redis CPU µs per delivery (lorabroker's bus)" fanout_zero_loss .aux_cpu_us_per_delivery
  row "fan-out at the zero-loss rate: p99 latency µs" fanout_zero_loss .latency_us.p99
  fail_row "fan-out: lowest failing probe" fanout
  zl_row "many devices, $DEVICES subs on $DEVICES topics: zero-loss msg/s ($zero)" devices zero_loss_per_s
  row "many devices at the zero-loss rate: broker CPU µs per delivery" devices_zero_loss .broker_cpu_us_per_delivery
  row "many devices at the zero-loss rate: NATS+Redis CPU µs per delivery (lorabroker's bus)" devices_zero_loss .aux_cpu_us_per_delivery
  row "many devices at the zero-loss rate: p99 latency µs" devices_zero_loss .latency_us.p99
  fail_row "many devices: lowest failing probe" devices
  row "many devices at $(fmt "$CPU_RATE") msg/s ($CPU_DUR): CPU µs per delivered message (lorabroker: node + NATS+Redis)" devices_cpu "$TOTAL_PER"
  row "many devices at $(fmt "$CPU_RATE") msg/s: broker CPU µs per delivery" devices_cpu .broker_cpu_us_per_delivery
  row "many devices at $(fmt "$CPU_RATE") msg/s: loss" devices_cpu .loss
  row "fan-out at full speed ($DUR): delivered msg/s" fanout .delivered_per_s
  row "fan-out at full speed: loss" fanout .loss
  row "fan-out at full speed: broker CPU µs per delivery" fanout .broker_cpu_us_per_delivery
  row "fan-out at full speed: NATS+Redis CPU µs per delivery (lorabroker's bus)" fanout "$AUX_PER"
  row "many devices at full speed ($DUR): delivered msg/s" devices .delivered_per_s
  row "many devices at full speed: loss" devices .loss
  row "many devices at full speed: broker CPU µs per delivery" devices .broker_cpu_us_per_delivery
  row "many devices at full speed: NATS+Redis CPU µs per delivery (lorabroker's bus)" devices "$AUX_PER"
  row "latency at $(fmt "$deliveries") deliveries/s (median of 3 runs): p50 µs" latency .latency_us.p50
  row "latency at $(fmt "$deliveries") deliveries/s (median of 3 runs): p99 µs" latency .latency_us.p99
  row "latency run: loss" latency .loss
  row "connection storm, $ROUNDS×$STORM clients (cached key / anonymous): connects/s" storm_hit .connects_per_s
  row "connection storm: broker CPU µs per connect+disconnect" storm_hit .broker_cpu_us_per_connection
  row "connection storm, $ROUNDS×$STORM_MISS distinct keys (cache miss): connects/s" storm_miss .connects_per_s
  row "idle, $IDLE subscribed connections: broker RSS bytes/connection" idle .bytes_per_connection
  row "downlink push at $DL_RATE/s: down/queued events/s" downlink .queued_events_per_s
  row "downlink: push → down/queued p99 µs" downlink .latency_us.p99
}

# verdict NAME VALUE OP GOAL HOW: "MET" or "MISSED" with the figures (OP is >= or <=; HOW
# says how the goal was computed).
verdict() {
  if [[ $2 == - || $4 == - ]]; then echo "- $1: not measured"; return; fi
  local ok pct
  ok=$(awk -v v="$2" -v op="$3" -v g="$4" 'BEGIN { print ((op == ">=") ? (v >= g) : (v <= g)) ? "MET" : "MISSED" }')
  pct=$(awk -v v="$2" -v op="$3" -v g="$4" 'BEGIN { if (op == ">=") print (g == 0 ? "-" : sprintf("%.0f", 100 * v / g));
    else print (v == 0 ? "-" : sprintf("%.0f", 100 * g / v)) }')
  echo "- $1: **$ok** (lorabroker-1 $(fmt "$2"), goal $([[ $3 == ">=" ]] && echo ≥ || echo ≤) $(fmt "$4")$5, $pct % of the goal)"
}
mul() { awk -v a="$1" -v k="$2" 'BEGIN { if (a == "-") print "-"; else print a * k }'; }
least() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-") print "-"; else print (a < b ? a : b) }'; }

# The goals of issue 13, checked on lorabroker-1 (one node) against the same run's figures.
targets() {
  local f fm fn d dn cpu cpun p pm pn c cm cs i
  f=$(zl_num fanout lorabroker-1); fm=$(zl_num fanout mosquitto bound); fn=$(zl_num fanout nats-mqtt bound)
  d=$(zl_num devices lorabroker-1); dn=$(zl_num devices nats-mqtt bound)
  cpu=$(val devices_cpu lorabroker-1 "$TOTAL_PER"); cpun=$(val devices_cpu nats-mqtt "$TOTAL_PER")
  p=$(val latency lorabroker-1 .latency_us.p99); pm=$(val latency mosquitto .latency_us.p99)
  pn=$(val latency nats-mqtt .latency_us.p99)
  c=$(val storm_hit lorabroker-1 .connects_per_s); cm=$(val storm_hit mosquitto .connects_per_s)
  cs=$(val storm_miss lorabroker-1 .connects_per_s)
  i=$(val idle lorabroker-1 .bytes_per_connection)
  verdict "many devices, zero-loss msg/s ≥ 1.2× nats-mqtt" "$d" ">=" "$(mul "$dn" 1.2)" " (1.2 × $(fmt "$dn"))"
  verdict "CPU µs per delivered message at $(fmt "$CPU_RATE") msg/s, many devices, node + NATS+Redis ≤ nats-mqtt's" \
    "$cpu" "<=" "$cpun" ""
  verdict "fan-out, zero-loss publishes/s ≥ 1.5× nats-mqtt" "$f" ">=" "$(mul "$fn" 1.5)" " (1.5 × $(fmt "$fn"))"
  verdict "fan-out, zero-loss publishes/s ≥ 5× Mosquitto" "$f" ">=" "$(mul "$fm" 5)" " (5 × $(fmt "$fm"))"
  verdict "p99 µs at $(fmt $((LATENCY_RATE * FANOUT_SUBS))) deliveries/s the best of the three" "$p" "<=" "$(least "$pm" "$pn")" \
    " (Mosquitto $(fmt "$pm"), nats-mqtt $(fmt "$pn"))"
  verdict "connection storm, cached key, connects/s ≥ 1.0× Mosquitto" "$c" ">=" "$cm" ""
  verdict "connection storm, distinct keys, connects/s ≥ 0.8× Mosquitto" "$cs" ">=" "$(mul "$cm" 0.8)" " (0.8 × $(fmt "$cm"))"
  verdict "idle RSS ≤ 1.2 KiB per subscribed connection (at $(fmt "$IDLE") here; 100k: benches/scale.sh)" "$i" "<=" 1229 " B"
}

# The README's compact table: one row per shape, lorabroker (1 node), Mosquitto, nats-server.
readme_table() {
  local mosq nats b three=(lorabroker-1 mosquitto nats-mqtt) cells
  mosq=$(sed -n 's/.*mosquitto: mosquitto version \([^;]*\);.*/ \1/p' "$OUT/machine.txt")
  nats=$(sed -n 's/.*nats-server: nats-server: v\([^;]*\);.*/ \1/p' "$OUT/machine.txt")
  echo "| shape | lorabroker (1 node) | Mosquitto$mosq | nats-server$nats (MQTT) |"
  echo "|---|---:|---:|---:|"
  cells_line() { # cells_line TITLE FUNCTION: FUNCTION TARGET prints a cell
    cells=""
    for b in "${three[@]}"; do cells+=" $("$2" "$b") |"; done
    echo "| $1 |$cells"
  }
  c_fz() { echo "$(zl fanout "$1" zero_loss_per_s) ($(zl fanout "$1" zero_loss_deliveries_per_s))"; }
  c_dz() { zl devices "$1" zero_loss_per_s; }
  c_full() {
    local l; l=$(val "$CASE" "$1" '(.loss * 1e6 | round / 1e4)')
    echo "$(fmt "$(val "$CASE" "$1" .delivered_per_s)") ($([[ $l == 0 ]] && echo "no loss" || echo "loss $l %"))"
  }
  c_ff() { CASE=fanout c_full "$1"; }
  c_df() { CASE=devices c_full "$1"; }
  c_cpu() {
    local t; t=$(val devices_cpu "$1" "$TOTAL_PER")
    if [[ $1 == lorabroker* && $t != - ]]; then
      echo "$t ($(val devices_cpu "$1" .broker_cpu_us_per_delivery) + $(val devices_cpu "$1" "$AUX_PER"))"
    else echo "$t"; fi
  }
  c_p99() { local p; p=$(val latency "$1" .latency_us.p99); [[ $p == - ]] && echo - || echo "$(fmt "$p") µs"; }
  c_storm() {
    local s; s=$(fmt "$(val storm_hit "$1" .connects_per_s)")
    [[ $1 == lorabroker* ]] && s+=" / $(fmt "$(val storm_miss "$1" .connects_per_s)")"
    echo "$s"
  }
  c_idle() { local i; i=$(val idle "$1" .bytes_per_connection); [[ $i == - ]] && echo - || echo "$(fmt "$i") B"; }
  cells_line "fan-out, $FANOUT_SUBS subscribers, $PAYLOAD B: zero-loss publishes/s (deliveries/s)" c_fz
  cells_line "many devices, $DEVICES subscribers on $DEVICES topics: zero-loss msg/s" c_dz
  cells_line "fan-out at full speed: delivered msg/s (loss)" c_ff
  cells_line "many devices at full speed: delivered msg/s (loss)" c_df
  cells_line "many devices at $(fmt "$CPU_RATE") msg/s: CPU µs per delivered message (lorabroker: node + NATS/Redis)" c_cpu
  cells_line "p99 latency at $(fmt $((LATENCY_RATE * FANOUT_SUBS))) deliveries/s (median of 3)" c_p99
  cells_line "connection storm: connects/s (lorabroker with API keys: cached / distinct)" c_storm
  cells_line "idle: broker RSS per subscribed connection ($(fmt "$IDLE"))" c_idle
  echo
  echo "From one run of \`benches/compare.sh\` ($(sed -n 's/^start: \([0-9:]*\) .*/\1 UTC/p' "$OUT/machine.txt")," \
    "$(sed -n 's/^machine: \([0-9]* CPUs\).*/\1/p' "$OUT/machine.txt"), lorabroker" \
    "$(sed -n 's/^lorabroker: \([^,]*\),.*, \([a-z]*\) build$/\1, \2 build/p' "$OUT/machine.txt")):" \
    "zero-loss is the highest fixed publish rate at which every subscriber got every message, in pace" \
    "(bisection over $PROBE_DUR runs, at most $PROBES, within $(awk -v p="$PRECISION" 'BEGIN { printf "%.0f", (p - 1) * 100 }') %)."
}

# --- the QoS 1 table (persistent sessions, issue 14) -------------------------------------
QBROKERS=(lorabroker-1 mosquitto nats-mqtt)

q_row() { # q_row TITLE CASE JQ-PATH: one figure per broker, then lb-1's ratios
  local b cells=""
  for b in "${QBROKERS[@]}"; do cells+=" $(fmt "$(val "$2" "$b" "$3")") |"; done
  echo "| $1 |$cells $(ratio "$(val "$2" lorabroker-1 "$3")" "$(val "$2" mosquitto "$3")") | $(ratio "$(val "$2" lorabroker-1 "$3")" "$(val "$2" nats-mqtt "$3")") |"
}
q_zl_row() { # q_zl_row TITLE FIELD: the qos1 zero-loss figure per broker, then lb-1's ratios
  local b cells="" jp=".$2"
  for b in "${QBROKERS[@]}"; do cells+=" $(zl qos1 "$b" "$2") |"; done
  echo "| $1 |$cells $(ratio "$(val qos1_zero_loss lorabroker-1 "$jp")" "$(val qos1_zero_loss mosquitto "$jp")") | $(ratio "$(val qos1_zero_loss lorabroker-1 "$jp")" "$(val qos1_zero_loss nats-mqtt "$jp")") |"
}

qos1_table() {
  local zero="bisection over ${PROBE_DUR} fixed-rate runs" lat
  lat="at $(fmt "$QOS1_LATENCY_RATE") msg/s, 1 subscriber (median of 3 runs, $LAT_DUR)"
  echo "| QoS 1, persistent sessions, $PAYLOAD B | lorabroker-1 (sessions, JetStream file) | mosquitto (persistence true) | nats-mqtt (JetStream) | lb-1 ÷ mosquitto | lb-1 ÷ nats-mqtt |"
  echo "|---|---:|---:|---:|---:|---:|"
  q_row "1 subscriber, full speed ($DUR): delivered msg/s" qos1_max .delivered_per_s
  q_row "1 subscriber, full speed: loss" qos1_max .loss
  q_row "1 subscriber, full speed: DUP redeliveries" qos1_max .dup_redeliveries
  q_row "1 subscriber, full speed: p50 µs" qos1_max .latency_us.p50
  q_row "1 subscriber, full speed: p99 µs" qos1_max .latency_us.p99
  q_row "1 subscriber, full speed: broker CPU µs per delivery" qos1_max .broker_cpu_us_per_delivery
  q_row "1 subscriber, full speed: NATS+Redis CPU µs per delivery (lorabroker's bus)" qos1_max "$AUX_PER"
  q_row "$QOS1_SUBS subscribers, full speed ($DUR): delivered msg/s" qos1_max_subs .delivered_per_s
  q_row "$QOS1_SUBS subscribers, full speed: loss" qos1_max_subs .loss
  q_zl_row "1 subscriber: zero-loss msg/s ($zero)" zero_loss_per_s
  q_row "latency $lat: p50 µs" qos1_latency .latency_us.p50
  q_row "latency $lat: p99 µs" qos1_latency .latency_us.p99
  q_row "latency run: loss" qos1_latency .loss
  q_row "stored for an absent subscriber: $(fmt "$STORE_MESSAGES") messages, stored msg/s" store_cost .stored_per_s
  q_row "stored: JetStream stream bytes per message" store_cost .stream_bytes_per_message
  q_row "stored: disk bytes per message (allocated under the store directory)" store_cost .disk_bytes_per_message
  q_row "stored: store process RSS bytes per message (lorabroker: its nats-server)" store_cost .rss_bytes_per_message
  q_row "replay on reconnect: messages received of $(fmt "$STORE_MESSAGES")" store_cost .replayed
  q_row "replay on reconnect: msg/s" store_cost .replay_per_s
}

# The QoS 1 block of benches/RESULTS.md: machine, table, the run's QoS 1 lines.
qos1_block() {
  { echo '```'; cat "$OUT/machine.txt"; echo '```'; }
  echo
  qos1_table
  echo
  echo '```'
  jq -c 'select(.case | test("^(qos1|store_cost)"))' "$RESULTS"
  echo '```'
}

# The README's QoS 1 rows, in the style of its compact table.
qos1_readme() {
  local b cells1="" cells2="" cells3="" p l
  for b in "${QBROKERS[@]}"; do
    l=$(val qos1_max "$b" '(.loss * 1e6 | round / 1e4)')
    cells1+=" $(fmt "$(val qos1_max "$b" .delivered_per_s)") ($([[ $l == 0 ]] && echo "no loss" || echo "loss $l %")) |"
    p=$(val qos1_latency "$b" .latency_us.p99)
    cells2+=" $([[ $p == - ]] && echo - || echo "$(fmt "$p") µs") |"
    cells3+=" $(fmt "$(val store_cost "$b" .stream_bytes_per_message)") / $(fmt "$(val store_cost "$b" .disk_bytes_per_message)") / $(fmt "$(val store_cost "$b" .rss_bytes_per_message)") |"
  done
  echo "| QoS 1, persistent sessions | lorabroker (1 node, sessions on) | Mosquitto (persistence on) | nats-server (MQTT, JetStream) |"
  echo "|---|---:|---:|---:|"
  echo "| 1 persistent subscriber at full speed: delivered msg/s (loss) |$cells1"
  echo "| p99 latency at $(fmt "$QOS1_LATENCY_RATE") msg/s (median of 3) |$cells2"
  echo "| per message stored for an absent subscriber: stream / disk / RSS bytes |$cells3"
  echo
  echo "From one run of \`benches/compare.sh --shapes qos1,store_cost\` ($(sed -n 's/^start: \([0-9:]*\) .*/\1 UTC/p' "$OUT/machine.txt"), load as in benches/RESULTS.md); details and method there."
}

# replace_block FILE NAME CONTENT-FILE: the text between FILE's markers NAME becomes CONTENT.
replace_block() {
  python3 - "$@" <<'PY'
import re, sys
path, name, content = sys.argv[1], sys.argv[2], open(sys.argv[3]).read()
text = open(path).read()
begin, end = f"<!-- compare.sh:begin {name} -->", f"<!-- compare.sh:end {name} -->"
pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.S)
if len(pattern.findall(text)) != 1:
    sys.exit(f"{path}: expected one block {begin} ... {end}")
# Blank lines around the content, so that Markdown sees the comments as blocks of their own.
new = pattern.sub(lambda _: begin + "\n\n" + content.strip("\n") + "\n\n" + end, text)
if new != text:
    open(path, "w").write(new)
PY
}

# has_cases REGEX: whether $RESULTS has a line whose case matches REGEX.
has_cases() {
  jq -e -s --arg re "$1" 'any(.[]; (.case // "") | test($re))' "$RESULTS" >/dev/null
}

# update_docs: README.md's and benches/RESULTS.md's generated blocks from $RESULTS.
update_docs() {
  local tmp
  tmp=$(mktemp -d /tmp/compare-docs.XXXXXX)
  if grep -q 'debug build\|--quick' "$OUT/machine.txt"; then
    echo "warning: the docs get the figures of a --quick or --debug run" >&2
  fi
  # Blocks whose shapes the run did not measure (an older run given to --report) stay.
  if main_shapes && has_cases '^(fanout|devices|latency|idle|storm)'; then
    readme_table >"$tmp/performance"
    { echo '```'; cat "$OUT/machine.txt"; echo '```'; } >"$tmp/machine"
    results_table >"$tmp/results"
    targets >"$tmp/targets"
    { echo '```'; cat "$RESULTS"; echo '```'; } >"$tmp/raw"
    replace_block README.md performance "$tmp/performance"
    local b
    for b in machine results targets raw; do replace_block benches/RESULTS.md "$b" "$tmp/$b"; done
    echo "updated README.md (performance) and benches/RESULTS.md (machine, results, targets, raw) from $RESULTS" >&2
  fi
  if qos1_shapes && has_cases '^(qos1|store_cost)'; then
    qos1_readme >"$tmp/qos1-readme"
    qos1_block >"$tmp/qos1"
    replace_block README.md qos1 "$tmp/qos1-readme"
    replace_block benches/RESULTS.md qos1 "$tmp/qos1"
    echo "updated README.md (qos1) and benches/RESULTS.md (qos1) from $RESULTS" >&2
  fi
  rm -rf "$tmp"
}

if [[ -n $REPORT ]]; then
  use_report "$REPORT"
else
  measure
  echo "end: $(load_state)" >>"$OUT/machine.txt"
fi
{
  cat "$OUT/machine.txt"
  if main_shapes; then
    echo
    results_table
    echo
    echo "Targets of issue 13 (lorabroker-1 against the same run's figures):"
    targets
    echo
    echo "Ratios: lorabroker-1's figure divided by the other broker's (higher is better for msg/s"
    echo "and connects/s, lower is better for latency, bytes and CPU). Broker CPU is the nodes'"
    echo "user+system time during the measured phase; for lorabroker the NATS and Redis it needs"
    echo "are reported apart (aux_cpu_s in results.jsonl, the NATS+Redis rows). Zero-loss rates:"
    echo "the highest fixed rate (bisection, $PROBE_DUR probes, ≤ $PROBES) at which every message reached"
    echo "every subscriber, the publisher kept ≥ $PUBLISH_MIN of the rate and the deliveries ≥ $PACE_MIN of it."
  fi
  if qos1_shapes; then
    echo
    qos1_table
  fi
  echo "Raw results: $RESULTS"
} | tee "$OUT/table.md"
if [[ $UPDATE_DOCS == yes || ($UPDATE_DOCS == auto && -z $REPORT && $QUICK == 0 && $PROFILE == release) ]]; then
  update_docs
fi
