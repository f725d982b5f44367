//! CONNECT: who the client is and whether it may in (DESIGN §2–§4). Every refusal is a
//! [`Refusal`], mapped to its CONNACK code in exactly one place, [`Refusal::code`].
//!
//! The will never refuses a CONNECT: one on a topic the key may not write is ignored after
//! acceptance, as The Things Stack does (the session's handshake decides that).

use std::sync::Arc;

use mqttbytes::v4::{Connect, ConnectReturnCode};
use mqttbytes::Protocol;

use crate::auth::{AuthError, Authenticator, StoredKey};
use crate::log::Bounded;
use crate::topic::{AppRef, Tenancy};

/// Why a CONNECT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Not MQTT 3.1.1 or 3.1.
    #[error("unsupported protocol {0}")]
    Protocol(String),
    /// Empty client ID without a clean session, or one that is too long.
    #[error("client ID refused: {0}")]
    ClientId(String),
    /// Missing or malformed username or password.
    #[error("bad username or password: {0}")]
    BadCredentials(String),
    /// The key is unknown, wrong, expired, for another application, or without rights.
    #[error("not authorized: {0}")]
    NotAuthorized(String),
    /// A backend needed to decide is unavailable.
    #[error("service unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The CONNACK return code (MQTT 3.1.1 §3.2.2.3).
    pub fn code(&self) -> ConnectReturnCode {
        match self {
            Refusal::Protocol(_) => ConnectReturnCode::RefusedProtocolVersion,
            Refusal::ClientId(_) => ConnectReturnCode::BadClientId,
            Refusal::BadCredentials(_) => ConnectReturnCode::BadUserNamePassword,
            Refusal::NotAuthorized(_) => ConnectReturnCode::NotAuthorized,
            Refusal::Unavailable(_) => ConnectReturnCode::ServiceUnavailable,
        }
    }

    /// Whether the refusal is a failed login (bad or unknown credentials), which counts
    /// towards `limits.failed_connects_per_ip`.
    pub fn counts_as_failed_login(&self) -> bool {
        matches!(self, Refusal::BadCredentials(_) | Refusal::NotAuthorized(_))
    }

    /// Short label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Refusal::Protocol(_) => "refused_protocol",
            Refusal::ClientId(_) => "refused_client_id",
            Refusal::BadCredentials(_) => "refused_bad_credentials",
            Refusal::NotAuthorized(_) => "refused_not_authorized",
            Refusal::Unavailable(_) => "refused_unavailable",
        }
    }
}

impl From<AuthError> for Refusal {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MalformedKey => Refusal::BadCredentials(e.to_string()),
            AuthError::Unavailable(_) => Refusal::Unavailable(e.to_string()),
            AuthError::UnknownKey(_)
            | AuthError::WrongSecret(_)
            | AuthError::Expired(_)
            | AuthError::WrongApplication { .. }
            | AuthError::NoTrafficRights(_) => Refusal::NotAuthorized(e.to_string()),
        }
    }
}

/// A refused CONNECT, and what the live events of the application its username names
/// (if it names one) say about it.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The refusal.
    pub refusal: Refusal,
    /// The application and the event's `error`, when the username names an application.
    pub event: Option<(AppRef, String)>,
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Self {
            refusal,
            event: None,
        }
    }
}

/// An accepted client.
#[derive(Debug, Clone)]
pub struct Accepted {
    /// The application it acts for.
    pub app: AppRef,
    /// The client ID (assigned when the client sent an empty one).
    pub client_id: String,
    /// The key it authenticated with.
    pub key: Arc<StoredKey>,
}

/// Decides a CONNECT.
pub async fn accept(
    connect: &Connect,
    tenancy: &Tenancy,
    auth: &Authenticator,
    max_client_id_len: usize,
    assign_id: impl FnOnce() -> String,
) -> Result<Accepted, Refused> {
    if connect.protocol != Protocol::V4 {
        return Err(Refusal::Protocol(format!("{:?}", connect.protocol)).into());
    }
    // The application the username names, for the events of a refusal.
    let named = connect
        .login
        .as_ref()
        .and_then(|l| tenancy.parse_app(&l.username).ok());
    let refused = |refusal: Refusal, error: String| Refused {
        refusal,
        event: named.clone().map(|app| (app, error)),
    };
    let client_id = match connect.client_id.as_str() {
        "" if connect.clean_session => assign_id(),
        "" => {
            let why = "an empty client ID needs clean session";
            return Err(refused(
                Refusal::ClientId(why.into()),
                format!("client ID refused: {why}"),
            ));
        }
        id if id.len() > max_client_id_len => {
            let why = format!("{} characters, more than {max_client_id_len}", id.len());
            return Err(refused(
                Refusal::ClientId(why.clone()),
                format!("client ID refused: {why}"),
            ));
        }
        id => id.to_owned(),
    };
    let login = connect.login.as_ref().ok_or_else(|| {
        Refusal::BadCredentials("username and password (an API key) are required".into())
    })?;
    let app = tenancy
        .parse_app(&login.username)
        // The error quotes the username: bounded here, and any API key in it (a client
        // that swapped username and password) cut to its ID.
        .map_err(|e| Refusal::BadCredentials(Bounded::message(&e.to_string()).to_string()))?;
    let key = match auth.authenticate(&app, &login.password).await {
        Ok(key) => key,
        Err(e) => {
            let error = e.event_message();
            return Err(refused(Refusal::from(e), error));
        }
    };
    Ok(Accepted {
        app,
        client_id,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_code() {
        use ConnectReturnCode::*;
        let cases = [
            (Refusal::Protocol("V5".into()), RefusedProtocolVersion, 1u8),
            (Refusal::ClientId(String::new()), BadClientId, 2),
            (Refusal::Unavailable(String::new()), ServiceUnavailable, 3),
            (
                Refusal::BadCredentials(String::new()),
                BadUserNamePassword,
                4,
            ),
            (Refusal::NotAuthorized(String::new()), NotAuthorized, 5),
        ];
        for (refusal, code, byte) in cases {
            assert_eq!(refusal.code(), code);
            assert_eq!(refusal.code() as u8, byte);
        }
        assert_eq!(Refusal::from(AuthError::MalformedKey).code() as u8, 4);
        assert_eq!(
            Refusal::from(AuthError::Unavailable("x".into())).code() as u8,
            3
        );
        assert_eq!(
            Refusal::from(AuthError::UnknownKey("x".into())).code() as u8,
            5
        );
        assert_eq!(
            Refusal::from(AuthError::Expired("x".into())).code() as u8,
            5
        );
    }
}
