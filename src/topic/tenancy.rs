//! Tenancy: applications and devices of tenants, and how usernames and topics name them in
//! single- and multi-tenant deployments (DESIGN §2).

use std::fmt;

use super::{Event, Id, TopicError};

/// One application of one tenant: the unit of authorisation and routing.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct AppRef {
    /// The tenant (the configured default tenant in single-tenant mode).
    pub tenant: Id,
    /// The application ID.
    pub app: Id,
}

impl AppRef {
    /// Builds an application reference from validated IDs.
    pub fn new(tenant: Id, app: Id) -> Self {
        Self { tenant, app }
    }

    /// NATS subject filter that carries all of this application's device traffic.
    pub fn traffic_subject_filter(&self) -> String {
        format!("v3.{}.{}.>", self.tenant, self.app)
    }

    /// Prefix of this application's traffic subjects, `v3.{tenant}.{app}.`.
    pub fn subject_prefix(&self) -> String {
        format!("v3.{}.{}.", self.tenant, self.app)
    }
}

impl fmt::Display for AppRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.app, self.tenant)
    }
}

/// One device of one application.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct DeviceRef {
    /// The device's application.
    pub app: AppRef,
    /// The device ID.
    pub device: Id,
}

impl DeviceRef {
    /// Builds a device reference.
    pub fn new(app: AppRef, device: Id) -> Self {
        Self { app, device }
    }

    /// NATS subject of `event` for this device: `v3.{tenant}.{app}.devices.{dev}.{event}`.
    pub fn subject(&self, event: Event) -> String {
        format!(
            "v3.{}.{}.devices.{}.{}",
            self.app.tenant,
            self.app.app,
            self.device,
            event.subject_suffix()
        )
    }
}

/// Deployment tenancy: how usernames and topics name an application (DESIGN §2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tenancy {
    /// Username and topics carry `{app}`; every application belongs to `default_tenant`.
    Single {
        /// The internal tenant ID; never appears on the wire.
        default_tenant: Id,
    },
    /// Username and topics carry `{app}@{tenant}`.
    Multi,
}

impl Tenancy {
    /// Parses an MQTT username (or the application part of a topic) into an application.
    pub fn parse_app(&self, username: &str) -> Result<AppRef, TopicError> {
        let invalid = || TopicError::InvalidUsername {
            username: username.to_owned(),
            expected: match self {
                Tenancy::Single { .. } => "{application id}",
                Tenancy::Multi => "{application id}@{tenant id}",
            },
        };
        match self {
            Tenancy::Single { default_tenant } => {
                let app = Id::parse(username).map_err(|_| invalid())?;
                Ok(AppRef::new(default_tenant.clone(), app))
            }
            Tenancy::Multi => {
                let (app, tenant) = username.split_once('@').ok_or_else(invalid)?;
                let app = Id::parse(app).map_err(|_| invalid())?;
                let tenant = Id::parse(tenant).map_err(|_| invalid())?;
                Ok(AppRef::new(tenant, app))
            }
        }
    }

    /// How `app` is written in usernames and topics: `{app}` or `{app}@{tenant}`.
    pub fn app_uid(&self, app: &AppRef) -> String {
        match self {
            Tenancy::Single { .. } => app.app.to_string(),
            Tenancy::Multi => app.to_string(),
        }
    }

    /// The MQTT topic of `event` for `device`.
    pub fn topic(&self, device: &DeviceRef, event: Event) -> String {
        format!(
            "v3/{}/devices/{}/{}",
            self.app_uid(&device.app),
            device.device,
            event.topic_suffix()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Id {
        Id::parse(s).unwrap()
    }

    fn app() -> AppRef {
        AppRef::new(id("tenant1"), id("app1"))
    }

    #[test]
    fn usernames_by_tenancy() {
        let multi = Tenancy::Multi;
        assert_eq!(multi.parse_app("app1@tenant1").unwrap(), app());
        assert!(multi.parse_app("app1").is_err());
        assert!(multi.parse_app("app1@").is_err());
        assert!(multi.parse_app("app1@ten@ant").is_err());
        let single = Tenancy::Single {
            default_tenant: id("default"),
        };
        let a = single.parse_app("app1").unwrap();
        assert_eq!(a.tenant.as_str(), "default");
        assert!(single.parse_app("app1@tenant1").is_err());
        assert_eq!(single.app_uid(&a), "app1");
        assert_eq!(multi.app_uid(&app()), "app1@tenant1");
    }
}
