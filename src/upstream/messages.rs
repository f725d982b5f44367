//! Documents of a simulated device, in the JSON of the seed examples (DESIGN §6): join
//! accepts, uplinks with realistic radio metadata, and the downlink lifecycle events.

use base64::Engine as _;
use rand::Rng;
use serde_json::{json, Value};

use crate::message::{correlation_ids, document, now_rfc3339};
use crate::topic::DeviceRef;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One simulated end device with its LoRaWAN identifiers and frame counters.
#[derive(Debug, Clone)]
pub struct SimDevice {
    /// Tenant, application and device ID.
    pub device: DeviceRef,
    dev_eui: String,
    join_eui: String,
    dev_addr: String,
    session_key_id: String,
    f_cnt_up: u32,
    f_cnt_down: u32,
}

impl SimDevice {
    /// A device whose EUIs derive from `index`, so every run names them the same way.
    pub fn new(device: DeviceRef, index: u32) -> Self {
        Self {
            device,
            dev_eui: format!("70B3D57ED0{index:06X}"),
            join_eui: "0000000000000000".into(),
            dev_addr: String::new(),
            session_key_id: String::new(),
            f_cnt_up: 0,
            f_cnt_down: 0,
        }
    }

    fn ids(&self) -> Value {
        let mut ids = json!({
            "device_id": self.device.device.as_str(),
            "application_ids": { "application_id": self.device.app.app.as_str() },
            "dev_eui": self.dev_eui,
            "join_eui": self.join_eui,
        });
        if !self.dev_addr.is_empty() {
            ids["dev_addr"] = self.dev_addr.clone().into();
        }
        ids
    }

    /// Starts a new session (new address and session key, counters reset) and returns
    /// its `join` document.
    pub fn join(&mut self) -> Value {
        let mut rng = rand::rng();
        self.dev_addr = format!("260B{:04X}", rng.random::<u16>());
        self.session_key_id = B64.encode(rng.random::<[u8; 16]>());
        self.f_cnt_up = 0;
        self.f_cnt_down = 0;
        let ids = uplink_correlation_ids();
        document(
            self.ids(),
            ids,
            "join_accept",
            json!({ "session_key_id": self.session_key_id, "received_at": now_rfc3339() }),
        )
    }

    /// The next uplink: a temperature/humidity reading on f_port 15.
    pub fn uplink(&mut self) -> Value {
        let mut rng = rand::rng();
        let temperature: f64 = (rng.random_range(150..300) as f64) / 10.0;
        let humidity: u8 = rng.random_range(30..80);
        let raw = ((temperature * 10.0) as i16).to_be_bytes();
        let frm = [raw[0], raw[1], humidity];
        let f_cnt = self.f_cnt_up;
        self.f_cnt_up += 1;
        let now = now_rfc3339();
        let gateway = format!("eui-b827ebfffe{:06x}", rng.random_range(0..0xffff_u32));
        document(
            self.ids(),
            uplink_correlation_ids(),
            "uplink_message",
            json!({
                "session_key_id": self.session_key_id,
                "f_port": 15,
                "f_cnt": f_cnt,
                "frm_payload": B64.encode(frm),
                "decoded_payload": { "temperature": temperature, "humidity": humidity },
                "rx_metadata": [{
                    "gateway_ids": { "gateway_id": gateway, "eui": gateway[4..].to_uppercase() },
                    "time": now,
                    "timestamp": rng.random::<u32>(),
                    "rssi": -rng.random_range(30..120),
                    "channel_rssi": -rng.random_range(30..120),
                    "snr": rng.random_range(-50..95) as f64 / 10.0,
                    "uplink_token": B64.encode(rng.random::<[u8; 24]>()),
                    "received_at": now,
                }],
                "settings": {
                    "data_rate": { "lora": { "bandwidth": 125000, "spreading_factor": 7, "coding_rate": "4/5" } },
                    "frequency": "868100000",
                    "timestamp": rng.random::<u32>(),
                    "time": now,
                },
                "received_at": now,
                "consumed_airtime": "0.056576s",
                "network_ids": { "net_id": "000013", "tenant_id": self.device.app.tenant.as_str() },
            }),
        )
    }

    /// `down/sent` for a downlink taken from the queue; assigns its downlink frame counter.
    pub fn downlink_sent(&mut self, downlink: &Value) -> Value {
        let mut sent = downlink.clone();
        sent["session_key_id"] = self.session_key_id.clone().into();
        sent["f_cnt"] = self.f_cnt_down.into();
        self.f_cnt_down += 1;
        if sent.get("priority").is_none() {
            sent["priority"] = "LOWEST".into();
        }
        self.lifecycle(&sent, "downlink_sent", sent.clone())
    }

    /// `down/ack` for a confirmed downlink (`sent` is the `downlink_sent` body).
    pub fn downlink_ack(&self, sent: &Value) -> Value {
        self.lifecycle(sent, "downlink_ack", sent.clone())
    }

    /// `down/nack` for a confirmed downlink the device did not acknowledge.
    pub fn downlink_nack(&self, sent: &Value) -> Value {
        self.lifecycle(sent, "downlink_nack", sent.clone())
    }

    /// `down/failed` for a downlink the network could not send.
    pub fn downlink_failed(&self, downlink: &Value, reason: &str) -> Value {
        let body = json!({
            "downlink": downlink,
            "error": {
                "namespace": "pkg/networkserver",
                "name": "schedule",
                "message_format": reason,
                "code": 9,
            },
        });
        self.lifecycle(downlink, "downlink_failed", body)
    }

    /// A lifecycle document whose top-level correlation IDs are the downlink's own
    /// (the application's and the server's) followed by the network's.
    fn lifecycle(&self, downlink: &Value, field: &str, body: Value) -> Value {
        let mut ids = correlation_ids(downlink);
        ids.push(format!("ns:downlink:{}", ulid::Ulid::new()));
        document(self.ids(), ids, field, body)
    }
}

fn uplink_correlation_ids() -> Vec<String> {
    ["gs:conn", "gs:uplink", "ns:uplink", "as:up"]
        .iter()
        .map(|p| format!("{p}:{}", ulid::Ulid::new()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{AppRef, Id};

    fn sim() -> SimDevice {
        SimDevice::new(
            DeviceRef::new(
                AppRef::new(Id::parse("tenant1").unwrap(), Id::parse("app1").unwrap()),
                Id::parse("dev1").unwrap(),
            ),
            1,
        )
    }

    #[test]
    fn uplinks_have_the_seed_shape_and_count_up() {
        let mut d = sim();
        let join = d.join();
        assert!(join["join_accept"]["session_key_id"].is_string());
        let up = d.uplink();
        let msg = &up["uplink_message"];
        assert_eq!(msg["f_port"], 15);
        assert_eq!(msg["f_cnt"], 0);
        assert!(B64.decode(msg["frm_payload"].as_str().unwrap()).is_ok());
        assert!(msg["decoded_payload"]["temperature"].is_number());
        assert!(msg["rx_metadata"][0]["gateway_ids"]["gateway_id"].is_string());
        assert_eq!(msg["settings"]["data_rate"]["lora"]["spreading_factor"], 7);
        assert_eq!(
            up["end_device_ids"]["dev_addr"],
            join["end_device_ids"]["dev_addr"]
        );
        assert_eq!(d.uplink()["uplink_message"]["f_cnt"], 1);
    }

    #[test]
    fn downlink_events_carry_the_application_correlation_ids() {
        let mut d = sim();
        d.join();
        let queued = json!({"f_port": 15, "frm_payload": "vu8=", "confirmed": true,
            "correlation_ids": ["my-correlation-id", "as:downlink:01"]});
        let sent = d.downlink_sent(&queued);
        assert_eq!(sent["downlink_sent"]["f_cnt"], 0);
        let ack = d.downlink_ack(&sent["downlink_sent"]);
        let ids = correlation_ids(&ack);
        assert_eq!(&ids[..2], ["my-correlation-id", "as:downlink:01"]);
        assert_eq!(
            correlation_ids(&ack["downlink_ack"])[0],
            "my-correlation-id"
        );
        assert_eq!(ack["downlink_ack"]["confirmed"], true);
        let failed = d.downlink_failed(&queued, "no gateway");
        assert_eq!(
            failed["downlink_failed"]["error"]["message_format"],
            "no gateway"
        );
    }
}
