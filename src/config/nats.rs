//! `[nats]`: where the NATS servers are and how this node proves who it is to them
//! (DESIGN §7; README "Secured NATS"). Secrets are never in the configuration itself, only
//! the paths of the files holding them (a Kubernetes Secret mounts files); reading and
//! checking those files is the bus's job when it connects (`bus::nats`).

use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// URL schemes the NATS client speaks.
const SCHEMES: [&str; 4] = ["nats://", "tls://", "ws://", "wss://"];

/// Default of [`NatsConfig::subscription_capacity`] (async-nats' own default).
pub const DEFAULT_SUBSCRIPTION_CAPACITY: usize = 65_536;

/// `[nats]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// NATS server URL, or several (a cluster's seeds) separated by commas or given as a
    /// TOML list; empty runs the embedded in-process bus. May carry credentials
    /// (`nats://user:password@host:4222`), which are never logged.
    #[serde(deserialize_with = "url_list")]
    pub url: String,
    /// User name for password authentication, with `password_file`.
    pub user: String,
    /// File holding the password of `user` (one trailing newline is ignored).
    pub password_file: String,
    /// File holding an authentication token.
    pub token_file: String,
    /// File holding a user NKey seed (`SU…`).
    pub nkey_seed_file: String,
    /// A `.creds` file (user JWT and NKey seed) of a NATS account.
    pub creds_file: String,
    /// PEM file of the CA(s) the servers' certificates must chain to, instead of the
    /// system's roots; setting it makes TLS required.
    pub tls_ca_file: String,
    /// PEM certificate chain this node presents when the servers verify clients; needs
    /// `tls_key_file`.
    pub tls_cert_file: String,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: String,
    /// Refuse servers that do not speak TLS even with `nats://` URLs and no CA file (TLS
    /// is always required for `tls://` URLs and when any `tls_*_file` is set).
    pub tls_required: bool,
    /// Messages one bus subscription of this node (one per application with subscribers
    /// here) may hold before its application loses the newest ones, each counted in
    /// `lorabroker_bus_slow_consumer_dropped_total{tenant,application}`. The NATS client
    /// holds up to as many again (at least 65536) while it hands them over, so the worst
    /// case is this plus max(this, 65536) messages per application (~128 MB at 1 KB
    /// uplinks with the default), reached only while the node falls behind.
    pub subscription_capacity: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            user: String::new(),
            password_file: String::new(),
            token_file: String::new(),
            nkey_seed_file: String::new(),
            creds_file: String::new(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_required: false,
            subscription_capacity: DEFAULT_SUBSCRIPTION_CAPACITY,
        }
    }
}

/// How a node authenticates to NATS, as configured (at most one, see
/// [`NatsConfig::validate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatsAuth<'a> {
    /// No credentials.
    None,
    /// User and password inside `nats.url`.
    InUrl,
    /// `nats.user` and the password in `nats.password_file`.
    UserPassword {
        /// `nats.user`.
        user: &'a str,
        /// `nats.password_file`.
        password_file: &'a str,
    },
    /// `nats.token_file`.
    Token(&'a str),
    /// `nats.nkey_seed_file`.
    NKey(&'a str),
    /// `nats.creds_file`.
    Creds(&'a str),
}

impl NatsConfig {
    /// The configured server URLs, trimmed, in order (empty for the embedded bus).
    pub fn urls(&self) -> Vec<&str> {
        if self.url.trim().is_empty() {
            return Vec::new();
        }
        self.url.split(',').map(str::trim).collect()
    }

    /// The authentication method configured (valid after [`NatsConfig::validate`]).
    pub fn auth(&self) -> NatsAuth<'_> {
        if !self.user.is_empty() || !self.password_file.is_empty() {
            NatsAuth::UserPassword {
                user: &self.user,
                password_file: &self.password_file,
            }
        } else if !self.token_file.is_empty() {
            NatsAuth::Token(&self.token_file)
        } else if !self.nkey_seed_file.is_empty() {
            NatsAuth::NKey(&self.nkey_seed_file)
        } else if !self.creds_file.is_empty() {
            NatsAuth::Creds(&self.creds_file)
        } else if self.urls().iter().any(|u| has_credentials(u)) {
            NatsAuth::InUrl
        } else {
            NatsAuth::None
        }
    }

    /// Whether TLS is required of every server (see [`NatsConfig::tls_required`]).
    pub fn requires_tls(&self) -> bool {
        self.tls_required
            || !self.tls_ca_file.is_empty()
            || !self.tls_cert_file.is_empty()
            || !self.tls_key_file.is_empty()
    }

    /// Appends one line per problem, each starting with its key. Files are not read here.
    pub fn validate(&self, errors: &mut Vec<String>) {
        if self.subscription_capacity == 0 {
            errors.push("nats.subscription_capacity: must be at least 1".into());
        }
        let urls = self.urls();
        for (i, url) in urls.iter().enumerate() {
            if url.is_empty() {
                errors.push(format!(
                    "nats.url: entry {} of {:?} is empty (separate URLs with single commas)",
                    i + 1,
                    super::redact_urls(&self.url)
                ));
            } else if !SCHEMES.iter().any(|s| url.starts_with(s))
                || url.split_once("://").is_some_and(|(_, rest)| {
                    rest.rsplit('@')
                        .next()
                        .unwrap_or("")
                        .trim_matches('/')
                        .is_empty()
                })
            {
                errors.push(format!(
                    "nats.url: {:?} is not a nats://, tls://, ws:// or wss:// URL with a host",
                    super::redact_url(url)
                ));
            }
        }
        let mut methods = Vec::new();
        if !self.user.is_empty() || !self.password_file.is_empty() {
            methods.push("nats.user + nats.password_file");
        }
        for (key, value) in [
            ("nats.token_file", &self.token_file),
            ("nats.nkey_seed_file", &self.nkey_seed_file),
            ("nats.creds_file", &self.creds_file),
        ] {
            if !value.is_empty() {
                methods.push(key);
            }
        }
        if urls.iter().any(|u| has_credentials(u)) {
            methods.push("credentials in nats.url");
        }
        if methods.len() > 1 {
            let first = methods[0].split(' ').next().unwrap_or(methods[0]);
            errors.push(format!(
                "{first}: only one NATS authentication method at a time, but {} are set",
                methods.join(" and ")
            ));
        }
        if self.user.is_empty() != self.password_file.is_empty() {
            let (missing, given) = if self.user.is_empty() {
                ("nats.user", "nats.password_file")
            } else {
                ("nats.password_file", "nats.user")
            };
            errors.push(format!("{missing}: must be set together with {given}"));
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            let (missing, given) = if self.tls_cert_file.is_empty() {
                ("nats.tls_cert_file", "nats.tls_key_file")
            } else {
                ("nats.tls_key_file", "nats.tls_cert_file")
            };
            errors.push(format!("{missing}: must be set together with {given}"));
        }
    }
}

/// Whether `url` has a user or password before its host.
fn has_credentials(url: &str) -> bool {
    url.split_once("://").is_some_and(|(_, rest)| {
        let authority = rest.split('/').next().unwrap_or(rest);
        authority.contains('@')
    })
}

/// `nats.url` as a string or a list of strings; a list is kept comma-separated.
fn url_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Urls;

    impl<'de> Visitor<'de> for Urls {
        type Value = String;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a URL, comma-separated URLs or a list of URLs")
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<String, A::Error> {
            let mut urls = Vec::new();
            while let Some(url) = seq.next_element::<String>()? {
                urls.push(url);
            }
            Ok(urls.join(","))
        }
    }

    deserializer.deserialize_any(Urls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(c: &NatsConfig) -> Vec<String> {
        let mut errors = Vec::new();
        c.validate(&mut errors);
        errors
    }

    #[test]
    fn several_urls_each_checked_and_redacted() {
        let mut c = NatsConfig {
            url: "nats://a:4222, tls://b:4222,wss://c".into(),
            ..NatsConfig::default()
        };
        assert_eq!(c.urls(), ["nats://a:4222", "tls://b:4222", "wss://c"]);
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        c.url = "nats://u:secret@a:4222,http://u:secret@b,nats://,".into();
        let p = problems(&c);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].starts_with("nats.url: \"http://***@b\""), "{p:?}");
        assert!(p[1].starts_with("nats.url: \"nats://\""), "{p:?}");
        assert!(p[2].starts_with("nats.url: entry 4 of"), "{p:?}");
        assert!(!p.join("\n").contains("secret"), "{p:?}");
    }

    #[test]
    fn one_authentication_method_at_a_time() {
        let c = NatsConfig {
            url: "nats://u:p@a".into(),
            token_file: "/t".into(),
            creds_file: "/c".into(),
            ..NatsConfig::default()
        };
        assert_eq!(
            problems(&c),
            [
                "nats.token_file: only one NATS authentication method at a time, but \
              nats.token_file and nats.creds_file and credentials in nats.url are set"
            ]
        );
        let c = NatsConfig {
            url: "nats://a".into(),
            user: "u".into(),
            tls_key_file: "/k".into(),
            ..NatsConfig::default()
        };
        assert_eq!(
            problems(&c),
            [
                "nats.password_file: must be set together with nats.user",
                "nats.tls_cert_file: must be set together with nats.tls_key_file",
            ]
        );
        assert!(c.requires_tls());
        assert!(matches!(c.auth(), NatsAuth::UserPassword { user: "u", .. }));
        let c = NatsConfig {
            url: "nats://h/path@x".into(),
            ..NatsConfig::default()
        };
        assert_eq!(c.auth(), NatsAuth::None);
    }
}
