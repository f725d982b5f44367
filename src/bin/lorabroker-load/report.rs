//! What a scenario measured, printed twice: as human text (stderr) and as one JSON line
//! (stdout) that scripts such as `benches/compare.sh` read.

use hdrhistogram::Histogram;
use serde_json::{json, Map, Value};

/// Latencies in microseconds, from 1 µs to 10 minutes, 3 significant digits.
pub struct Latency(Histogram<u64>);

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        // The bounds are constants that hdrhistogram accepts.
        Latency(Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds"))
    }

    /// Records one latency (clamped into the histogram's range).
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    /// Adds another histogram's counts.
    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// The percentiles as JSON (microseconds), or `null` when nothing was recorded.
    fn json(&self) -> Value {
        if self.0.is_empty() {
            return Value::Null;
        }
        let h = &self.0;
        json!({
            "count": h.len(),
            "p50": h.value_at_quantile(0.50),
            "p90": h.value_at_quantile(0.90),
            "p99": h.value_at_quantile(0.99),
            "p999": h.value_at_quantile(0.999),
            "max": h.max(),
        })
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

/// The outcome of one scenario: named figures in insertion order.
pub struct Report {
    scenario: &'static str,
    target: String,
    fields: Vec<(&'static str, Value)>,
}

impl Report {
    /// A report of `scenario` against `target` (a label such as `lorabroker-1`).
    pub fn new(scenario: &'static str, target: &str) -> Self {
        Report {
            scenario,
            target: target.to_owned(),
            fields: Vec::new(),
        }
    }

    /// Adds a figure.
    pub fn set(&mut self, name: &'static str, value: impl Into<Value>) -> &mut Self {
        self.fields.push((name, value.into()));
        self
    }

    /// Adds a rate, rounded to a tenth.
    pub fn rate(&mut self, name: &'static str, count: u64, seconds: f64) -> &mut Self {
        let r = if seconds > 0.0 {
            count as f64 / seconds
        } else {
            0.0
        };
        self.set(name, (r * 10.0).round() / 10.0)
    }

    /// The figure named `name`, if set.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields.iter().find(|(k, _)| *k == name).map(|(_, v)| v)
    }

    /// Adds another report's figures.
    pub fn extend(&mut self, other: Report) {
        self.fields.extend(other.fields);
    }

    /// Adds the latency percentiles under `latency_us`.
    pub fn latency(&mut self, h: &Latency) -> &mut Self {
        self.set("latency_us", h.json())
    }

    /// The one-line JSON form.
    pub fn json_line(&self) -> String {
        let mut m = Map::new();
        m.insert("scenario".into(), self.scenario.into());
        m.insert("target".into(), self.target.clone().into());
        for (k, v) in &self.fields {
            m.insert((*k).into(), v.clone());
        }
        Value::Object(m).to_string()
    }

    /// The human form, one figure per line.
    pub fn text(&self) -> String {
        let mut s = format!("{} against {}\n", self.scenario, self.target);
        for (k, v) in &self.fields {
            let shown = match v {
                Value::Object(o) => o
                    .iter()
                    .map(|(k, v)| format!("{k} {}", human_us(k, v)))
                    .collect::<Vec<_>>()
                    .join("  "),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            s.push_str(&format!("  {k:<22} {shown}\n"));
        }
        s
    }

    /// Prints the text to stderr and the JSON line to stdout.
    pub fn print(&self) {
        eprint!("{}", self.text());
        println!("{}", self.json_line());
    }
}

/// A latency figure in readable units (the count stays a count).
fn human_us(key: &str, v: &Value) -> String {
    match (key, v.as_u64()) {
        ("count", _) | (_, None) => v.to_string(),
        (_, Some(us)) if us >= 10_000 => format!("{:.1}ms", us as f64 / 1000.0),
        (_, Some(us)) => format!("{us}µs"),
    }
}

/// Sum of the resident set sizes (VmRSS) of `pids`, in bytes.
pub fn rss_bytes(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| anyhow::anyhow!("cannot read /proc/{pid}/status: {e}"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS for process {pid}"))?;
        total += kib * 1024;
    }
    Ok(total)
}

/// Clock ticks per second of /proc/PID/stat times (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// CPU time (user + system) used so far by `pids`, in seconds; processes that cannot be
/// read count as zero.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let mut ticks = 0u64;
    for pid in pids {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces) start at field 3;
        // utime and stime are fields 14 and 15.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        for i in [11, 12] {
            ticks += fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ticks as f64 / USER_HZ
}

/// CPU used by the broker, its backing services and this load generator between [`CpuMeter::start`] and
/// [`CpuMeter::report`].
pub struct CpuMeter {
    broker: Vec<u32>,
    aux: Vec<u32>,
    at_start: (f64, f64, f64),
    started: std::time::Instant,
}

impl CpuMeter {
    /// Starts measuring the CPU time of `broker` and `aux` (e.g. NATS and Redis) processes.
    pub fn start(broker: &[u32], aux: &[u32]) -> Self {
        CpuMeter {
            broker: broker.to_vec(),
            aux: aux.to_vec(),
            at_start: (
                cpu_seconds(broker),
                cpu_seconds(aux),
                cpu_seconds(&[std::process::id()]),
            ),
            started: std::time::Instant::now(),
        }
    }

    /// Adds the CPU seconds used since the start, as a share of one core over the wall
    /// time since the start (`…_cpu_percent`), and per `unit` of work (`ops` of them), in
    /// microseconds; nothing when no broker PID was given.
    pub fn report(&self, r: &mut Report, ops: u64, unit: &'static str) {
        if self.broker.is_empty() {
            return;
        }
        let wall = self.started.elapsed().as_secs_f64();
        let percent = |s: f64| {
            if wall > 0.0 {
                (s / wall * 1000.0).round() / 10.0
            } else {
                0.0
            }
        };
        let broker = cpu_seconds(&self.broker) - self.at_start.0;
        let per = |s: f64| ((s * 1e6 / ops.max(1) as f64) * 100.0).round() / 100.0;
        r.set("broker_cpu_s", (broker * 100.0).round() / 100.0);
        r.set(unit, per(broker));
        r.set("broker_cpu_percent", percent(broker));
        if !self.aux.is_empty() {
            let aux = cpu_seconds(&self.aux) - self.at_start.1;
            r.set("aux_cpu_s", (aux * 100.0).round() / 100.0);
            r.set("aux_cpu_percent", percent(aux));
        }
        let own = cpu_seconds(&[std::process::id()]) - self.at_start.2;
        r.set("loadgen_cpu_s", (own * 100.0).round() / 100.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_json_line_is_one_parseable_line() {
        let mut h = Latency::new();
        h.record(120);
        h.record(15_000);
        let mut r = Report::new("fanout", "mosquitto");
        r.set("delivered", 10u64).rate("delivered_per_s", 10, 0.5);
        r.latency(&h);
        let line = r.json_line();
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["delivered_per_s"], 20.0);
        assert_eq!(v["latency_us"]["count"], 2);
        assert!(r.text().contains("15.0ms"));
    }

    #[test]
    fn this_process_has_a_resident_set_and_uses_cpu() {
        assert!(rss_bytes(&[std::process::id()]).unwrap() > 0);
        let meter = CpuMeter::start(&[std::process::id()], &[]);
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(0u64);
        }
        let mut r = Report::new("cpu", "self");
        meter.report(&mut r, 10, "broker_cpu_us_per_op");
        let v: Value = serde_json::from_str(&r.json_line()).unwrap();
        assert!(v["broker_cpu_s"].as_f64().unwrap() >= 0.0);
        assert!(v["broker_cpu_percent"].as_f64().unwrap() >= 0.0);
        assert_eq!(r.get("broker_cpu_s"), Some(&v["broker_cpu_s"]));
        assert_eq!(r.get("nothing"), None);
    }
}
