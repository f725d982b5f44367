#!/usr/bin/env python3
"""A lorabroker upstream in Python, written from docs/upstream.md alone.

It plays a small LoRaWAN network for one application: it registers its devices in the
device registry (Redis), publishes a join and then periodic uplinks for each of them on
NATS, and after each uplink takes the device's next queued downlink with the queue's
pop script (class A: one downlink per receive window). For each downlink it publishes
`down/sent`, then `down/ack` (or `down/nack`, see --nack-every) when it was confirmed; an
item it cannot send (a `decoded_payload` without `frm_payload`: this upstream has no
payload encoder) gets `down/failed`.

Every setting is a flag or an environment variable (see --help). SIGTERM or SIGINT stops
it cleanly: the current round finishes, NATS is drained, and it exits with status 0.
"""

import argparse
import asyncio
import base64
import json
import logging
import os
import pathlib
import random
import re
import signal
import sys
import time
from datetime import datetime, timezone

import nats
import redis.asyncio as aioredis
from redis.exceptions import RedisError

LOG = logging.getLogger("python-upstream")

# docs/upstream.md, "Identifiers and tenancy".
ID_RULE = re.compile(r"^[a-z0-9](?:-?[a-z0-9]){2,}$")
MAX_ID_LEN = 36

# The repository's queue scripts (docs/upstream.md, "The pop script").
DEFAULT_LUA_DIR = pathlib.Path(__file__).resolve().parents[2] / "src" / "downlink" / "lua"

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def ulid() -> str:
    """A ULID (48-bit milliseconds, 80 random bits, Crockford base32), as correlation IDs use."""
    value = (int(time.time() * 1000) << 80) | random.getrandbits(80)
    return "".join(CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def now() -> str:
    """The current time as RFC 3339 in UTC with milliseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def redact(url: str) -> str:
    """`url` without the password of its user part, for logs."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Device:
    """One simulated end device: its identifiers, session and frame counters."""

    def __init__(self, app: str, device_id: str, index: int):
        self.app = app
        self.id = device_id
        self.dev_eui = f"70B3D57ED1{index:06X}"
        self.join_eui = "0000000000000000"
        self.dev_addr = ""
        self.session_key_id = ""
        self.f_cnt_up = 0
        self.f_cnt_down = 0
        self.confirmed_sent = 0

    def ids(self) -> dict:
        ids = {
            "device_id": self.id,
            "application_ids": {"application_id": self.app},
            "dev_eui": self.dev_eui,
            "join_eui": self.join_eui,
        }
        if self.dev_addr:
            ids["dev_addr"] = self.dev_addr
        return ids

    def document(self, correlation_ids: list, field: str, body: dict) -> dict:
        """The envelope of docs/upstream.md, "Event documents"."""
        return {
            "end_device_ids": self.ids(),
            "correlation_ids": correlation_ids,
            "received_at": now(),
            field: body,
        }

    def join(self) -> dict:
        self.dev_addr = f"260C{random.getrandbits(16):04X}"
        self.session_key_id = b64(random.randbytes(16))
        self.f_cnt_up = 0
        self.f_cnt_down = 0
        return self.document(
            uplink_correlation_ids(),
            "join_accept",
            {"session_key_id": self.session_key_id, "received_at": now()},
        )

    def uplink(self) -> dict:
        temperature = random.randrange(150, 300) / 10
        humidity = random.randrange(30, 80)
        frm = int(temperature * 10).to_bytes(2, "big", signed=True) + bytes([humidity])
        f_cnt = self.f_cnt_up
        self.f_cnt_up += 1
        at = now()
        gateway = f"eui-b827ebfffe{random.randrange(0xFFFF):06x}"
        return self.document(
            uplink_correlation_ids(),
            "uplink_message",
            {
                "session_key_id": self.session_key_id,
                "f_port": 15,
                "f_cnt": f_cnt,
                "frm_payload": b64(frm),
                "decoded_payload": {"temperature": temperature, "humidity": humidity},
                "rx_metadata": [
                    {
                        "gateway_ids": {"gateway_id": gateway, "eui": gateway[4:].upper()},
                        "time": at,
                        "timestamp": random.getrandbits(32),
                        "rssi": -random.randrange(30, 120),
                        "snr": random.randrange(-50, 95) / 10,
                        "uplink_token": b64(random.randbytes(24)),
                    }
                ],
                "settings": {
                    "data_rate": {"lora": {"bandwidth": 125000, "spreading_factor": 7}},
                    "coding_rate": "4/5",
                    "frequency": "868100000",
                    "gateway_channel_index": 0,
                    "device_channel_index": 0,
                },
                "received_at": at,
            },
        )

    def lifecycle(self, item: dict, field: str, body: dict) -> dict:
        """A downlink event: the item's correlation IDs first, unchanged and in order,
        then this network's own (docs/upstream.md, "Reporting downlinks")."""
        ids = [i for i in item.get("correlation_ids", []) if isinstance(i, str)]
        return self.document(ids + [f"ns:downlink:{ulid()}"], field, body)

    def sent(self, item: dict) -> dict:
        """The `downlink_sent` body: the item plus session, frame counter and priority."""
        body = dict(item)
        body.setdefault("priority", "LOWEST")
        body["session_key_id"] = self.session_key_id
        body["f_cnt"] = self.f_cnt_down
        self.f_cnt_down += 1
        return body


def uplink_correlation_ids() -> list:
    return [f"{p}:{ulid()}" for p in ("gs:conn", "gs:uplink", "ns:uplink", "as:up")]


class Upstream:
    """The NATS and Redis side of docs/upstream.md for one application."""

    def __init__(self, args, nc, rds, pop_script: str):
        self.args = args
        self.nc = nc
        self.rds = rds
        # EVALSHA, falling back to EVAL when Redis does not know the script yet.
        self.pop = rds.register_script(pop_script)
        scope = f"{args.key_prefix}:{{t:{args.tenant}}}"
        self.scope = scope
        self.devices_key = f"{scope}:devices:{args.app}"

    def subject(self, device: Device, event: str) -> str:
        """`v3.{tenant}.{app}.devices.{dev}.{event}` with `/` written `.`."""
        return f"v3.{self.args.tenant}.{self.args.app}.devices.{device.id}.{event.replace('/', '.')}"

    async def publish(self, device: Device, event: str, doc: dict) -> None:
        payload = json.dumps(doc, separators=(",", ":")).encode()
        try:
            await self.nc.publish(self.subject(device, event), payload)
            LOG.info("published %s of %s", event, device.id)
        except Exception as e:  # nats-py raises several error types; none must stop the loop
            LOG.warning("%s of %s not published: %s", event, device.id, e)

    async def register(self, devices: list) -> bool:
        """SADD of every device (harmless when already registered)."""
        try:
            await self.rds.sadd(self.devices_key, *[d.id for d in devices])
            return True
        except RedisError as e:
            LOG.warning("devices not registered in %s: %s", self.devices_key, e)
            return False

    async def unregister(self, devices: list) -> None:
        try:
            await self.rds.srem(self.devices_key, *[d.id for d in devices])
        except RedisError as e:
            LOG.warning("devices not unregistered: %s", e)

    async def next_downlink(self, device: Device):
        """The device's oldest queued item, taken atomically, or None."""
        keys = [
            f"{self.scope}:down:{self.args.app}:{device.id}",
            f"{self.scope}:quota",
            f"{self.scope}:queues",
        ]
        try:
            raw = await self.pop(keys=keys, args=[self.args.app, f"{self.args.app}:{device.id}"])
        except RedisError as e:
            LOG.warning("downlink queue of %s not readable: %s", device.id, e)
            return None
        if raw is None:
            return None
        try:
            item = json.loads(raw)
        except ValueError:
            LOG.warning("queued item of %s is not JSON, dropped: %.100r", device.id, raw)
            return None
        return item if isinstance(item, dict) else None

    async def serve_downlink(self, device: Device) -> None:
        """Takes the device's next downlink, if any, and reports what became of it."""
        item = await self.next_downlink(device)
        if item is None:
            return
        if "frm_payload" not in item:
            # Only a decoded_payload, and this network has no payload encoder.
            error = {
                "namespace": "python-upstream",
                "name": "no_encoder",
                "message_format": "no payload encoder for decoded_payload; send frm_payload",
                "code": 9,
            }
            doc = device.lifecycle(item, "downlink_failed", {"downlink": item, "error": error})
            await self.publish(device, "down/failed", doc)
            return
        sent = device.sent(item)
        await self.publish(device, "down/sent", device.lifecycle(item, "downlink_sent", sent))
        if item.get("confirmed") is True:
            device.confirmed_sent += 1
            nack = self.args.nack_every > 0 and device.confirmed_sent % self.args.nack_every == 0
            field, event = ("downlink_nack", "down/nack") if nack else ("downlink_ack", "down/ack")
            await self.publish(device, event, device.lifecycle(item, field, sent))


async def run(args) -> int:
    lua_dir = pathlib.Path(args.lua_dir)
    try:
        pop_script = (lua_dir / "prelude.lua").read_text() + "\n" + (lua_dir / "pop.lua").read_text()
    except OSError as e:
        LOG.error("cannot read the queue scripts in %s (--lua-dir): %s", lua_dir, e)
        return 66

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def nats_error(e):
        LOG.warning("NATS at %s: %s", redact(args.nats_url), e)

    nc = None
    while nc is None:
        try:
            nc = await nats.connect(
                servers=args.nats_url.split(","),
                name="python-upstream",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=2,
                error_cb=nats_error,
            )
        except Exception as e:  # the first connection; later ones are nats-py's business
            LOG.warning("cannot connect to NATS at %s, retrying: %s", redact(args.nats_url), e)
            try:
                await asyncio.wait_for(stop.wait(), timeout=1)
                return 0
            except asyncio.TimeoutError:
                pass
    rds = aioredis.from_url(args.redis_url, socket_timeout=5, socket_connect_timeout=2)
    upstream = Upstream(args, nc, rds, pop_script)
    devices = [Device(args.app, d, i) for i, d in enumerate(args.devices, 1)]
    LOG.info(
        "serving %s of application %s (tenant %s) every %ss",
        ",".join(args.devices), args.app, args.tenant, args.interval,
    )

    rounds = 0
    while not stop.is_set():
        # Registering every round is one idempotent SADD: a Redis that lost its data
        # (restarted without persistence) gets the registry back at once.
        await upstream.register(devices)
        for device in devices:
            if rounds % args.rejoin_every == 0:
                await upstream.publish(device, "join", device.join())
            await upstream.publish(device, "up", device.uplink())
            await upstream.serve_downlink(device)
        rounds += 1
        try:
            await nc.flush(timeout=2)
        except Exception as e:
            LOG.warning("NATS flush: %s", e)
        try:
            await asyncio.wait_for(stop.wait(), timeout=args.interval)
        except asyncio.TimeoutError:
            pass

    LOG.info("stopping")
    if args.unregister:
        await upstream.unregister(devices)
    try:
        await nc.drain()
    except Exception as e:
        LOG.warning("NATS drain: %s", e)
    await rds.aclose()
    return 0


def parse_args(argv):
    env = os.environ.get
    p = argparse.ArgumentParser(
        description="A lorabroker upstream: devices that join, uplink and take downlinks "
        "(docs/upstream.md). Every flag defaults to the environment variable shown.",
    )
    p.add_argument("--nats-url", default=env("UPSTREAM_NATS_URL", "nats://127.0.0.1:4222"),
                   help="NATS URL(s), comma-separated (UPSTREAM_NATS_URL)")
    p.add_argument("--redis-url", default=env("UPSTREAM_REDIS_URL", "redis://127.0.0.1:6379"),
                   help="Redis URL (UPSTREAM_REDIS_URL)")
    p.add_argument("--key-prefix", default=env("UPSTREAM_KEY_PREFIX", "lorabroker"),
                   help="the nodes' redis.key_prefix (UPSTREAM_KEY_PREFIX)")
    p.add_argument("--tenant", default=env("UPSTREAM_TENANT", "default"),
                   help="tenant ID; tenancy.default_tenant in single-tenant mode (UPSTREAM_TENANT)")
    p.add_argument("--app", default=env("UPSTREAM_APP", "app1"),
                   help="application ID (UPSTREAM_APP)")
    p.add_argument("--devices", default=env("UPSTREAM_DEVICES", "dev1"),
                   help="comma-separated device IDs (UPSTREAM_DEVICES)")
    p.add_argument("--interval", type=float, default=float(env("UPSTREAM_INTERVAL", "5")),
                   help="seconds between two uplinks of a device (UPSTREAM_INTERVAL)")
    p.add_argument("--rejoin-every", type=int, default=int(env("UPSTREAM_REJOIN_EVERY", "10")),
                   help="uplinks between two joins of a device (UPSTREAM_REJOIN_EVERY)")
    p.add_argument("--nack-every", type=int, default=int(env("UPSTREAM_NACK_EVERY", "0")),
                   help="answer every Nth confirmed downlink with down/nack; 0 never (UPSTREAM_NACK_EVERY)")
    p.add_argument("--lua-dir", default=env("UPSTREAM_LUA_DIR", str(DEFAULT_LUA_DIR)),
                   help="directory of prelude.lua and pop.lua (UPSTREAM_LUA_DIR)")
    p.add_argument("--unregister", action="store_true",
                   default=env("UPSTREAM_UNREGISTER", "") not in ("", "0", "false"),
                   help="remove the devices from the registry on exit (UPSTREAM_UNREGISTER)")
    p.add_argument("--log-level", default=env("UPSTREAM_LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING or ERROR (UPSTREAM_LOG_LEVEL)")
    args = p.parse_args(argv)
    args.devices = [d for d in args.devices.split(",") if d]
    for what, value in [("--tenant", args.tenant), ("--app", args.app)] + [
        ("--devices", d) for d in args.devices
    ]:
        if len(value) > MAX_ID_LEN or not ID_RULE.match(value):
            p.error(f"{what} {value!r} is not a valid ID (lower-case letters, digits and "
                    f"single dashes, 3 to {MAX_ID_LEN} characters)")
    if not args.devices:
        p.error("--devices names no device")
    if args.interval <= 0 or args.rejoin_every < 1 or args.nack_every < 0:
        p.error("--interval must be > 0, --rejoin-every >= 1 and --nack-every >= 0")
    if "{" in args.key_prefix or "}" in args.key_prefix:
        p.error("--key-prefix must not contain braces")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
