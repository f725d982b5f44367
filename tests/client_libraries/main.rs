//! lorabroker driven by the client libraries its users run (issue 8, "Tests"): paho-mqtt 2.x
//! for Python with both callback APIs, MQTT.js 5 on Node, the Mosquitto command-line
//! clients and rumqttc, against real nodes: embedded, and two nodes on real NATS and Redis.
//!
//! Each library plays the same scenarios (see [`scenarios`]): a status will on a topic it
//! may not write, a QoS 1 publish to a forbidden topic, the seed's uplink/downlink flow, an
//! MQTT 5 client, a QoS 2 downlink with a duplicate, and Home Assistant's connection
//! pattern. The test sets up the node, hands the client side to the library (a program of
//! `tests/clients/` for Python and Node, Rust code for the others), and checks the server's
//! side: the queues, the events, the counters in `/metrics`.
//!
//! The Python and Node libraries are installed at pinned versions by `tests/clients/setup`
//! (`.ci/run` runs it); without them the tests fail saying how to install them.

#[path = "../common/mod.rs"]
mod common;
mod harness;
mod mosquitto;
mod raw;
mod rumqttc_client;
mod scenarios;

use harness::{Program, Target};

/// A client library, and how it plays the client side of each scenario.
#[derive(Clone, Copy, Debug)]
pub enum Lib {
    /// A program of `tests/clients/` (paho-mqtt, MQTT.js).
    Program(Program),
    /// `mosquitto_sub` and `mosquitto_pub`.
    Mosquitto,
    /// rumqttc.
    Rumqttc,
}

/// paho-mqtt with `CallbackAPIVersion.VERSION1`.
pub const PAHO_V1: Lib = Lib::Program(Program::Paho(1));
/// paho-mqtt with `CallbackAPIVersion.VERSION2`.
pub const PAHO_V2: Lib = Lib::Program(Program::Paho(2));
/// MQTT.js.
pub const MQTT_JS: Lib = Lib::Program(Program::MqttJs);

impl Lib {
    /// CONNECT with `t.will` is accepted; then the connection is cut without DISCONNECT.
    pub async fn will(self, t: &Target) {
        match self {
            Lib::Program(p) => drop(p.run("will", t).await),
            Lib::Mosquitto => mosquitto::will(t).await,
            Lib::Rumqttc => rumqttc_client::will(t).await,
        }
    }

    /// QoS 1 publishes to each of `t.forbidden` are acknowledged and the client stays
    /// connected, its subscription delivering `t.device`'s uplinks.
    pub async fn forbidden(self, t: &Target) {
        match self {
            Lib::Program(p) => drop(p.run("forbidden", t).await),
            Lib::Mosquitto => mosquitto::forbidden(t).await,
            Lib::Rumqttc => rumqttc_client::forbidden(t).await,
        }
    }

    /// The seed's flow for `t.device`, subscribed on `t.mqtt`, pushing through
    /// `t.publish_via`.
    pub async fn flow(self, t: &Target) {
        match self {
            Lib::Program(p) => drop(p.run("flow", t).await),
            Lib::Mosquitto => mosquitto::flow(t).await,
            Lib::Rumqttc => rumqttc_client::flow(t).await,
        }
    }

    /// A client configured for MQTT 5 reports a protocol-version refusal, and ends.
    pub async fn v5(self, t: &Target) {
        match self {
            Lib::Program(p) => drop(p.run("v5", t).await),
            Lib::Mosquitto => mosquitto::v5(t).await,
            Lib::Rumqttc => rumqttc_client::v5(t).await,
        }
    }

    /// A QoS 2 downlink push for `t.device` completes (with a duplicate before PUBREL
    /// where the library can be made to send one: paho, MQTT.js).
    pub async fn qos2(self, t: &Target) {
        match self {
            Lib::Program(p) => drop(p.run("qos2", t).await),
            Lib::Mosquitto => mosquitto::qos2(t).await,
            Lib::Rumqttc => rumqttc_client::qos2(t).await,
        }
    }

    /// A new persistent session (`clean_session=0`, `LB_CLIENT_ID`) subscribes to uplinks
    /// at QoS 1 and disconnects.
    pub async fn persistent_subscribe(self, t: &Target) {
        match self {
            Lib::Program(p) => drop(p.run("persistent-subscribe", t).await),
            Lib::Mosquitto | Lib::Rumqttc => {
                unreachable!("played by paho (tests/sessions.rs has rumqttc)")
            }
        }
    }

    /// The session of `LB_CLIENT_ID` resumes (session present) and receives the
    /// `LB_COUNT` numbered uplinks it missed, at QoS 1, in order.
    pub async fn persistent_resume(self, t: &Target) -> String {
        match self {
            Lib::Program(p) => p.run("persistent-resume", t).await,
            Lib::Mosquitto | Lib::Rumqttc => {
                unreachable!("played by paho (tests/sessions.rs has rumqttc)")
            }
        }
    }

    /// Home Assistant's pattern: will and retained birth on `homeassistant/status`, clean
    /// session, then traffic on the same connection.
    pub async fn home_assistant(self, t: &Target) {
        match self {
            Lib::Program(p) => drop(p.run("homeassistant", t).await),
            Lib::Mosquitto | Lib::Rumqttc => unreachable!("played by paho and MQTT.js"),
        }
    }
}

/// One test per scenario for a library, on the embedded node.
macro_rules! embedded {
    ($module:ident, $lib:expr, [$($scenario:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    crate::scenarios::$scenario($lib, crate::common::broker::Backend::Embedded)
                        .await
                }
            )*
        }
    };
}

/// One test per scenario for a library, on two nodes with NATS and Redis.
macro_rules! cluster {
    ($module:ident, $lib:expr, [$($scenario:ident),* $(,)?]) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    crate::scenarios::$scenario($lib, crate::common::broker::Backend::Cluster)
                        .await
                }
            )*
        }
    };
}

embedded!(
    paho_v1,
    crate::PAHO_V1,
    [
        will_on_a_status_topic_connects_and_is_not_kept,
        forbidden_publish_is_acked_dropped_and_the_client_stays,
        seed_flow_uplink_downlink_events_with_correlation_id,
        mqtt5_client_gets_a_clear_refusal,
        qos2_downlink_with_duplicate_is_queued_once,
        home_assistant_will_birth_and_clean_session_work,
        persistent_session_resumes_with_what_it_missed,
    ]
);
embedded!(
    paho_v2,
    crate::PAHO_V2,
    [
        will_on_a_status_topic_connects_and_is_not_kept,
        forbidden_publish_is_acked_dropped_and_the_client_stays,
        seed_flow_uplink_downlink_events_with_correlation_id,
        mqtt5_client_gets_a_clear_refusal,
        qos2_downlink_with_duplicate_is_queued_once,
        home_assistant_will_birth_and_clean_session_work,
        persistent_session_resumes_with_what_it_missed,
    ]
);
embedded!(
    mqtt_js,
    crate::MQTT_JS,
    [
        will_on_a_status_topic_connects_and_is_not_kept,
        forbidden_publish_is_acked_dropped_and_the_client_stays,
        seed_flow_uplink_downlink_events_with_correlation_id,
        mqtt5_client_gets_a_clear_refusal,
        qos2_downlink_with_duplicate_is_queued_once,
        home_assistant_will_birth_and_clean_session_work,
    ]
);
embedded!(
    mosquitto_clients,
    crate::Lib::Mosquitto,
    [
        will_on_a_status_topic_connects_and_is_not_kept,
        forbidden_publish_is_acked_dropped_and_the_client_stays,
        seed_flow_uplink_downlink_events_with_correlation_id,
        mqtt5_client_gets_a_clear_refusal,
        qos2_downlink_is_queued_once,
    ]
);
embedded!(
    rumqttc,
    crate::Lib::Rumqttc,
    [
        will_on_a_status_topic_connects_and_is_not_kept,
        forbidden_publish_is_acked_dropped_and_the_client_stays,
        seed_flow_uplink_downlink_events_with_correlation_id,
        mqtt5_client_gets_a_clear_refusal,
        qos2_downlink_is_queued_once,
    ]
);
embedded!(
    raw_socket,
    (),
    [qos2_duplicate_before_pubrel_is_queued_once]
);

cluster!(
    paho_v2_cluster,
    crate::PAHO_V2,
    [
        seed_flow_across_two_nodes,
        forbidden_publish_is_acked_dropped_and_the_client_stays,
        qos2_downlink_with_duplicate_is_queued_once,
        persistent_session_resumes_with_what_it_missed,
    ]
);
cluster!(
    mqtt_js_cluster,
    crate::MQTT_JS,
    [
        seed_flow_across_two_nodes,
        forbidden_publish_is_acked_dropped_and_the_client_stays,
    ]
);
cluster!(
    mosquitto_clients_cluster,
    crate::Lib::Mosquitto,
    [seed_flow_across_two_nodes]
);
cluster!(
    rumqttc_cluster,
    crate::Lib::Rumqttc,
    [seed_flow_across_two_nodes]
);
cluster!(
    raw_socket_cluster,
    (),
    [qos2_duplicate_before_pubrel_is_queued_once]
);
