"""paho-mqtt 2.x against lorabroker, with either callback API, as an application written
for The Things Stack uses it (Home Assistant's MQTT integration is built on paho).

    paho_client.py --api 1|2 SCENARIO

tests/client_libraries runs this with the broker and what to expect in the environment:

    LB_HOST, LB_PORT        the node to connect to
    LB_PUB_PORT             the node to publish downlinks through (default LB_PORT)
    LB_USERNAME, LB_KEY     MQTT username ({app} or {app}@{tenant}) and API key
    LB_APP                  the application as written in topics
    LB_DEVICE               the device of the scenario
    LB_CORRELATION_ID       the correlation ID to put in a downlink and look for
    LB_WILL_TOPIC           the will's topic (scenario will)
    LB_WILL_PAYLOAD         the will's payload (scenario will)
    LB_FORBIDDEN_TOPICS     topics the key may not write, comma-separated (scenario forbidden)
    LB_CLIENT_ID            the client ID of a persistent session (scenarios persistent-*)
    LB_COUNT                how many numbered uplinks to expect (scenario persistent-resume)
    LB_TIMEOUT              seconds to wait for each expected thing (default 10)

Scenarios (each prints what it saw; exit status 0 when everything expected happened, 1 with
a message saying what did not, 3 when the whole run overran its deadline):

    will           CONNECT with a will (QoS 1) is accepted; then the TCP connection is cut
                   without DISCONNECT, so that a kept will would be published.
    forbidden      QoS 1 publishes to topics the key may not write are acknowledged, and the
                   client stays connected: its subscription keeps delivering, no reconnect.
    flow           The seed's flow: subscribe '#', receive LB_DEVICE's uplink, push a
                   confirmed downlink with LB_CORRELATION_ID (through LB_PUB_PORT), see
                   down/queued, down/sent and down/ack carrying it, in that order.
    v5             A client configured for MQTT 5 is refused with "unsupported protocol
                   version" (CONNACK 1), at once, and does not retry by itself.
    qos2           A QoS 2 downlink push, sent a second time with DUP and the same packet ID
                   before PUBREL (paho's own send path), completes with PUBCOMP.
    homeassistant  Home Assistant's connection pattern: clean session, a will on
                   homeassistant/status, a retained birth message "online" there, then
                   subscribing and receiving traffic; the connection stays up.
    persistent-subscribe
                   clean_session=0 with LB_CLIENT_ID: a new session (CONNACK session
                   present 0), uplinks subscribed at QoS 1 (granted 1), then DISCONNECT.
    persistent-resume
                   clean_session=0 with LB_CLIENT_ID again: the session is present, and the
                   LB_COUNT uplinks numbered 0.. published meanwhile arrive at QoS 1, first
                   arrivals in order, every repeat with DUP; paho acknowledges each.
"""

import argparse
import json
import os
import sys
import threading
import time

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

# The whole run, whatever happens: a test program must never hang.
DEADLINE = 60


class Failed(Exception):
    """An expectation that did not hold."""


def log(*parts):
    print(*parts, flush=True)


def env(name, default=None):
    value = os.environ.get(name, default)
    if value is None:
        raise Failed(f"the environment variable {name} is not set")
    return value


class Recorder:
    """What one paho client saw, whichever callback API delivered it."""

    def __init__(self, name):
        self.name = name
        self.cond = threading.Condition()
        self.connacks = []  # reason codes as ints
        self.present = []  # CONNACK session present flags, as bools
        self.disconnects = []  # reason codes as strings
        self.published = set()  # mids acknowledged (PUBACK for QoS 1, PUBCOMP for QoS 2)
        self.subacks = {}  # mid -> granted QoS / reason codes, as ints
        self.messages = []  # (topic, payload bytes)
        self.deliveries = []  # (payload bytes, QoS, DUP)

    def _add(self, update):
        with self.cond:
            update()
            self.cond.notify_all()

    def connack(self, code, present=False):
        log(f"{self.name}: CONNACK {code}, session present {int(present)}")

        def update():
            self.present.append(bool(present))
            self.connacks.append(code)

        self._add(update)

    def disconnect(self, reason):
        log(f"{self.name}: disconnected ({reason})")
        self._add(lambda: self.disconnects.append(reason))

    def publish_done(self, mid):
        self._add(lambda: self.published.add(mid))

    def suback(self, mid, codes):
        log(f"{self.name}: SUBACK {codes}")
        self._add(lambda: self.subacks.__setitem__(mid, codes))

    def message(self, msg):
        def update():
            self.messages.append((msg.topic, msg.payload))
            self.deliveries.append((msg.payload, msg.qos, bool(msg.dup)))

        self._add(update)

    def wait(self, what, predicate, timeout):
        """Waits until predicate() holds; fails saying `what` did not happen."""
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise Failed(f"{self.name}: {what} within {timeout} s")


def attach(client, rec, api):
    """Registers rec's callbacks with the signatures of callback API `api`."""
    if api == 1:

        def on_connect(_c, _u, flags, rc, _props=None):
            # An int for MQTT 3.1.1, a ReasonCode for MQTT 5; the flags are a dict.
            rec.connack(getattr(rc, "value", rc), flags.get("session present", 0))

        def on_disconnect(_c, _u, rc, _props=None):
            rec.disconnect(str(rc))

        def on_publish(_c, _u, mid):
            rec.publish_done(mid)

        def on_subscribe(_c, _u, mid, granted, _props=None):
            rec.suback(mid, [int(g) for g in granted])

    else:

        def on_connect(_c, _u, flags, reason, _props):
            rec.connack(reason.value, flags.session_present)

        def on_disconnect(_c, _u, _flags, reason, _props):
            rec.disconnect(str(reason))

        def on_publish(_c, _u, mid, _reason, _props):
            rec.publish_done(mid)

        def on_subscribe(_c, _u, mid, reasons, _props):
            rec.suback(mid, [r.value for r in reasons])

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
    client.on_message = lambda _c, _u, msg: rec.message(msg)


def new_client(api, name, protocol=mqtt.MQTTv311, key=None, client_id=None, clean_session=True):
    version = mqtt.CallbackAPIVersion.VERSION1 if api == 1 else mqtt.CallbackAPIVersion.VERSION2
    client_id = client_id or f"paho-{name}-{os.getpid()}"
    if protocol == mqtt.MQTTv5:
        client = mqtt.Client(version, client_id=client_id, protocol=protocol)
    else:
        client = mqtt.Client(
            version, client_id=client_id, protocol=protocol, clean_session=clean_session
        )
    client.username_pw_set(env("LB_USERNAME"), key or env("LB_KEY"))
    # Reconnect quickly, as paho does by default but sooner, so that a reconnect loop
    # would show within the test.
    client.reconnect_delay_set(min_delay=1, max_delay=2)
    rec = Recorder(name)
    attach(client, rec, api)
    return client, rec


def connect(client, rec, port, timeout):
    """Connects with paho's network thread (which reconnects by itself on a loss)."""
    client.connect(env("LB_HOST"), int(port), keepalive=30)
    client.loop_start()
    rec.wait("no CONNACK", lambda: rec.connacks, timeout)
    if rec.connacks[0] != 0:
        raise Failed(f"{rec.name}: CONNECT refused with code {rec.connacks[0]}")


def subscribe(client, rec, topic, timeout, qos=0):
    result, mid = client.subscribe(topic, qos=qos)
    if result != mqtt.MQTT_ERR_SUCCESS:
        raise Failed(f"{rec.name}: subscribe {topic} failed: {result}")
    rec.wait(f"no SUBACK for {topic}", lambda: mid in rec.subacks, timeout)
    if rec.subacks[mid] != [qos]:
        raise Failed(f"{rec.name}: {topic} not granted: {rec.subacks[mid]}")


def publish(client, rec, topic, payload, qos, timeout, retain=False):
    info = client.publish(topic, payload, qos=qos, retain=retain)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise Failed(f"{rec.name}: publish to {topic} failed: {info.rc}")
    if qos > 0:
        ack = "PUBACK" if qos == 1 else "PUBCOMP"
        rec.wait(f"no {ack} for {topic}", lambda: info.mid in rec.published, timeout)
        log(f"{rec.name}: {ack} for {topic}")


def message_on(rec, suffix, timeout, after=0, contains=None):
    """Index of the first message after index `after` whose topic ends in `suffix` (and
    whose payload holds `contains`)."""

    def find():
        for i, (topic, payload) in enumerate(rec.messages[after:], start=after):
            if topic.endswith(suffix) and (contains is None or contains.encode() in payload):
                return i
        return None

    rec.wait(f"no message on ...{suffix}", lambda: find() is not None, timeout)
    index = find()
    log(f"{rec.name}: {rec.messages[index][0]}")
    return index


def stayed_connected(rec):
    if len(rec.connacks) != 1 or rec.disconnects:
        raise Failed(
            f"{rec.name}: the connection did not stay up: {len(rec.connacks)} CONNACKs, "
            f"disconnects {rec.disconnects}"
        )


def downlink(correlation_id, f_port=15):
    return json.dumps(
        {
            "downlinks": [
                {
                    "f_port": f_port,
                    "frm_payload": "vu8=",
                    "priority": "NORMAL",
                    "confirmed": True,
                    "correlation_ids": [correlation_id],
                }
            ]
        }
    )


def scenario_will(api, timeout):
    client, rec = new_client(api, "will")
    client.will_set(env("LB_WILL_TOPIC"), env("LB_WILL_PAYLOAD"), qos=1, retain=False)
    connect(client, rec, env("LB_PORT"), timeout)
    log("connected with the will; cutting the connection without DISCONNECT")
    # The process ends without DISCONNECT: the kernel closes the socket, as when a device's
    # network drops.
    os._exit(0)


def scenario_forbidden(api, timeout):
    app, device = env("LB_APP"), env("LB_DEVICE")
    client, rec = new_client(api, "forbidden")
    connect(client, rec, env("LB_PORT"), timeout)
    subscribe(client, rec, f"v3/{app}/devices/{device}/up", timeout)
    for topic in env("LB_FORBIDDEN_TOPICS").split(","):
        publish(client, rec, topic, downlink("forbidden"), 1, timeout)
    # Still connected and still subscribed: traffic keeps arriving after the refusals.
    seen = len(rec.messages)
    message_on(rec, f"/devices/{device}/up", timeout, after=seen)
    subscribe(client, rec, f"v3/{app}/devices/{device}/down/#", timeout)
    stayed_connected(rec)
    client.disconnect()
    client.loop_stop()


def scenario_flow(api, timeout):
    app, device, cid = env("LB_APP"), env("LB_DEVICE"), env("LB_CORRELATION_ID")
    sub, srec = new_client(api, "sub")
    connect(sub, srec, env("LB_PORT"), timeout)
    subscribe(sub, srec, "#", timeout)
    up = message_on(srec, f"/devices/{device}/up", timeout)
    uplink = json.loads(srec.messages[up][1])
    if "uplink_message" not in uplink or "frm_payload" not in uplink["uplink_message"]:
        raise Failed(f"not an uplink: {uplink}")

    pub, prec = new_client(api, "pub")
    connect(pub, prec, env("LB_PUB_PORT", env("LB_PORT")), timeout)
    publish(pub, prec, f"v3/{app}/devices/{device}/down/push", downlink(cid), 1, timeout)

    at = up
    for event in ("down/queued", "down/sent", "down/ack"):
        at = message_on(srec, f"/devices/{device}/{event}", timeout, after=at, contains=cid)
        doc = json.loads(srec.messages[at][1])
        if cid not in doc.get("correlation_ids", []):
            raise Failed(f"{event} without {cid} in correlation_ids: {doc}")
    ack = json.loads(srec.messages[at][1])["downlink_ack"]
    if cid not in ack.get("correlation_ids", []):
        raise Failed(f"downlink_ack without {cid}: {ack}")
    stayed_connected(srec)
    stayed_connected(prec)
    for client in (pub, sub):
        client.disconnect()
        client.loop_stop()


def scenario_v5(api, timeout):
    client, rec = new_client(api, "v5", protocol=mqtt.MQTTv5)
    connect_error = None
    try:
        client.connect(env("LB_HOST"), int(env("LB_PORT")), keepalive=30)
    except OSError as e:
        connect_error = e
    if connect_error is not None:
        raise Failed(f"the TCP connection failed: {connect_error}")
    # paho's own loop, without its reconnecting thread: one attempt, then we look.
    started = time.monotonic()
    while not rec.connacks and time.monotonic() - started < timeout:
        if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
            break
    if not rec.connacks:
        raise Failed(
            f"no CONNACK: the library saw only a lost connection ({rec.disconnects}), "
            "not a refusal it can report"
        )
    code = rec.connacks[0]
    if code == 0:
        raise Failed("an MQTT 5 CONNECT was accepted")
    # paho reports the 3.1.1 CONNACK code 1 as MQTT 5's 0x84 (132).
    reason = str(ReasonCode(PacketTypes.CONNACK, identifier=code))
    log(f"refused with code {code}: {reason}")
    if code not in (1, 132) or "protocol version" not in reason.lower():
        raise Failed(f"refused with {code} ({reason}), not unsupported protocol version")


def scenario_qos2(api, timeout):
    app, device, cid = env("LB_APP"), env("LB_DEVICE"), env("LB_CORRELATION_ID")
    client, rec = new_client(api, "qos2")
    # One thread drives the network (no loop_start) so that the duplicate goes out before
    # paho has read the PUBREC and sent PUBREL.
    client.connect(env("LB_HOST"), int(env("LB_PORT")), keepalive=30)
    deadline = time.monotonic() + timeout
    while not rec.connacks and time.monotonic() < deadline:
        if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
            break
    if rec.connacks != [0]:
        raise Failed(f"CONNECT: {rec.connacks or 'no CONNACK'}")
    topic = f"v3/{app}/devices/{device}/down/push"
    payload = downlink(cid).encode()
    info = client.publish(topic, payload, qos=2)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise Failed(f"publish failed: {info.rc}")
    # What paho sends when it retransmits: the same packet ID with DUP set.
    client._send_publish(info.mid, topic.encode(), payload, 2, False, True, None, None)
    log(f"sent PUBLISH and its duplicate (packet ID {info.mid}, DUP)")
    while info.mid not in rec.published and time.monotonic() < deadline:
        if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
            raise Failed(f"connection lost before PUBCOMP: {rec.disconnects}")
    if info.mid not in rec.published:
        raise Failed(f"no PUBCOMP within {timeout} s")
    log("PUBCOMP")
    stayed_connected(rec)
    client.disconnect()


def scenario_homeassistant(api, timeout):
    app = env("LB_APP")
    client, rec = new_client(api, "homeassistant")
    client.will_set("homeassistant/status", "offline", qos=0, retain=True)
    connect(client, rec, env("LB_PORT"), timeout)
    # The birth message Home Assistant sends once connected: retained, on a topic no
    # lorabroker key may write.
    publish(client, rec, "homeassistant/status", "online", 1, timeout, retain=True)
    subscribe(client, rec, f"v3/{app}/devices/+/up", timeout)
    message_on(rec, "/up", timeout)
    stayed_connected(rec)
    client.disconnect()
    client.loop_stop()


def persistent_client(api, timeout):
    """A clean_session=0 client with LB_CLIENT_ID, connected."""
    client, rec = new_client(
        api, "persistent", client_id=env("LB_CLIENT_ID"), clean_session=False
    )
    connect(client, rec, env("LB_PORT"), timeout)
    return client, rec


def scenario_persistent_subscribe(api, timeout):
    client, rec = persistent_client(api, timeout)
    if rec.present[0]:
        raise Failed("a new session was reported present")
    subscribe(client, rec, f"v3/{env('LB_APP')}/devices/+/up", timeout, qos=1)
    client.disconnect()
    client.loop_stop()


def scenario_persistent_resume(api, timeout):
    count = int(env("LB_COUNT"))
    client, rec = persistent_client(api, timeout)
    if not rec.present[0]:
        raise Failed("the session was not present (CONNACK session present 0)")

    def distinct():
        return len({payload for payload, _, _ in rec.deliveries})

    rec.wait(f"fewer than {count} uplinks", lambda: distinct() >= count, timeout)
    first, duplicates = [], 0
    with rec.cond:
        deliveries = list(rec.deliveries)
    for payload, qos, dup in deliveries:
        number = int(payload)
        if qos != 1:
            raise Failed(f"uplink {number} came at QoS {qos}, not 1")
        if number in first:
            if not dup:
                raise Failed(f"uplink {number} came again without DUP")
            duplicates += 1
        else:
            first.append(number)
    if first != list(range(count)):
        raise Failed(f"not in order: {first[:20]}...")
    log(f"resumed: {count} uplinks in order at QoS 1, {duplicates} duplicates with DUP")
    stayed_connected(rec)
    client.disconnect()
    client.loop_stop()


SCENARIOS = {
    "will": scenario_will,
    "forbidden": scenario_forbidden,
    "flow": scenario_flow,
    "v5": scenario_v5,
    "qos2": scenario_qos2,
    "homeassistant": scenario_homeassistant,
    "persistent-subscribe": scenario_persistent_subscribe,
    "persistent-resume": scenario_persistent_resume,
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--api", type=int, choices=(1, 2), required=True)
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    args = parser.parse_args()

    def overran():
        print(f"FAIL: {args.scenario} overran its {DEADLINE} s deadline", file=sys.stderr, flush=True)
        os._exit(3)

    watchdog = threading.Timer(DEADLINE, overran)
    watchdog.daemon = True
    watchdog.start()
    log(f"paho-mqtt {paho.mqtt.__version__}, callback API {args.api}: {args.scenario}")
    try:
        SCENARIOS[args.scenario](args.api, float(os.environ.get("LB_TIMEOUT", "10")))
    except Failed as e:
        print(f"FAIL: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    log(f"ok: {args.scenario}")
    sys.stdout.flush()
    # No waiting for paho's threads: everything expected has happened.
    os._exit(0)


if __name__ == "__main__":
    main()
