//! Loading the layers of a [`Config`] and reporting what is wrong with them in the
//! operator's words: every problem at once, once each, as `key = value: expected …
//! (where it came from)`, without figment's profile prefix or Rust type names.
//!
//! serde stops at the first error of a struct, so the merged data is deserialized in a
//! loop: each bad key is reported, taken out (its default applies), and the rest is tried
//! again, until everything left deserializes. The semantic checks of
//! [`Config::validate`] then run on that, so a bad type and a bad range elsewhere are
//! reported together.

use std::path::Path;

use figment::error::{Actual, Kind};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::Serialize;

use super::{Config, ConfigError, DEFAULT_CONFIG_FILE, TOP_LEVEL_KEYS};

/// Prefix of the environment variables read.
const ENV_PREFIX: &str = "LORABROKER_";
/// Name of the command-line layer, as reported in problems.
const FLAGS: &str = "command-line flags";
/// Longest rendering of a bad value in a message.
const MAX_VALUE_LEN: usize = 60;
/// A bound on the report-and-retry loop (one key is removed per round).
const MAX_ROUNDS: usize = 1000;

/// Defaults ← `file` (or [`DEFAULT_CONFIG_FILE`] when present) ← environment ← flags,
/// deserialized and validated; see the module docs.
pub(super) fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Config, ConfigError> {
    let figment = layers(file, overrides)?;
    // Reading the layers fails only for a file that is not TOML or an unreadable file.
    let mut data: Dict = figment
        .extract()
        .map_err(|e| ConfigError::Invalid(e.into_iter().map(|e| unreadable(&e)).collect()))?;
    let mut problems = Vec::new();
    let mut config = None;
    for _ in 0..MAX_ROUNDS {
        let errors = match Figment::from(Serialized::defaults(&data)).extract::<Config>() {
            Ok(c) => {
                config = Some(c);
                break;
            }
            Err(errors) => errors,
        };
        let mut progress = false;
        for error in errors {
            let path = error.path.join(".");
            let value = find_mut(&mut data, &error.path).map(|v| v.clone());
            let Some(value) = value else {
                problems.push(without_key(&error));
                continue;
            };
            // Environment variables that look like numbers or booleans arrive as such;
            // a string setting (a token, a name) takes them as written.
            if matches!(&error.kind, Kind::InvalidType(_, e) if e == "a string") {
                if let Some(text) = scalar_text(&value) {
                    if let Some(slot) = find_mut(&mut data, &error.path) {
                        *slot = Value::from(text);
                        progress = true;
                        continue;
                    }
                }
            }
            problems.push(describe(&figment, &path, &value, &error.kind));
            progress |= remove(&mut data, &error.path);
        }
        if !progress {
            break;
        }
    }
    let Some(config) = config else {
        return Err(ConfigError::Invalid(problems));
    };
    if let Err(ConfigError::Invalid(invalid)) = config.validate() {
        problems.extend(
            invalid
                .into_iter()
                .map(|p| with_source(&figment, problem_key(&p), p.clone())),
        );
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// The figment of every layer, before extraction.
fn layers(file: Option<&Path>, overrides: impl Serialize) -> Result<Figment, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    match file {
        Some(path) if !path.exists() => {
            return Err(ConfigError::MissingFile(path.display().to_string()))
        }
        Some(path) => figment = figment.merge(Toml::file_exact(path)),
        None if Path::new(DEFAULT_CONFIG_FILE).exists() => {
            figment = figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
        }
        None => {}
    }
    Ok(figment
        .merge(
            // Sections need `__` (LORABROKER_MQTT__LISTEN); of the names without one,
            // only top-level keys count. That leaves out the test fixtures'
            // LORABROKER_TEST_* and the LORABROKER_MQTT_SERVICE_HOST-style variables
            // Kubernetes injects for Services whose names start with "lorabroker".
            Env::prefixed(ENV_PREFIX)
                .filter(|k| {
                    k.as_str().contains("__")
                        || TOP_LEVEL_KEYS.contains(&k.as_str().to_ascii_lowercase().as_str())
                })
                .split("__"),
        )
        .merge(Flags(Serialized::globals(overrides))))
}

/// The command-line layer: flags as a partial nested map, named in problems.
struct Flags<T>(Serialized<T>);

impl<T: Serialize> Provider for Flags<T> {
    fn metadata(&self) -> Metadata {
        Metadata::named(FLAGS)
    }

    fn data(&self) -> Result<figment::value::Map<Profile, Dict>, figment::Error> {
        self.0.data()
    }
}

/// One line for a bad key: what it is, what was expected, where it was set.
fn describe(figment: &Figment, path: &str, value: &Value, kind: &Kind) -> String {
    let line = match kind {
        Kind::UnknownField(name, known) => {
            let section = path.rsplit_once('.').map(|(s, _)| s);
            let hint = match closest(name, known) {
                Some(k) => match section {
                    Some(s) => format!("; did you mean {s}.{k}?"),
                    None => format!("; did you mean {k}?"),
                },
                None => match section {
                    Some(s) => format!("; [{s}] has {}", known.join(", ")),
                    None => format!("; the sections and keys are {}", known.join(", ")),
                },
            };
            let what = if value.as_dict().is_some() {
                "unknown section"
            } else {
                "unknown key"
            };
            return with_source(figment, path, format!("{path}: {what}{hint}"));
        }
        Kind::InvalidType(_, expected) | Kind::InvalidValue(_, expected) => {
            format!(
                "{path} = {}: expected {}",
                render(value),
                words(path, expected)
            )
        }
        Kind::UnknownVariant(_, known) => {
            format!(
                "{path} = {}: expected one of {}",
                render(value),
                known.join(", ")
            )
        }
        other => format!("{path} = {}: {}", render(value), plain(&other.to_string())),
    };
    with_source(figment, path, line)
}

/// What serde expected, in the words of the configuration file.
fn words(path: &str, expected: &str) -> String {
    let integer = [
        "u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize",
    ];
    if integer.contains(&expected) {
        if path.ends_with("_size") || path.ends_with("bytes") {
            "a number of bytes".into()
        } else {
            "a whole number".into()
        }
    } else if expected == "f32" || expected == "f64" {
        "a number".into()
    } else if expected == "a duration" {
        "a duration such as 10s, 500ms or 5m".into()
    } else if expected == "a boolean" {
        "true or false".into()
    } else if expected.starts_with("struct ") || expected == "a map" {
        "a section of keys".into()
    } else {
        plain(expected)
    }
}

/// figment's and serde's messages without their backticks.
fn plain(message: &str) -> String {
    message.replace('`', "")
}

/// `value` as a reader would write it, shortened.
fn render(value: &Value) -> String {
    if value.as_dict().is_some() {
        return "a section".into();
    }
    let mut s = serde_json::to_string(value).unwrap_or_else(|_| "?".into());
    if s.chars().count() > MAX_VALUE_LEN {
        s = s.chars().take(MAX_VALUE_LEN).collect::<String>() + "…";
    }
    s
}

/// The key a [`Config::validate`] message starts with (`mqtt.listen: …`).
fn problem_key(problem: &str) -> &str {
    problem.split([':', ' ']).next().unwrap_or(problem)
}

/// `line` followed by where the value at `path` was set, unless it is a default.
fn with_source(figment: &Figment, path: &str, line: String) -> String {
    match source(figment, path) {
        Some(source) => format!("{line} ({source})"),
        None => line,
    }
}

/// Where the value at `path` was set: the file, the environment variable, the flags.
fn source(figment: &Figment, path: &str) -> Option<String> {
    let metadata = figment.find_metadata(path)?;
    if let Some(file) = metadata.source.as_ref().and_then(|s| s.file_path()) {
        return Some(format!("in {}", file.display()));
    }
    if metadata.name.contains("environment variable") {
        return Some(env_var(figment, path));
    }
    (metadata.name == FLAGS).then(|| FLAGS.to_owned())
}

/// The environment variable that sets `path` (for a section: the first one under it).
fn env_var(figment: &Figment, path: &str) -> String {
    let mut path = path.to_owned();
    while let Ok(Value::Dict(_, dict)) = figment.find_value(&path) {
        match dict.keys().next() {
            Some(k) => path = format!("{path}.{k}"),
            None => break,
        }
    }
    format!(
        "{ENV_PREFIX}{}",
        path.split('.')
            .map(str::to_ascii_uppercase)
            .collect::<Vec<_>>()
            .join("__")
    )
}

/// The known name closest to a misspelt `name`, if one is close.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::jaro_winkler(name, k), *k))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

/// A problem figment could not tie to a key (e.g. a file that is not TOML).
fn unreadable(error: &figment::Error) -> String {
    let file = error
        .metadata
        .as_ref()
        .and_then(|m| m.source.as_ref())
        .and_then(|s| s.file_path())
        .map(|p| format!("{}: ", p.display()))
        .unwrap_or_default();
    format!("{file}{}", plain(&error.kind.to_string()))
}

/// A problem with a path that is not in the data (should not happen; reported raw).
fn without_key(error: &figment::Error) -> String {
    let path = error.path.join(".");
    if path.is_empty() {
        plain(&error.kind.to_string())
    } else {
        format!("{path}: {}", plain(&error.kind.to_string()))
    }
}

/// A number or boolean as the text it was written as.
fn scalar_text(value: &Value) -> Option<String> {
    match value.to_actual() {
        Actual::Unsigned(n) => Some(n.to_string()),
        Actual::Signed(n) => Some(n.to_string()),
        Actual::Float(n) => Some(n.to_string()),
        Actual::Bool(b) => Some(b.to_string()),
        Actual::Char(c) => Some(c.to_string()),
        _ => None,
    }
}

fn find_mut<'a>(data: &'a mut Dict, path: &[String]) -> Option<&'a mut Value> {
    let (first, rest) = path.split_first()?;
    let mut value = data.get_mut(first)?;
    for key in rest {
        value = match value {
            Value::Dict(_, d) => d.get_mut(key)?,
            _ => return None,
        };
    }
    Some(value)
}

/// Removes the value at `path`; whether there was one.
fn remove(data: &mut Dict, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    if parents.is_empty() {
        return data.remove(last).is_some();
    }
    match find_mut(data, parents) {
        Some(Value::Dict(_, d)) => d.remove(last).is_some(),
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::result_large_err)] // figment::Jail's closures return figment::Error
mod tests {
    use super::super::is_log_filter;
    use super::*;
    use serde_json::json;

    /// The problems of a failed load, one per line.
    fn problems(err: ConfigError) -> Vec<String> {
        match err {
            ConfigError::Invalid(p) => p,
            other => panic!("expected problems, got {other}"),
        }
    }

    #[test]
    fn every_problem_is_reported_at_once_in_the_users_words() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LORABROKER_MQTT__MAX_PACKET_SIZE", "abc");
            jail.set_env("LORABROKER_MQTT__CONNECT_TIMEOUT", "soon");
            jail.set_env("LORABROKER_MQTT__LISTN", "0.0.0.0:1");
            jail.set_env("LORABROKER_MQTT__LISTEN", "nowhere");
            jail.set_env("LORABROKER_HTTP__BAR", "2");
            jail.set_env("LORABROKER_TENANCY__MODE", "both");
            let p = problems(Config::load(None, json!({})).unwrap_err());
            let expected = [
                "mqtt.max_packet_size = \"abc\": expected a number of bytes (LORABROKER_MQTT__MAX_PACKET_SIZE)",
                "mqtt.connect_timeout = \"soon\": expected a duration such as 10s, 500ms or 5m (LORABROKER_MQTT__CONNECT_TIMEOUT)",
                "mqtt.listn: unknown key; did you mean mqtt.listen? (LORABROKER_MQTT__LISTN)",
                "http.bar: unknown key; [http] has listen, admin_token, metrics_listen, metrics_token, header_read_timeout, max_body_bytes, max_connections (LORABROKER_HTTP__BAR)",
            ];
            for line in expected {
                assert_eq!(
                    p.iter().filter(|l| *l == line).count(),
                    1,
                    "{line:?} once in {p:#?}"
                );
            }
            for key in ["mqtt.listen", "tenancy.mode"] {
                let n = p.iter().filter(|l| l.starts_with(key)).count();
                assert_eq!(n, 1, "{key} once in {p:#?}");
            }
            assert_eq!(p.len(), 6, "{p:#?}");
            let all = p.join("\n");
            for noise in ["default.", "usize", "`", "found"] {
                assert!(!all.contains(noise), "{noise:?} in {all}");
            }
            Ok(())
        });
    }

    #[test]
    fn problems_name_the_file_and_the_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                "[mqtt]\nmax_connections = -1\n[shutdown]\ngrace = \"1s\"\n",
            )?;
            let p = problems(
                Config::load(
                    Some(Path::new("node.toml")),
                    json!({"http": {"listen": "x"}}),
                )
                .unwrap_err(),
            );
            assert_eq!(
                p,
                [
                    "mqtt.max_connections = -1: expected a whole number (in node.toml)",
                    "shutdown.grace: unknown key; did you mean shutdown.grace_period? (in node.toml)",
                    "http.listen: \"x\" is not an address like 0.0.0.0:8080 (command-line flags)",
                ]
            );
            jail.create_file("broken.toml", "[mqtt\n")?;
            let p = problems(Config::load(Some(Path::new("broken.toml")), json!({})).unwrap_err());
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].contains("broken.toml"), "{p:?}");
            Ok(())
        });
    }

    #[test]
    fn string_settings_take_numbers_from_the_environment_as_written() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("LORABROKER_HTTP__ADMIN_TOKEN", "123456");
            jail.set_env("LORABROKER_NODE_NAME", "7");
            let c = Config::load(None, json!({})).map_err(|e| e.to_string())?;
            assert_eq!(c.http.admin_token, "123456");
            assert_eq!(c.node_name, "7");
            Ok(())
        });
    }

    #[test]
    fn a_log_level_that_is_not_one_stops_the_start() {
        for ok in [
            "info",
            "WARN",
            "lorabroker=debug,info",
            "off",
            "lorabroker::mqtt=trace",
        ] {
            assert!(is_log_filter(ok), "{ok}");
        }
        for bad in ["verbose", "", "lorabroker", "lorabroker=loud", "info,,"] {
            assert!(!is_log_filter(bad), "{bad}");
        }
        figment::Jail::expect_with(|jail| {
            jail.set_env("LORABROKER_LOG__LEVEL", "verbose");
            let p = problems(Config::load(None, json!({})).unwrap_err());
            assert_eq!(p.len(), 1, "{p:?}");
            assert!(p[0].starts_with("log.level = \"verbose\": expected a level (error, warn, info, debug, trace or off)"), "{p:?}");
            assert!(p[0].ends_with("(LORABROKER_LOG__LEVEL)"), "{p:?}");
            Ok(())
        });
    }

    #[test]
    fn nats_settings_are_loaded_and_checked_like_every_other_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "node.toml",
                "[nats]\nurl = [\"nats://a:4222\", \"tls://b:4222\"]\ntoken_file = \"/run/t\"\n",
            )?;
            let c =
                Config::load(Some(Path::new("node.toml")), json!({})).map_err(|e| e.to_string())?;
            assert_eq!(c.nats.url, "nats://a:4222,tls://b:4222");
            assert_eq!(c.nats.urls(), ["nats://a:4222", "tls://b:4222"]);
            jail.set_env("LORABROKER_NATS__URL", "nats://a:4222,nats://b:4222");
            jail.set_env("LORABROKER_NATS__USER", "12345");
            jail.set_env("LORABROKER_NATS__TOKN_FILE", "/x");
            jail.set_env("LORABROKER_NATS__TLS_REQUIRED", "maybe");
            let p = problems(Config::load(Some(Path::new("node.toml")), json!({})).unwrap_err());
            assert_eq!(
                p,
                [
                    "nats.tls_required = \"maybe\": expected true or false (LORABROKER_NATS__TLS_REQUIRED)",
                    "nats.tokn_file: unknown key; did you mean nats.token_file? (LORABROKER_NATS__TOKN_FILE)",
                    "nats.user: only one NATS authentication method at a time, but \
                     nats.user + nats.password_file and nats.token_file are set (LORABROKER_NATS__USER)",
                    "nats.password_file: must be set together with nats.user",
                ]
            );
            jail.clear_env();
            jail.create_file("bad.toml", "[nats]\nurl = 5\n")?;
            let p = problems(Config::load(Some(Path::new("bad.toml")), json!({})).unwrap_err());
            assert_eq!(
                p,
                ["nats.url = 5: expected a URL, comma-separated URLs or a list of URLs (in bad.toml)"]
            );
            Ok(())
        });
    }

    #[test]
    fn one_problem_reads_as_one_line() {
        let one = ConfigError::Invalid(vec!["a: b".into()]).to_string();
        assert_eq!(one, "invalid configuration: a: b");
        let two = ConfigError::Invalid(vec!["a".into(), "b".into()]).to_string();
        assert_eq!(two, "invalid configuration (2 problems):\n  a\n  b");
    }
}
