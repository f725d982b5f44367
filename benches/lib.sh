# Shared shell of the comparison scripts (benches/compare.sh, benches/transports.sh,
# benches/scale.sh):
# sourced by them, not run. It parses their common options, builds and copies the
# binaries, starts servers on free loopback ports, runs `lorabroker-load` and reads its
# JSON lines back for the tables. Each script sets SCRIPT (its path, for the header) first.

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

# parse_args ARGS...: the options every script takes (help: the script's header comment).
parse_args() {
  ARGS="$*"
  QUICK=0
  OUT=""
  WAIT_QUIET=0
  REPORT=""
  PROFILE=release
  UPDATE_DOCS=auto
  SHAPES=all
  while (($#)); do
    case "$1" in
      --quick) QUICK=1 ;;
      --out) OUT="$2"; shift ;;
      --wait-quiet) WAIT_QUIET="$2"; shift ;;
      --report) REPORT="$2"; shift ;;
      --debug) PROFILE=debug ;;
      --update-docs) UPDATE_DOCS=yes ;;
      --no-update-docs) UPDATE_DOCS=no ;;
      --shapes) SHAPES="$2"; shift ;;
      -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SCRIPT"; exit 0 ;;
      *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
  done
  # Shapes. The full run uses the targets' shapes; --quick shrinks them.
  if ((QUICK)); then
    DUR=2s; LAT_DUR=2s; DEVICES=200; IDLE=2000; STORM=1000; STORM_MISS=300; ROUNDS=1; DL_RATE=1000
    CPU_RATE=10000; CPU_DUR=2s
    PROBE_DUR=1s; PROBES=3; FANOUT_LO=1000; FANOUT_HI=100000; DEVICES_LO=1000; DEVICES_HI=100000
  else
    DUR=8s; LAT_DUR=5s; DEVICES=1000; IDLE=10000; STORM=5000; STORM_MISS=2000; ROUNDS=4; DL_RATE=2000
    CPU_RATE=50000; CPU_DUR=8s
    PROBE_DUR=3s; PROBES=7; FANOUT_LO=5000; FANOUT_HI=400000; DEVICES_LO=5000; DEVICES_HI=400000
  fi
  FANOUT_SUBS=10
  PAYLOAD=200
  # QoS 1 with persistent sessions (compare.sh's qos1 and store_cost shapes): the
  # fixed rate of the latency runs (one subscriber), the zero-loss bisection's range, the
  # subscribers of the wider fan-out run, and the messages stored for an absent subscriber.
  QOS1_LATENCY_RATE=2000
  QOS1_SUBS=10
  if ((QUICK)); then
    QOS1_LO=200; QOS1_HI=20000; STORE_MESSAGES=10000
  else
    QOS1_LO=500; QOS1_HI=100000; STORE_MESSAGES=100000
  fi
  LATENCY_RATE=5000 # messages/s to 10 subscribers: 50,000 deliveries/s
  # Zero-loss bisection (see `bisect`): stop when the bracket is this narrow; a probe whose
  # publisher reached less than PUBLISH_MIN of the asked rate counts as failed (the load
  # generator, or the broker's backpressure on an MQTT publisher, set the rate), and so
  # does one whose deliveries/s fell below PACE_MIN of the asked rate: a broker that queues
  # and delivers a short probe's messages late has lost nothing yet, but cannot sustain the
  # rate (a debug build "passed" 56k msg/s delivering 29k/s). PACE_MIN=0 in the environment
  # counts loss alone.
  PRECISION=1.05
  PUBLISH_MIN=0.95
  PACE_MIN=${PACE_MIN:-0.95}
}
SHAPE_VARS=(SHAPES QOS1_LATENCY_RATE QOS1_LO QOS1_HI QOS1_SUBS STORE_MESSAGES QUICK PROFILE DUR LAT_DUR DEVICES IDLE STORM STORM_MISS ROUNDS DL_RATE CPU_RATE CPU_DUR
  PROBE_DUR PROBES FANOUT_LO FANOUT_HI DEVICES_LO DEVICES_HI FANOUT_SUBS PAYLOAD LATENCY_RATE PRECISION PUBLISH_MIN PACE_MIN)

# want SHAPE: whether SHAPE is among those asked for (`--shapes LIST`, comma-separated;
# default all).
want() {
  [[ $SHAPES == all || ",$SHAPES," == *",$1,"* ]]
}

# use_report DIR: read the results of an earlier run (--report DIR) with the shapes that run
# had (saved by `setup` in DIR/shapes.sh), so that the table's titles match its figures.
use_report() {
  OUT=$1
  RESULTS="$OUT/results.jsonl"
  [[ -r $RESULTS ]] || { echo "no $RESULTS" >&2; exit 1; }
  # shellcheck source=/dev/null
  [[ -r $OUT/shapes.sh ]] && . "$OUT/shapes.sh"
  return 0
}

# What the figures were measured on; the state is sampled again before each broker.
load_state() {
  echo "$(date -u +%H:%M:%S) $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15-min load), $(pgrep -c rustc || true) rustc running"
}

# setup TOOLS...: checks the tools, builds (release; --debug for smoke runs only), makes
# $WORK, $OUT and $RESULTS, copies the binaries to $LB and $LOAD, waits for a quiet machine
# if asked, writes $OUT/machine.txt and arranges that every process in PIDS is stopped on exit.
setup() {
  local tool
  for tool in cargo jq "$@"; do
    command -v "$tool" >/dev/null || { echo "$SCRIPT needs $tool on PATH" >&2; exit 1; }
  done
  # Many connections from one process: raise the descriptor limit as far as allowed (the
  # hard limit; fs.nr_open when that is unlimited). The servers started later inherit it.
  local hard
  hard=$(ulimit -Hn)
  [[ $hard == unlimited ]] && hard=$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)
  ulimit -n "$hard" 2>/dev/null || ulimit -n 65536 2>/dev/null || true

  echo "== building $PROFILE binaries" >&2
  local profile_flag=(--release)
  [[ $PROFILE == debug ]] && profile_flag=()
  cargo build "${profile_flag[@]}" --quiet --bin lorabroker --bin lorabroker-load
  local target_dir
  target_dir=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)

  WORK=$(mktemp -d /tmp/lorabroker-bench.XXXXXX)
  OUT=${OUT:-$WORK}
  mkdir -p "$OUT"
  RESULTS="$OUT/results.jsonl"
  : >"$RESULTS"
  declare -p "${SHAPE_VARS[@]}" | sed 's/^declare -[-a-z]* //' >"$OUT/shapes.sh"
  # Private copies, so that a concurrent build cannot swap the binaries mid-run.
  cp "$target_dir/$PROFILE/lorabroker" "$target_dir/$PROFILE/lorabroker-load" "$WORK/"
  LB="$WORK/lorabroker"
  LOAD="$WORK/lorabroker-load"

  if ((WAIT_QUIET)); then
    echo "== waiting up to $WAIT_QUIET min for a quiet machine (no rustc, 1-min load < 0.5)" >&2
    for _ in $(seq 1 $((WAIT_QUIET * 6))); do
      if ! pgrep -x rustc >/dev/null && awk '{ exit !($1 < 0.5) }' /proc/loadavg; then break; fi
      sleep 10
    done
  fi
  {
    echo "machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM, $(uname -sr)"
    echo "lorabroker: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo ' (with uncommitted changes in src/)'), $(rustc --version), $PROFILE build"
    echo "mosquitto: $(mosquitto -h 2>/dev/null | head -n1); nats-server: $(nats-server --version); redis: $(redis-server --version | awk '{print $3}')"
    echo "command: $SCRIPT $ARGS (ulimit -n $(ulimit -n))"
    echo "start: $(load_state)"
  } | tee "$OUT/machine.txt" >&2

  PIDS=()
  trap cleanup EXIT
}

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"/*-js
}

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

# probe CASE LABEL RATE ARGS...: one fixed-rate run of `lorabroker-load ARGS --rate RATE
# --duration $PROBE_DUR`, kept in $RESULTS as case CASE_probe with probe_rate, pace
# (deliveries/s over the asked deliveries/s), ok and why; ok means every expected delivery
# arrived (no loss, no subscriber closed), the publisher reached at least PUBLISH_MIN of
# RATE and the pace was at least PACE_MIN. Prints the line on stdout; the status is ok's.
# Then waits 1 s for the broker to drain.
probe() {
  local case=$1 label=$2 rate=$3; shift 3
  local line err
  if line=$("$LOAD" "$@" --rate "$rate" --duration "$PROBE_DUR" 2>"$WORK/probe.err"); then
    line=$(jq -c --arg case "${case}_probe" --argjson r "$rate" --argjson min "$PUBLISH_MIN" \
      --argjson pace "$PACE_MIN" '
      (if .published > 0 then .delivered_per_s / ($r * .expected / .published) else 0 end) as $p
      | . + {case: $case, probe_rate: $r, pace: ($p * 1000 | round / 1000)}
      | (if .published_per_s < $min * $r then "publisher reached only \(.published_per_s)/s"
         elif .lost > 0 or .delivered < .expected then "lost \(.lost) of \(.expected)"
         elif .subscribers_closed > 0 then "broker closed \(.subscribers_closed) subscribers"
         elif $p < $pace then "fell behind: delivered \(.delivered_per_s)/s, \(.pace) of the rate"
         else null end) as $why
      | . + {ok: ($why == null), why: $why}' <<<"$line")
  else
    err=$(tail -n 1 "$WORK/probe.err")
    line=$(jq -c -n --arg case "${case}_probe" --arg t "$label" --argjson r "$rate" --arg e "$err" \
      '{scenario: "probe", target: $t, case: $case, probe_rate: $r, ok: false,
        why: ("load generator failed: " + $e)}')
  fi
  cat "$WORK/probe.err" >>"$OUT/load.log"
  echo "$line" >>"$RESULTS"
  jq -r '"   \(.probe_rate)/s: " + (if .ok then "ok" else "FAILED, \(.why)" end)
    + (if .delivered_per_s then " (delivered \(.delivered_per_s)/s, published \(.published_per_s)/s)" else "" end)' <<<"$line" >&2
  echo "$line"
  sleep 1
  jq -e .ok <<<"$line" >/dev/null
}

# bisect CASE LO HI ARGS...: the highest fixed rate in LO..HI (messages/s from the upstream)
# at which `probe` succeeds, by bisection on a log scale: LO is taken as passing and HI as
# failing, each probe at the geometric midpoint narrows the bracket, until HI/LO <=
# PRECISION or after PROBES probes. If no probe passed, LO itself is probed. ARGS are
# lorabroker-load's (with --label, the scenario and its shape; bisect adds --rate and
# --duration). Writes a line with case CASE_zero_loss: zero_loss_per_s (null when even LO
# lost; below_per_s says so), the deliveries/s and CPU per delivery measured at that rate
# (broker; NATS+Redis for lorabroker as aux), first_failing_per_s and why it failed, and
# at_upper_bound when no probe failed (the real figure is above HI's last bracket).
bisect() {
  local case=$1 lo=$2 hi=$3; shift 3
  local label=broker prev="" a
  for a in "$@"; do [[ $prev == --label ]] && label=$a; prev=$a; done
  local bottom=$lo top=$hi n=0 rate line good_line="" bad_line="null"
  echo "-- $case zero-loss rate in $lo..$hi/s (${PROBE_DUR} probes): lorabroker-load $* --rate R --duration $PROBE_DUR" >&2
  while ((n < PROBES)) && awk -v l="$bottom" -v h="$top" -v p="$PRECISION" 'BEGIN { exit !(h > l * p) }'; do
    rate=$(awk -v l="$bottom" -v h="$top" 'BEGIN { printf "%.0f", sqrt(l * h) }')
    n=$((n + 1))
    if line=$(probe "$case" "$label" "$rate" "$@"); then
      bottom=$rate good_line=$line
    else
      top=$rate bad_line=$line
    fi
  done
  if [[ -z $good_line ]]; then
    n=$((n + 1))
    if line=$(probe "$case" "$label" "$lo" "$@"); then good_line=$line; else bad_line=$line; fi
  fi
  jq -c -n --argjson g "${good_line:-null}" --argjson b "$bad_line" --arg case "${case}_zero_loss" \
    --arg t "$label" --argjson lo "$lo" --argjson hi "$hi" --argjson n "$n" --arg d "$PROBE_DUR" '
    def per(s): if s == null or $g.delivered == 0 then null else (s * 1e8 / $g.delivered | round / 100) end;
    {scenario: ($g.scenario // $b.scenario // "probe"), target: $t, case: $case,
     zero_loss_per_s: $g.probe_rate,
     zero_loss_deliveries_per_s: $g.delivered_per_s,
     published_per_s: $g.published_per_s, pace: $g.pace,
     broker_cpu_us_per_delivery: per($g.broker_cpu_s),
     aux_cpu_us_per_delivery: per($g.aux_cpu_s),
     cpu_us_per_delivery: per(if $g.broker_cpu_s then $g.broker_cpu_s + ($g.aux_cpu_s // 0) else null end),
     latency_us: $g.latency_us,
     below_per_s: (if $g == null then $lo else null end),
     first_failing_per_s: $b.probe_rate, first_failing_why: $b.why,
     at_upper_bound: ($b == null),
     range: [$lo, $hi], probes: $n, probe_duration: $d}' >>"$RESULTS"
  tail -n 1 "$RESULTS" | jq -r '"   zero loss up to \(.zero_loss_per_s // "(none, below \(.below_per_s))")/s"
    + " (\(.zero_loss_deliveries_per_s // "-") deliveries/s), first failing \(.first_failing_per_s // "-")/s after \(.probes) probes"' >&2
}

# certificates DIR (inside $WORK): a throw-away CA (ca.pem) and a P-256 server certificate
# for localhost and 127.0.0.1 (server.pem, server-key.pem) signed by it with openssl, valid
# for two days; readable by everyone, since Mosquitto started as root reads them after
# dropping to its own user. (transports.sh and scale.sh)
certificates() {
  local dir=$1
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=lorabroker bench CA (throw-away)" -keyout "$dir/ca-key.pem" -out "$dir/ca.pem" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$dir/server-key.pem" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca-key.pem" \
    -CAcreateserial -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null
  chmod 755 "$dir" && chmod 644 "$dir"/*.pem && chmod 711 "$WORK"
}

# backends: a private Redis and NATS (JetStream) for lorabroker; sets BACKENDS (the
# load generator's and the nodes' arguments) and AUX (their PIDs, whose CPU the load
# generator reports apart from the nodes'), NATS_PID and NATS_STORE (its store directory).
backends() {
  local redis_port nats_port redis_pid nats_pid
  redis_port=$(free_port)
  nats_port=$(free_port)
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$WORK" >"$OUT/redis.log" 2>&1 &
  redis_pid=$!
  PIDS+=("$redis_pid")
  nats-server -js -a 127.0.0.1 -p "$nats_port" -sd "$WORK/nats-js" >"$OUT/nats.log" 2>&1 &
  nats_pid=$!
  PIDS+=("$nats_pid")
  wait_port "$redis_port" redis-server "$redis_pid"
  wait_port "$nats_port" nats-server "$nats_pid"
  BACKENDS=(--nats-url "nats://127.0.0.1:$nats_port" --redis-url "redis://127.0.0.1:$redis_port")
  NATS_PID=$nats_pid
  NATS_STORE="$WORK/nats-js"
  AUX=(--aux-pid "$nats_pid,$redis_pid")
}

# node NAME [VAR=VALUE...]: starts a `lorabroker serve` node on the backends, with extra
# configuration in the environment (e.g. LORABROKER_MQTT__TLS__LISTEN=…); sets NODE_PID
# and NODE_PORT (its plain MQTT listener).
node() {
  local name=$1; shift
  NODE_PORT=$(free_port)
  local http
  http=$(free_port)
  # The load comes from one address with one key, and the other brokers run without
  # limits: lorabroker's rate limits and connection quotas are off for the comparison.
  env "$@" \
  LORABROKER_LIMITS__ACCEPTS_PER_IP__PER_SECOND=0 \
  LORABROKER_LIMITS__CONNECTS_PER_KEY__PER_SECOND=0 \
  LORABROKER_LIMITS__DOWNLINKS_PER_KEY__PER_SECOND=0 \
  LORABROKER_LIMITS__DOWNLINKS_PER_APPLICATION__PER_SECOND=0 \
  LORABROKER_LIMITS__SUBSCRIBES_PER_CONNECTION__PER_SECOND=0 \
  LORABROKER_LIMITS__MAX_CONNECTIONS_PER_APPLICATION=0 \
  LORABROKER_LIMITS__MAX_CONNECTIONS_PER_KEY=0 \
  LORABROKER_LOG__LEVEL=warn "$LB" serve --mqtt-listen "127.0.0.1:$NODE_PORT" \
    --http-listen "127.0.0.1:$http" --node-name "$name" "${BACKENDS[@]}" >"$OUT/$name.log" 2>&1 &
  NODE_PID=$!
  PIDS+=("$NODE_PID")
  wait_port "$NODE_PORT" "lorabroker $name" "$NODE_PID"
}

# mosquitto_start NAME PORT [LISTENERS [SETTINGS]]: a private, anonymous `mosquitto -c` with
# a plain listener on PORT and the extra listener blocks LISTENERS (config text); SETTINGS
# (config text) replaces `persistence false`. Sets MOSQ_PID.
mosquitto_start() {
  local name=$1 port=$2 listeners=${3:-} settings=${4:-persistence false}
  cat >"$WORK/$name.conf" <<EOF
allow_anonymous true
$settings
log_dest stderr
log_type error
log_type warning
connection_messages false
listener $port 127.0.0.1
$listeners
EOF
  mosquitto -c "$WORK/$name.conf" >"$OUT/$name.log" 2>&1 &
  MOSQ_PID=$!
  PIDS+=("$MOSQ_PID")
  wait_port "$port" "mosquitto $name" "$MOSQ_PID"
}

# val CASE TARGET JQ-PATH -> the figure (the median when a case ran more than once), or "-"
val() {
  jq -s -r --arg c "$1" --arg t "$2" "[.[] | select(.case == \$c and .target == \$t) | $3 | numbers]
    | sort | if length == 0 then \"-\" else .[(length - 1) / 2 | floor] end" "$RESULTS"
}
ratio() { # ratio A B -> A/B with two decimals, or "-"
  awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f", a / b }'
}
