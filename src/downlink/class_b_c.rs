//! `class_b_c` of a downlink item: The Things Stack's `ApplicationDownlink.ClassBC`, whose
//! `gateways` are `ClassBCGatewayIdentifiers`
//! (`{"gateway_ids":{"gateway_id":…,"eui":…},"antenna_index":N,"group_index":N}`), checked
//! more strictly than The Things Stack does: gateway IDs follow the ID rule with an error
//! that names them (its issue #6130 is about this check being silent), the EUI is 8 bytes
//! of hex, `absolute_time` is RFC 3339, and the gateways are bounded in number.

use serde::Deserialize;

use super::error::quoted;
use crate::topic::Id;

/// Most `class_b_c.gateways` on one item.
pub const MAX_CLASS_B_C_GATEWAYS: usize = 16;
/// Longest `class_b_c.absolute_time`, in characters (RFC 3339 with nanoseconds and an
/// offset is 35).
pub const MAX_ABSOLUTE_TIME_LEN: usize = 64;

/// Class B/C scheduling hints.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClassBC {
    #[serde(default)]
    gateways: Option<Vec<ClassBCGateway>>,
    #[serde(default)]
    absolute_time: Option<String>,
}

/// The Things Stack's `ClassBCGatewayIdentifiers`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct ClassBCGateway {
    gateway_ids: GatewayIdentifiers,
    #[serde(default)]
    antenna_index: Option<u32>,
    #[serde(default)]
    group_index: Option<u32>,
}

/// The Things Stack's `GatewayIdentifiers`: an ID and, optionally, the EUI (hex).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GatewayIdentifiers {
    gateway_id: String,
    #[serde(default)]
    eui: Option<String>,
}

/// Checks `class_b_c`; the error says whether a bound was exceeded and names the field.
pub(super) fn check_class_b_c(c: &ClassBC) -> Result<(), (bool, String)> {
    let gateways = c.gateways.as_deref().unwrap_or_default();
    if gateways.len() > MAX_CLASS_B_C_GATEWAYS {
        return Err((
            true,
            format!(
                "{} class_b_c.gateways, more than {MAX_CLASS_B_C_GATEWAYS}",
                gateways.len()
            ),
        ));
    }
    for (j, g) in gateways.iter().enumerate() {
        let ids = &g.gateway_ids;
        if Id::parse(&ids.gateway_id).is_err() {
            return Err((
                false,
                format!(
                    "class_b_c.gateways[{j}].gateway_ids.gateway_id {} is not a valid gateway \
                     ID (3 to 36 lowercase letters, digits and single dashes)",
                    quoted(&ids.gateway_id)
                ),
            ));
        }
        if let Some(eui) = &ids.eui {
            if eui.len() != 16 || !eui.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err((
                    false,
                    format!(
                        "class_b_c.gateways[{j}].gateway_ids.eui {} is not 8 bytes of hex",
                        quoted(eui)
                    ),
                ));
            }
        }
    }
    if let Some(t) = &c.absolute_time {
        if t.chars().count() > MAX_ABSOLUTE_TIME_LEN || !is_rfc3339(t) {
            return Err((
                false,
                format!(
                    "class_b_c.absolute_time {} is not an RFC 3339 timestamp",
                    quoted(t)
                ),
            ));
        }
    }
    Ok(())
}

/// Whether `t` is an RFC 3339 timestamp: UTC (`Z`) as humantime reads it, or with a
/// numeric offset (`+02:00`), as protobuf JSON accepts.
fn is_rfc3339(t: &str) -> bool {
    if humantime::parse_rfc3339(t).is_ok() {
        return true;
    }
    let Some((local, offset)) = t
        .len()
        .checked_sub(6)
        .and_then(|at| t.is_char_boundary(at).then(|| t.split_at(at)))
    else {
        return false;
    };
    let o = offset.as_bytes();
    let offset_ok = matches!(o[0], b'+' | b'-')
        && o[1].is_ascii_digit()
        && o[2].is_ascii_digit()
        && o[3] == b':'
        && o[4].is_ascii_digit()
        && o[5].is_ascii_digit();
    offset_ok && humantime::parse_rfc3339(&format!("{local}Z")).is_ok()
}

#[cfg(test)]
mod tests {
    use crate::downlink::validate::{parse_request, Rejection, RequestLimits};
    use serde_json::{json, Map, Value};

    fn parse(body: &str) -> Result<Vec<Map<String, Value>>, Rejection> {
        parse_request(body.as_bytes(), &RequestLimits::default())
    }

    #[test]
    fn class_b_c_gateways_follow_the_things_stack() {
        let with = |gateways: Value| {
            parse(
                &json!({"downlinks":[{"f_port":1,"frm_payload":"AQ==","class_b_c":{"gateways":gateways}}]})
                    .to_string(),
            )
        };
        // ClassBCGatewayIdentifiers as The Things Stack writes it.
        assert!(with(json!([
            {"gateway_ids": {"gateway_id": "eui-b827ebfffe123456", "eui": "B827EBFFFE123456"},
             "antenna_index": 1, "group_index": 2},
            {"gateway_ids": {"gateway_id": "my-gateway"}}
        ]))
        .is_ok());
        let named = |gateways: Value, expected: &str| {
            let e = with(gateways).unwrap_err().error;
            assert!(
                e.to_string().contains(expected),
                "{e} should contain {expected}"
            );
            e
        };
        // The silent case of The Things Stack issue #6130.
        let e = named(
            json!([{"gateway_ids": {"gateway_id": "ok-gateway"}}, {"gateway_ids": {"gateway_id": "My_Gateway"}}]),
            "class_b_c.gateways[1].gateway_ids.gateway_id \"My_Gateway\" is not a valid gateway ID",
        );
        assert_eq!(e.name(), "invalid_downlink");
        named(
            json!([{"gateway_ids": {"gateway_id": "ab"}}]),
            "\"ab\" is not a valid gateway ID",
        );
        named(
            json!([{"gateway_ids": {"gateway_id": "x".repeat(37)}}]),
            "is not a valid gateway ID",
        );
        named(
            json!([{"gateway_ids": {"gateway_id": "gw-1", "eui": "B827"}}]),
            "eui \"B827\"",
        );
        named(
            json!([{"gateway_ids": {"eui": "B827EBFFFE123456"}}]),
            "missing field `gateway_id`",
        );
        named(json!([{"antenna_index": 1}]), "missing field `gateway_ids`");
        named(
            json!([{"gateway_ids": {"gateway_id": "gw-1"}, "antenna": 1}]),
            "class_b_c.gateways[0].antenna: unknown field `antenna`",
        );
        named(
            json!([{"gateway_ids": {"gateway_id": "gw-1"}, "antenna_index": -1}]),
            "class_b_c.gateways[0].antenna_index",
        );
        let many: Vec<Value> = (0..17)
            .map(|_| json!({"gateway_ids": {"gateway_id": "gw-1"}}))
            .collect();
        let e = named(Value::Array(many), "17 class_b_c.gateways, more than 16");
        assert_eq!(e.name(), "field_too_large");
    }

    #[test]
    fn absolute_time_is_rfc3339() {
        let at = |t: &str| {
            parse(
                &json!({"downlinks":[{"f_port":1,"frm_payload":"AQ==","class_b_c":{"absolute_time":t}}]})
                    .to_string(),
            )
        };
        for ok in [
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:00.123456789Z",
            "2026-01-01T02:00:00+02:00",
        ] {
            assert!(at(ok).is_ok(), "{ok}");
        }
        for bad in [
            "tomorrow",
            "2026-01-01",
            "2026-01-01T00:00:00+2:00",
            "2026-13-01T00:00:00Z",
            "é",
        ] {
            let e = at(bad).unwrap_err().error;
            assert!(e.to_string().contains("absolute_time"), "{bad}: {e}");
        }
    }
}
