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
    fn this_process_has_a_resident_set() {
        assert!(rss_bytes(&[std::process::id()]).unwrap() > 0);
    }
}
