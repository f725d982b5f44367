#!/usr/bin/env python3
"""Validate the deployment files: the Helm chart, docker-compose.yml and the Dockerfile.

Run by .ci/check-deploy inside a venv that holds the pinned helm-python-sdk (Helm's own Go
library behind a C ABI: lint and offline render, no helm binary) and kubernetes-validate
(offline Kubernetes JSON schemas). The compose file's JSON-schema validation is done by
check-jsonschema in .ci/check-deploy; here only what a schema cannot see.

For the chart, for each scenario (default values, values-production.yaml, every optional
object switched on, a single embedded node):
  1. helm lint (strict, against each pinned Kubernetes version): errors and warnings fail;
  2. helm render, then every object is validated against the Kubernetes schemas of each
     pinned version in strict mode (unknown fields fail). The ServiceMonitor is a CRD that
     kubernetes-validate has no schema for: it is validated against SERVICE_MONITOR_SCHEMA
     below, the subset of the monitoring.coreos.com/v1 CRD schema the chart uses;
  3. the chart's promises are checked on the rendered objects: the rendered lorabroker.toml
     parses and uses only keys the node knows (config/lorabroker.toml), LORABROKER_* env
     names map to known keys, terminationGracePeriodSeconds covers preStop + drain + the
     node's 5s hard deadline, rolling updates keep maxUnavailable 0, probes, security
     context, enableServiceLinks off.
Scenarios that must be refused (a multi-node install without NATS, a key the chart owns
set in config, a misspelled value caught by values.schema.json, ...) must fail to render.
values.yaml must document every value.

The Grafana dashboard (charts/lorabroker/dashboards/lorabroker.json) must parse, query a
${datasource} variable, and use only metrics that src/metrics.rs registers (so a renamed
metric fails here rather than in an operator's Grafana); rendered with
grafanaDashboard.enabled, its ConfigMap carries the sidecar label and the same JSON.

The Dockerfile is parsed with BuildKit's own parser (PyPI "dockerfile"; there is no Docker
engine to build with) and checked for what the image promises (multi-stage, --locked build,
non-root user, ports, entry point, health check with a tool that is installed), and
.dockerignore must keep every file cargo needs (declared targets included).

Exit status: 0 when everything holds, 1 otherwise; every problem is printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

import jsonschema
import kubernetes_validate
import yaml

import helm_python as helm

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "charts" / "lorabroker"
NODE_CONFIG = ROOT / "config" / "lorabroker.toml"
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = CHART / "dashboards" / "lorabroker.json"
METRICS_RS = ROOT / "src" / "metrics.rs"

# Oldest and newest Kubernetes versions the chart is validated against. The chart says
# kubeVersion >=1.25; kubernetes-validate 1.37.0 ships schemas for 1.25 to 1.37.
KUBE_VERSIONS = ["1.25.0", "1.37.0"]

# How much longer than shutdown.grace_period the node may take to exit (src/server.rs:
# the drain's hard deadline is the grace period + 5s).
NODE_DRAIN_HARD_DEADLINE_EXTRA_S = 5

RELEASE = "lorabroker"
NAMESPACE = "lorabroker"

# The part of the monitoring.coreos.com/v1 ServiceMonitor CRD schema that the chart uses
# (field names, types and the duration pattern as in prometheus-operator's CRD), with
# unknown fields refused so that a typo fails here as it would on apply.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": _LABELS,
                "annotations": _LABELS,
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _LABELS, "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


class Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, what: str) -> None:
        self.items.append(f"{where}: {what}")
        print(f"  FAIL {where}: {what}", flush=True)

    def check(self, ok: bool, where: str, what: str) -> None:
        if not ok:
            self.add(where, what)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    with path.open() as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: not a YAML mapping")
    return data


def duration_seconds(text: str) -> float:
    """Seconds of a humantime duration as lorabroker.toml writes them ("25s", "1m 30s")."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text)
    if not parts or re.sub(r"[\d.\sa-z]", "", text):
        raise ValueError(f"not a duration: {text!r}")
    for number, unit in parts:
        if unit not in units:
            raise ValueError(f"unknown duration unit {unit!r} in {text!r}")
        total += float(number) * units[unit]
    return total


def known_config_keys() -> set[str]:
    """Dotted keys the node accepts: those config/lorabroker.toml documents, plus
    node_name (documented there as a comment because its default is the hostname)."""
    with NODE_CONFIG.open("rb") as f:
        doc = tomllib.load(f)
    keys = {"node_name"}

    def walk(prefix: str, table: dict[str, Any]) -> None:
        # Every key and every key of a subsection ([mqtt.tls]) or inline table.
        for k, v in table.items():
            keys.add(f"{prefix}{k}")
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)

    walk("", doc)
    return keys


def env_to_key(name: str) -> str | None:
    """LORABROKER_SECTION__KEY -> section.key (figment's Env::prefixed(..).split("__"))."""
    if not name.startswith("LORABROKER_"):
        return None
    return ".".join(part.lower() for part in name[len("LORABROKER_"):].split("__"))


# ---------------------------------------------------------------------------------------
# Chart


def render(chart: helm.Chart, values: dict[str, Any] | None) -> list[dict[str, Any]]:
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects: list[dict[str, Any]] = []
    for template, text in sorted(manifests.items()):
        if not template.endswith((".yaml", ".yml")):
            continue  # NOTES.txt
        for doc in yaml.safe_load_all(text):
            if doc is None:
                continue
            if not isinstance(doc, dict):
                raise ValueError(f"{template}: a document is not a mapping")
            doc["__template__"] = template
            objects.append(doc)
    return objects


# The part of cert-manager's cert-manager.io/v1 Certificate CRD schema that the chart uses
# (field names and enums as in cert-manager's CRD), unknown fields refused.
_GO_DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"
CERTIFICATE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "cert-manager.io/v1"},
        "kind": {"const": "Certificate"},
        "metadata": SERVICE_MONITOR_SCHEMA["properties"]["metadata"],
        "spec": {
            "type": "object",
            "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                "commonName": {"type": "string", "maxLength": 64},
                "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
                "duration": {"type": "string", "pattern": _GO_DURATION_PATTERN},
                "renewBefore": {"type": "string", "pattern": _GO_DURATION_PATTERN},
                "privateKey": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                        "size": {"type": "integer"},
                        "encoding": {"enum": ["PKCS1", "PKCS8"]},
                        "rotationPolicy": {"enum": ["Never", "Always"]},
                    },
                },
                "usages": {"type": "array", "items": {"enum": [
                    "signing", "digital signature", "content commitment", "key encipherment", "key agreement",
                    "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
                    "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
                    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]}},
                "issuerRef": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {"name": {"type": "string", "minLength": 1}, "kind": {"type": "string"},
                                   "group": {"type": "string"}},
                },
            },
        },
    },
}


def validate_objects(objects: list[dict[str, Any]], scenario: str, problems: Problems) -> None:
    for obj in objects:
        template = obj.pop("__template__")
        where = f"{scenario}: {template}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if obj.get("apiVersion", "").startswith("monitoring.coreos.com/"):
            # A CRD: kubernetes-validate has no schema for it (see SERVICE_MONITOR_SCHEMA).
            errors = sorted(jsonschema.Draft202012Validator(SERVICE_MONITOR_SCHEMA).iter_errors(obj), key=str)
            for e in errors:
                problems.add(where, f"ServiceMonitor subset schema: {e.json_path}: {e.message}")
            obj["__template__"] = template
            continue
        if obj.get("apiVersion", "").startswith("cert-manager.io/"):
            # A CRD too (see CERTIFICATE_SCHEMA).
            errors = sorted(jsonschema.Draft202012Validator(CERTIFICATE_SCHEMA).iter_errors(obj), key=str)
            for e in errors:
                problems.add(where, f"Certificate subset schema: {e.json_path}: {e.message}")
            obj["__template__"] = template
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                problems.add(where, f"Kubernetes {version} schema: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.add(where, f"no Kubernetes {version} schema: {e.message}")
        obj["__template__"] = template


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == kind]


def check_promises(objects: list[dict[str, Any]], values: dict[str, Any], scenario: str, problems: Problems) -> None:
    """What the chart promises beyond schema validity, on the rendered objects."""
    where = scenario
    known = known_config_keys()

    deployments = by_kind(objects, "Deployment")
    problems.check(len(deployments) == 1, where, f"expected one Deployment, got {len(deployments)}")
    if not deployments:
        return
    dep = deployments[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    container = next((c for c in pod["containers"] if c["name"] == "lorabroker"), None)
    if container is None:
        problems.add(where, "no container named lorabroker")
        return

    problems.check(
        spec.get("strategy", {}).get("rollingUpdate", {}).get("maxUnavailable") == 0,
        where, "Deployment rollingUpdate.maxUnavailable must be 0",
    )
    hpa = by_kind(objects, "HorizontalPodAutoscaler")
    problems.check(("replicas" in spec) != bool(hpa), where, "replicas must be set exactly when there is no HPA")
    problems.check(pod.get("enableServiceLinks") is False, where,
                   "enableServiceLinks must be false (injected LORABROKER_* Service variables break the node's config)")

    # Configuration file: valid TOML, only keys the node knows.
    cms = by_kind(objects, "ConfigMap")
    toml_text = next((t for cm in cms if (t := cm.get("data", {}).get("lorabroker.toml")) is not None), None)
    config: dict[str, Any] = {}
    if toml_text is None:
        problems.add(where, "no ConfigMap with lorabroker.toml")
    else:
        try:
            config = tomllib.loads(toml_text)
        except tomllib.TOMLDecodeError as e:
            problems.add(where, f"rendered lorabroker.toml is not valid TOML: {e}")
        def check_keys(prefix: str, table: dict[str, Any]) -> None:
            for k, v in table.items():
                key = f"{prefix}{k}"
                problems.check(key in known, where, f"lorabroker.toml sets {key}, which the node does not know "
                               f"(not in {NODE_CONFIG.relative_to(ROOT)})")
                if isinstance(v, dict) and key in known:
                    check_keys(f"{key}.", v)

        check_keys("", config)
    args = container.get("args", [])
    problems.check(args[-1:] == ["serve"], where, f"container args must end with serve, got {args}")
    if "--config" in args:
        problems.check(any(m["mountPath"] == str(Path(args[args.index("--config") + 1]).parent)
                           for m in container.get("volumeMounts", [])),
                       where, "the --config file's directory is not mounted")

    # Environment: every LORABROKER_* variable is a known key; backends from values/Secrets.
    env = {e["name"]: e for e in container.get("env", [])}
    for name in env:
        key = env_to_key(name)
        if key is not None:
            problems.check(key in known, where, f"env {name} maps to {key}, which the node does not know")
    for name, section in (("LORABROKER_NATS__URL", "externalNats"), ("LORABROKER_REDIS__URL", "externalRedis"),
                          ("LORABROKER_HTTP__ADMIN_TOKEN", "adminToken")):
        v = values.get(section, {})
        if v.get("existingSecret"):
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
            problems.check(ref.get("name") == v["existingSecret"] and ref.get("key") == v.get("existingSecretKey"),
                           where, f"{name} must come from Secret {v['existingSecret']}/{v.get('existingSecretKey')}")

    # Redis secrets: every *_FILE variable points into a mounted Secret volume, and the
    # passwords never travel in the environment.
    mounts = {m["name"]: m["mountPath"] for m in container.get("volumeMounts", [])}
    secret_volumes = {v["name"]: v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    redis = values.get("externalRedis", {})
    for name, secret in (("LORABROKER_REDIS__PASSWORD_FILE", redis.get("passwordSecret", {}).get("name")),
                         ("LORABROKER_REDIS__TLS_CA_FILE", redis.get("tls", {}).get("caSecret", {}).get("name")),
                         ("LORABROKER_REDIS__TLS_CERT_FILE",
                          redis.get("tls", {}).get("clientCertSecret", {}).get("name"))):
        if not secret:
            problems.check(name not in env, where, f"{name} set without a Secret")
            continue
        path = env.get(name, {}).get("value", "")
        # The deepest mount that holds the path is the one the file is in.
        volume = max((v for v, m in mounts.items() if path.startswith(m + "/")),
                     key=lambda v: len(mounts[v]), default=None)
        problems.check(volume is not None and secret_volumes.get(volume) == secret, where,
                       f"{name}={path!r} is not in the mounted Secret {secret}")
    problems.check(not any("PASSWORD" in n and not n.endswith("_FILE") for n in env), where,
                   "a password in an environment variable")
    # Secured NATS: each secret is a file from its Secret (or the CA's ConfigMap), mounted
    # where the nats.*_file setting points; no secret is ever an environment variable.
    nats = values.get("externalNats", {})
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}

    def mounted_from(env_name: str, source: str, name: str, key: str) -> None:
        path = env.get(env_name, {}).get("value")
        if path is None:
            problems.add(where, f"{env_name} is not set although {source} {name} is given")
            return
        directory, _, file = path.rpartition("/")
        volume = volumes.get(mounts.get(directory, ""), {})
        ref = volume.get("secret", {}).get("secretName") if source == "Secret" else \
            volume.get("configMap", {}).get("name")
        items = {i["key"]: i["path"] for i in (volume.get("secret") or volume.get("configMap") or {}).get("items", [])}
        problems.check(ref == name and items.get(key) == file, where,
                       f"{env_name}={path} is not key {key} of {source} {name} mounted at {directory}")

    auth = nats.get("auth", {})
    method_env = {"password": "LORABROKER_NATS__PASSWORD_FILE", "token": "LORABROKER_NATS__TOKEN_FILE",
                  "nkey": "LORABROKER_NATS__NKEY_SEED_FILE", "creds": "LORABROKER_NATS__CREDS_FILE"}
    if auth.get("type"):
        mounted_from(method_env[auth["type"]], "Secret", auth["existingSecret"], auth["existingSecretKey"])
    for other_type, name in method_env.items():
        if other_type != auth.get("type"):
            problems.check(name not in env, where, f"{name} set, but externalNats.auth.type is {auth.get('type')!r}")
    ca = nats.get("tls", {}).get("ca", {})
    if ca.get("existingSecret"):
        mounted_from("LORABROKER_NATS__TLS_CA_FILE", "Secret", ca["existingSecret"], ca["key"])
    elif ca.get("existingConfigMap"):
        mounted_from("LORABROKER_NATS__TLS_CA_FILE", "ConfigMap", ca["existingConfigMap"], ca["key"])
    client = nats.get("tls", {}).get("clientCertificate", {})
    if client.get("existingSecret"):
        mounted_from("LORABROKER_NATS__TLS_CERT_FILE", "Secret", client["existingSecret"], "tls.crt")
        mounted_from("LORABROKER_NATS__TLS_KEY_FILE", "Secret", client["existingSecret"], "tls.key")
    for e in container.get("env", []):
        if e["name"].startswith("LORABROKER_NATS__") and e["name"] != "LORABROKER_NATS__URL":
            problems.check("valueFrom" not in e, where, f"{e['name']} must be a path, not a secret's value")

    # Probes and drain.
    def probe_path(probe: str) -> str | None:
        return container.get(probe, {}).get("httpGet", {}).get("path")

    problems.check(probe_path("livenessProbe") == "/healthz", where, "liveness probe must be GET /healthz")
    problems.check(probe_path("readinessProbe") == "/readyz", where, "readiness probe must be GET /readyz")
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    sleep_s = 0.0
    if "exec" in pre_stop:
        cmd = pre_stop["exec"].get("command", [])
        problems.check(cmd[:1] == ["sleep"] and len(cmd) == 2, where, f"preStop must be a sleep, got {cmd}")
        sleep_s = float(cmd[1]) if len(cmd) == 2 else 0.0
    elif "sleep" in pre_stop:
        sleep_s = float(pre_stop["sleep"]["seconds"])
    else:
        problems.add(where, "no preStop hook")
    grace_text = config.get("shutdown", {}).get("grace_period", "25s")
    try:
        grace = duration_seconds(grace_text)
    except ValueError as e:
        problems.add(where, f"shutdown.grace_period: {e}")
        grace = 0
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    needed = sleep_s + grace + NODE_DRAIN_HARD_DEADLINE_EXTRA_S
    problems.check(tgps > needed, where,
                   f"terminationGracePeriodSeconds {tgps} must exceed preStop {sleep_s:g}s + grace_period "
                   f"{grace:g}s + {NODE_DRAIN_HARD_DEADLINE_EXTRA_S}s = {needed:g}s")

    # Security context.
    psc, csc = pod.get("securityContext", {}), container.get("securityContext", {})
    problems.check(psc.get("runAsNonRoot") is True or csc.get("runAsNonRoot") is True, where, "runAsNonRoot")
    problems.check(csc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem")
    problems.check(csc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation false")
    problems.check("ALL" in csc.get("capabilities", {}).get("drop", []), where, "capabilities drop ALL")
    problems.check((psc.get("seccompProfile") or csc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
                   where, "seccompProfile RuntimeDefault")

    # Services: MQTT and HTTP, pointing at the pod's named ports.
    ports = {p["name"] for p in container.get("ports", [])}
    services = by_kind(objects, "Service")
    for svc in services:
        for p in svc["spec"].get("ports", []):
            problems.check(p.get("targetPort") in ports, where,
                           f"Service {svc['metadata']['name']} targets unknown port {p.get('targetPort')}")
    mqtt = [s for s in services if any(p.get("name") == "mqtt" for p in s["spec"]["ports"])]
    problems.check(len(mqtt) == 1, where, "expected one MQTT Service")
    if mqtt:
        want = values.get("service", {}).get("mqtt", {}).get("type", "LoadBalancer")
        problems.check(mqtt[0]["spec"].get("type") == want, where, f"MQTT Service type must be {want}")
    check_edge(objects, values, config, pod, container, mqtt[0] if mqtt else None, where, problems)
    selector = spec["selector"]["matchLabels"]
    labels = spec["template"]["metadata"]["labels"]
    problems.check(all(labels.get(k) == v for k, v in selector.items()), where, "pod labels do not match the selector")
    for obj in by_kind(objects, "PodDisruptionBudget") + by_kind(objects, "Service"):
        sel = obj["spec"]["selector"]
        sel = sel.get("matchLabels", sel)
        problems.check(sel == selector, where, f"{obj['kind']} {obj['metadata']['name']} selects other pods")
    for h in hpa:
        ref = h["spec"]["scaleTargetRef"]
        problems.check(ref["kind"] == "Deployment" and ref["name"] == dep["metadata"]["name"], where,
                       "HPA does not target the Deployment")


def check_edge(objects: list[dict[str, Any]], values: dict[str, Any], config: dict[str, Any], pod: dict[str, Any],
               container: dict[str, Any], mqtt_svc: dict[str, Any] | None, where: str, problems: Problems) -> None:
    """TLS, WebSocket and PROXY protocol: listeners, ports, certificate files and options
    agree with the values."""
    tls_on = values.get("tls", {}).get("enabled", False)
    ws_on = values.get("websocket", {}).get("enabled", False)
    cports = values.get("containerPorts", {})
    proxy = values.get("proxyProtocol", {})
    mqtt_cfg = config.get("mqtt", {})
    want_ports = {"mqtt"} | ({"mqtts"} if tls_on else set()) | ({"ws"} if ws_on else set()) \
        | ({"wss"} if tls_on and ws_on else set())
    container_ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    problems.check(want_ports <= set(container_ports) and not ({"mqtts", "ws", "wss"} - want_ports) & set(container_ports),
                   where, f"container MQTT ports must be {sorted(want_ports)}, got {sorted(container_ports)}")
    if mqtt_svc is not None:
        svc_ports = {p["name"] for p in mqtt_svc["spec"]["ports"]}
        problems.check(svc_ports == want_ports, where, f"MQTT Service ports must be {sorted(want_ports)}, got {sorted(svc_ports)}")
    listeners = {"mqtt": mqtt_cfg.get("listen", ""), "mqtts": mqtt_cfg.get("tls", {}).get("listen", ""),
                 "ws": mqtt_cfg.get("ws", {}).get("listen", ""), "wss": mqtt_cfg.get("wss", {}).get("listen", "")}
    for name, listen in listeners.items():
        if name in want_ports:
            problems.check(listen == f"0.0.0.0:{cports.get(name)}", where,
                           f"{name} listener must be 0.0.0.0:{cports.get(name)}, got {listen!r}")
        else:
            problems.check(not listen, where, f"{name} listener must be off, got {listen!r}")
    sections = {"mqtt": mqtt_cfg, "mqtts": mqtt_cfg.get("tls", {}), "ws": mqtt_cfg.get("ws", {}),
                "wss": mqtt_cfg.get("wss", {})}
    for name in want_ports:
        problems.check(sections[name].get("proxy_protocol", False) == proxy.get(name, False), where,
                       f"proxy_protocol of {name} must be proxyProtocol.{name} = {proxy.get(name, False)}")
    # Every certificate file the node reads is in a mounted Secret.
    mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    tls_cfg = mqtt_cfg.get("tls", {})
    files = {k: tls_cfg[k] for k in ("cert_file", "key_file", "client_ca_file") if tls_cfg.get(k)}
    problems.check(not tls_on or {"cert_file", "key_file"} <= set(files), where, "tls.enabled must set cert_file and key_file")
    problems.check(bool(values.get("tls", {}).get("clientCaSecret")) == ("client_ca_file" in files) or not tls_on, where,
                   "client_ca_file must be set exactly when tls.clientCaSecret is")
    cm = values.get("tls", {}).get("certManager", {})
    fullname = by_kind(objects, "Deployment")[0]["metadata"]["name"]
    want_secret = f"{fullname}-tls" if cm.get("enabled") else values.get("tls", {}).get("existingSecret")
    for key, path in files.items():
        directory, name = str(Path(path).parent), Path(path).name
        vol = volumes.get(mounts.get(directory, ""), {}).get("secret")
        if vol is None:
            problems.add(where, f"mqtt.tls.{key} {path}: its directory is not a mounted Secret")
            continue
        problems.check(name in {i["path"] for i in vol.get("items", [])}, where, f"mqtt.tls.{key}: {name} not in its Secret volume")
        if key != "client_ca_file":
            problems.check(vol["secretName"] == want_secret, where,
                           f"mqtt.tls.{key} must come from Secret {want_secret}, got {vol['secretName']}")
    certs = by_kind(objects, "Certificate")
    problems.check(len(certs) == (1 if tls_on and cm.get("enabled") else 0), where,
                   f"expected a cert-manager Certificate exactly when tls.certManager.enabled, got {len(certs)}")
    for c in certs:
        problems.check(c["spec"]["secretName"] == want_secret, where, f"Certificate writes {c['spec']['secretName']}, "
                       f"the pod mounts {want_secret}")
        problems.check(c["spec"]["dnsNames"] == cm.get("dnsNames"), where, "Certificate dnsNames")
        problems.check(c["spec"]["issuerRef"]["name"] == cm.get("issuerRef", {}).get("name"), where, "Certificate issuer")


def check_values_documented(path: Path, problems: Problems) -> None:
    """Every value in values.yaml has a comment right above its key, or is inside a block
    whose key has a `# -- ` doc comment (as `resources:` does); a plain `#` section header
    does not document what is under it."""
    stack: list[tuple[int, bool]] = []  # (indent, documents its children) of enclosing keys
    comment: tuple[int, bool] | None = None  # (indent, starts with "# --") of the block above
    undocumented = 0
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            comment = None
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("#"):
            if comment is None or comment[0] != indent:
                comment = (indent, stripped.startswith("# --"))
            continue
        m = re.match(r"^(\s*)(- )?([A-Za-z0-9_.\-/]+):(\s.*|)$", line)
        if not m:
            comment = None
            continue
        key_indent = indent + (2 if m.group(2) else 0)
        while stack and stack[-1][0] >= key_indent:
            stack.pop()
        documented = comment is not None and comment[0] == indent
        value = m.group(4).strip()
        is_leaf = value != "" and not value.startswith("#")
        if is_leaf and not documented and not any(d for _, d in stack):
            problems.add(f"{path.relative_to(ROOT)}:{n}", f"value {m.group(3)!r} has no comment")
            undocumented += 1
        stack.append((key_indent, documented and comment is not None and comment[1]))
        comment = None
    print(f"  {path.relative_to(ROOT)}: every value documented" if not undocumented
          else f"  {path.relative_to(ROOT)}: {undocumented} undocumented value(s)", flush=True)

def check_chart(problems: Problems) -> None:
    check_values_documented(CHART / "values.yaml", problems)
    defaults = load_yaml(CHART / "values.yaml")
    production = load_yaml(CHART / "values-production.yaml")
    everything = {
        "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "externalNats": {"existingSecret": "backends", "existingSecretKey": "nats",
                         "auth": {"type": "creds", "existingSecret": "nats-user", "existingSecretKey": "user.creds"},
                         "tls": {"ca": {"existingSecret": "nats-ca", "key": "ca.crt"},
                                 "clientCertificate": {"existingSecret": "nats-client-tls"}}},
        "externalRedis": {"existingSecret": "backends", "existingSecretKey": "redis"},
        "adminToken": {"existingSecret": "backends", "existingSecretKey": "admin"},
        "service": {"mqtt": {"type": "NodePort", "nodePort": 31883}},
        "podAntiAffinity": "hard",
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule"}
        ],
        "podDisruptionBudget": {"minAvailable": 2},
        "extraEnv": [{"name": "LORABROKER_MQTT__MAX_CONNECTIONS", "value": "5000"}],
        "priorityClassName": "high",
        "imagePullSecrets": [{"name": "regcred"}],
        "podAnnotations": {"example.com/team": "iot"},
        "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LoRaWAN"}},
    }
    single = {
        "replicaCount": 1,
        "externalNats": {"url": ""},
        "externalRedis": {"url": ""},
        "service": {"mqtt": {"type": "ClusterIP"}},
        "podAntiAffinity": "",
        "serviceAccount": {"create": False},
        "config": {"tenancy": {"mode": "single", "default_tenant": "acme"}},
    }
    sentinel = {
        "externalRedis": {
            "mode": "sentinel", "username": "lorabroker",
            "passwordSecret": {"name": "redis-auth", "key": "password"},
            "tls": {"caSecret": {"name": "redis-ca"}, "clientCertSecret": {"name": "redis-client"}},
            "sentinel": {"masterName": "mymaster",
                         "urls": ["rediss://redis-node-0.redis-headless:26379",
                                  "rediss://redis-node-1.redis-headless:26379"],
                         "passwordSecret": {"name": "redis-auth", "key": "sentinel-password"}},
        },
    }
    redis_cluster = {
        "externalRedis": {
            "mode": "cluster", "passwordSecret": {"name": "redis-cluster", "key": "redis-password"},
            "cluster": {"urls": ["redis://redis-cluster-0.redis-cluster-headless:6379"]},
        },
    }
    secured_nats = {
        "externalNats": {"url": "tls://nats-0.nats:4222, tls://nats-1.nats:4222",
                         "auth": {"type": "password", "user": "lorabroker", "existingSecret": "nats-auth",
                                  "existingSecretKey": "password"},
                         "tls": {"required": True, "ca": {"existingConfigMap": "nats-ca", "key": "ca.pem"}}},
    }
    edge = {
        "tls": {"enabled": True, "existingSecret": "mqtt-example-com", "clientCaSecret": "device-ca"},
        "websocket": {"enabled": True},
        "proxyProtocol": {"mqtt": True, "mqtts": True, "ws": False, "wss": True},
        "config": {"mqtt": {"ws": {"allowed_origins": ["https://console.example.com"]}}},
        "service": {"mqtt": {"annotations": {
            "service.beta.kubernetes.io/aws-load-balancer-type": "external",
            "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"}}},
    }
    cert_manager = {
        "tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "letsencrypt"},
                                                 "dnsNames": ["mqtt.example.com"]}},
        "websocket": {"enabled": False},
    }
    scenarios: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = [
        ("default values", None, defaults),
        ("values-production.yaml", production, deep_merge(defaults, production)),
        ("all optional objects (HPA, ServiceMonitor, Secrets, NodePort, spread)", everything,
         deep_merge(defaults, everything)),
        ("single embedded node", single, deep_merge(defaults, single)),
        ("Redis Sentinel over TLS, passwords and certificates from Secrets", sentinel,
         deep_merge(defaults, sentinel)),
        ("Redis Cluster with a password from a Secret", redis_cluster, deep_merge(defaults, redis_cluster)),
        ("secured NATS (password from a Secret, CA from a ConfigMap, two seeds)", secured_nats,
         deep_merge(defaults, secured_nats)),
        ("TLS from a Secret, client CA, WebSocket, PROXY protocol", edge, deep_merge(defaults, edge)),
        ("TLS from cert-manager", cert_manager, deep_merge(defaults, cert_manager)),
    ]
    must_fail: list[tuple[str, dict[str, Any], str]] = [
        ("three nodes without NATS", {"externalNats": {"url": ""}}, "shared NATS"),
        ("autoscaled without Redis", {"replicaCount": 1, "autoscaling": {"enabled": True},
                                      "externalRedis": {"url": ""}}, "shared Redis"),
        ("drain window set in config", {"config": {"shutdown": {"grace_period": "5s"}}}, "config.shutdown"),
        ("admin token in the ConfigMap", {"config": {"http": {"admin_token": "x"}}}, "admin_token"),
        ("a margin shorter than the node's hard deadline", {"shutdown": {"terminationMarginSeconds": 5}},
         "terminationMarginSeconds"),
        ("unknown anti-affinity preset", {"podAntiAffinity": "sometimes"}, "podAntiAffinity"),
        ("TLS without a certificate", {"tls": {"enabled": True}}, "tls.existingSecret"),
        ("cert-manager without an issuer", {"tls": {"enabled": True, "certManager": {
            "enabled": True, "dnsNames": ["mqtt.example.com"]}}}, "issuerRef.name"),
        ("cert-manager without host names", {"tls": {"enabled": True, "certManager": {
            "enabled": True, "issuerRef": {"name": "le"}}}}, "dnsNames"),
        ("TLS files set in config", {"config": {"mqtt": {"tls": {"cert_file": "/x"}}}}, "config.mqtt.tls"),
        ("PROXY protocol set in config", {"config": {"mqtt": {"proxy_protocol": True}}}, "config.mqtt.proxy_protocol"),
        ("WebSocket listener set in config", {"config": {"mqtt": {"ws": {"listen": "0.0.0.0:1"}}}},
         "config.mqtt.ws.listen"),
        # values.schema.json
        ("a PROXY option that is not a boolean", {"proxyProtocol": {"mqtt": "yes"}}, "/proxyProtocol/mqtt"),
        ("a misspelled value", {"replicaCont": 3}, "replicaCont"),
        ("an unknown MQTT Service type", {"service": {"mqtt": {"type": "LoadBalancr"}}}, "/service/mqtt/type"),
        ("a NATS URL that is not one", {"externalNats": {"url": "http://nats:4222"}}, "/externalNats/url"),
        ("sentinel mode without sentinels", {"externalRedis": {"mode": "sentinel"}}, "sentinel.masterName"),
        ("cluster mode without seeds", {"externalRedis": {"mode": "cluster"}}, "cluster.urls"),
        ("an unknown Redis mode", {"externalRedis": {"mode": "replicated"}}, "/externalRedis/mode"),
        ("a Redis password file in the ConfigMap", {"config": {"redis": {"password_file": "/x"}}},
         "config.redis.password_file"),
        ("a NATS URL in the ConfigMap", {"config": {"nats": {"url": "nats://x:4222"}}}, "config.nats.url"),
        ("a NATS token file in the ConfigMap", {"config": {"nats": {"token_file": "/x"}}},
         "config.nats.token_file"),
        ("a second NATS URL that is not one", {"externalNats": {"url": "nats://a:4222,http://b"}},
         "/externalNats/url"),
        ("an unknown NATS auth type", {"externalNats": {"auth": {"type": "kerberos"}}}, "/externalNats/auth/type"),
        ("NATS auth without its Secret", {"externalNats": {"auth": {"type": "token"}}},
         "externalNats.auth.existingSecret"),
        ("NATS password without a user", {"externalNats": {"auth": {"type": "password", "existingSecret": "s",
                                                                     "existingSecretKey": "password"}}},
         "externalNats.auth.user"),
        ("a dashboard label that is not one", {"grafanaDashboard": {"label": "not a label"}},
         "/grafanaDashboard/label"),
    ]

    for version in KUBE_VERSIONS:
        for name, values, _ in scenarios:
            t = time.monotonic()
            report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{version}")
            for m in report.get("messages", []):
                if m.get("severity", 0) >= 2:
                    problems.add(f"helm lint ({name}, Kubernetes {version})", f"{m.get('path')}: {m.get('error')}")
            for e in report.get("errors", []):
                if not any(e == m.get("error") for m in report.get("messages", [])):
                    problems.add(f"helm lint ({name}, Kubernetes {version})", e)
            print(f"  helm lint, {name}, Kubernetes {version}: "
                  f"{len(report.get('messages', []))} message(s) ({time.monotonic() - t:.1f}s)", flush=True)

    with helm.Chart.load(CHART) as chart:
        for name, values, merged in scenarios:
            t = time.monotonic()
            try:
                objects = render(chart, values)
            except helm.HelmError as e:
                problems.add(f"render ({name})", str(e))
                continue
            validate_objects(objects, name, problems)
            check_promises(objects, merged, name, problems)
            kinds = ", ".join(sorted(f"{o['kind']}" for o in objects))
            print(f"  rendered and validated {name}: {len(objects)} objects [{kinds}] "
                  f"({time.monotonic() - t:.1f}s)", flush=True)
            want = {"ServiceMonitor"} if name.startswith("all optional") else set()
            if name.startswith("all optional"):
                want |= {"HorizontalPodAutoscaler", "PodDisruptionBudget"}
            check_dashboard_configmap(objects, merged, name, problems)
            missing = want - {o["kind"] for o in objects}
            problems.check(not missing, f"render ({name})", f"missing {sorted(missing)}")

        for name, values, expected in must_fail:
            try:
                render(chart, values)
            except helm.HelmError as e:
                problems.check(expected in str(e), f"refusal ({name})",
                               f"failed, but not with a message naming {expected!r}: {e}")
                print(f"  refused as it should: {name}", flush=True)
            else:
                problems.add(f"refusal ({name})", "rendered, but the chart must refuse these values")


# ---------------------------------------------------------------------------------------
# The Grafana dashboard (charts/lorabroker/dashboards/lorabroker.json)

# Sample-name suffixes of each metric type in the Prometheus/OpenMetrics exposition.
_SUFFIXES = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}


def exported_metrics() -> set[str]:
    """The sample names /metrics can show, read from src/metrics.rs: every
    `registry.register("name", "help", m.field.clone())` of the `lorabroker`-prefixed
    registry, with the suffix its field's type gets (`Family<_, Counter>` -> `_total`)."""
    text = METRICS_RS.read_text()
    prefix = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', text)
    types = dict(re.findall(r"pub (\w+): (?:Family<\w+, )?(Counter|Gauge|Histogram)\b", text))
    names: set[str] = set()
    for name, field in re.findall(r'register\(\s*"([a-z_]+)",\s*"[^"]*",\s*m\.(\w+)\.clone\(\)', text, re.S):
        for suffix in _SUFFIXES.get(types.get(field, ""), []):
            names.add(f"{prefix.group(1) if prefix else ''}_{name}{suffix}")
    return names


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and query variable."""
    queries: list[tuple[str, str]] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for p in items:
            for t in p.get("targets", []):
                queries.append((f"panel {p.get('title')!r} target {t.get('refId')}", t.get("expr", "")))
            panels(p.get("panels", []))

    panels(dashboard.get("panels", []))
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v.get("query")
            queries.append((f"variable {v.get('name')!r}", q.get("query", "") if isinstance(q, dict) else str(q)))
    return queries


def check_dashboard(problems: Problems) -> None:
    where = str(DASHBOARD.relative_to(ROOT))
    try:
        dashboard = json.loads(DASHBOARD.read_text())
    except (OSError, json.JSONDecodeError) as e:
        problems.add(where, f"not readable JSON: {e}")
        return
    for key in ("uid", "title", "panels", "templating", "schemaVersion"):
        problems.check(key in dashboard, where, f"no {key!r}")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    problems.check(variables.get("datasource", {}).get("type") == "datasource", where,
                   "needs a `datasource` variable of type datasource (no fixed data source UID)")
    ids: list[Any] = []
    panels = [p for p in dashboard.get("panels", [])]
    for p in panels:
        ids.append(p.get("id"))
        if p.get("type") == "row":
            continue
        name = f"{where}: panel {p.get('title')!r}"
        problems.check(bool(p.get("targets")), name, "has no query")
        problems.check(p.get("datasource", {}).get("uid") == "${datasource}", name,
                       "must query the ${datasource} variable")
        problems.check(all(k in p.get("gridPos", {}) for k in "hwxy"), name, "gridPos needs h, w, x, y")
    problems.check(len(ids) == len(set(ids)), where, f"panel ids are not unique: {ids}")

    exported = exported_metrics()
    problems.check(bool(exported), str(METRICS_RS.relative_to(ROOT)), "no registered metric found (the pattern changed?)")
    used: set[str] = set()
    before = len(problems.items)
    for what, query in dashboard_queries(dashboard):
        names = set(re.findall(r"\blorabroker_[a-z_]+\b", query))
        problems.check(bool(names), f"{where}: {what}", f"queries no lorabroker metric: {query!r}")
        for n in sorted(names - exported):
            problems.add(f"{where}: {what}", f"queries {n}, which the node does not export "
                         f"(src/metrics.rs registers {', '.join(sorted(exported))})")
        used |= names
    if len(problems.items) == before:
        print(f"  {where}: {len(panels)} panels, {len(used)} metrics, all exported by src/metrics.rs", flush=True)


def check_dashboard_configmap(objects: list[dict[str, Any]], values: dict[str, Any], scenario: str,
                              problems: Problems) -> None:
    """With grafanaDashboard.enabled, one ConfigMap carries the sidecar label and the
    dashboard exactly as in the chart's file; without it, none."""
    g = values.get("grafanaDashboard", {})
    label, value = g.get("label"), g.get("labelValue")
    maps = [cm for cm in by_kind(objects, "ConfigMap")
            if cm.get("metadata", {}).get("labels", {}).get(label) is not None]
    where = f"{scenario}: grafana dashboard"
    if not g.get("enabled"):
        problems.check(not maps, where, "rendered although grafanaDashboard.enabled is false")
        return
    if len(maps) != 1:
        problems.add(where, f"expected one ConfigMap labelled {label}, got {len(maps)}")
        return
    cm = maps[0]
    problems.check(cm["metadata"]["labels"][label] == value, where, f"label {label} is not {value!r}")
    body = cm.get("data", {}).get("lorabroker.json", "")
    try:
        problems.check(json.loads(body) == json.loads(DASHBOARD.read_text()), where,
                       "the ConfigMap's dashboard differs from dashboards/lorabroker.json")
    except json.JSONDecodeError as e:
        problems.add(where, f"the ConfigMap's lorabroker.json is not JSON: {e}")
    for k, v in g.get("annotations", {}).items():
        problems.check(cm["metadata"].get("annotations", {}).get(k) == v, where, f"annotation {k} missing")


# ---------------------------------------------------------------------------------------
# docker-compose.yml (what the Compose JSON schema cannot see)

_GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")


def check_compose(problems: Problems) -> None:
    where = str(COMPOSE.relative_to(ROOT))
    with COMPOSE.open() as f:
        doc = yaml.safe_load(f)  # resolves the x-lorabroker anchors and << merge keys
    known = known_config_keys()
    services: dict[str, Any] = doc.get("services", {})
    for name, svc in services.items():
        here = f"{where}: services.{name}"
        hc = svc.get("healthcheck", {})
        for field in ("interval", "timeout", "start_period"):
            if field in hc:
                problems.check(bool(_GO_DURATION.match(str(hc[field]))), here,
                               f"healthcheck.{field} {hc[field]!r} is not a duration like 5s")
        if "stop_grace_period" in svc:
            problems.check(bool(_GO_DURATION.match(str(svc["stop_grace_period"]))), here,
                           f"stop_grace_period {svc['stop_grace_period']!r} is not a duration like 35s")
        deps = svc.get("depends_on", {})
        for dep in deps if isinstance(deps, (list, dict)) else []:
            problems.check(dep in services, here, f"depends_on names unknown service {dep}")
            if isinstance(deps, dict) and deps[dep].get("condition") == "service_healthy" and dep in services:
                dhc = services[dep].get("healthcheck", {})
                image_has_one = services[dep].get("image", "").startswith("lorabroker")
                problems.check((bool(dhc) or image_has_one) and not dhc.get("disable"), here,
                               f"waits for {dep} to be healthy, but {dep} has no health check")
        env = svc.get("environment", {})
        names = env.keys() if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        for n in names:
            key = env_to_key(n)
            if key is not None:
                problems.check(key in known, here, f"env {n} maps to {key}, which the node does not know")
    nodes = [n for n, s in services.items() if str(s.get("command", ["serve"])[0]) == "serve"
             and str(s.get("image", "")).startswith("lorabroker")]
    problems.check(len(nodes) >= 3, where, f"expected three lorabroker nodes, found {nodes}")
    check_haproxy(services, nodes, problems)
    print(f"  {where}: {len(services)} services, nodes {', '.join(nodes)}", flush=True)


HAPROXY = ROOT / "config" / "haproxy.cfg"

# Node listener ports and the environment variables of their address and PROXY option.
_LISTENERS = {
    1883: ("LORABROKER_MQTT__LISTEN", "LORABROKER_MQTT__PROXY_PROTOCOL"),
    8883: ("LORABROKER_MQTT__TLS__LISTEN", "LORABROKER_MQTT__TLS__PROXY_PROTOCOL"),
    8083: ("LORABROKER_MQTT__WS__LISTEN", "LORABROKER_MQTT__WS__PROXY_PROTOCOL"),
    8084: ("LORABROKER_MQTT__WSS__LISTEN", "LORABROKER_MQTT__WSS__PROXY_PROTOCOL"),
}


def check_haproxy(services: dict[str, Any], nodes: list[str], problems: Problems) -> None:
    """haproxy.cfg routes each published port to a listener every node has, and sends a
    PROXY header exactly to the listeners that require one."""
    where = str(HAPROXY.relative_to(ROOT))
    backends: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    frontends: dict[str, str] = {}
    frontend: str | None = None
    for raw in HAPROXY.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        words = line.split()
        if not raw.startswith((" ", "\t")):
            current, frontend = None, None
            if words[0] == "backend":
                current = backends.setdefault(words[1], {"servers": [], "proxy": False})
            elif words[0] == "frontend":
                frontend = words[1]
            continue
        if frontend is not None and words[0] == "bind":
            frontends[frontend] = words[1]
        if frontend is not None and words[0] == "default_backend":
            frontends[frontend + "/backend"] = words[1]
        if current is not None and words[0] == "default-server":
            current["proxy"] = "send-proxy-v2" in words or "send-proxy" in words
        if current is not None and words[0] == "server":
            current["servers"].append((words[1], words[2], "send-proxy-v2" in words or "send-proxy" in words))
    published = set()
    for p in services.get("haproxy", {}).get("ports", []):
        published.add(int(str(p).rsplit(":", 1)[-1]))
    for name, bind in frontends.items():
        if name.endswith("/backend") or name == "stats":
            continue
        port = int(bind.rsplit(":", 1)[-1])
        problems.check(port in published, where, f"frontend {name} binds {port}, which compose does not publish")
        backend = backends.get(frontends.get(name + "/backend", ""))
        if backend is None:
            problems.add(where, f"frontend {name} has no backend")
            continue
        for server, target, proxy in backend["servers"]:
            host, tport = target.rsplit(":", 1)
            problems.check(host in nodes, where, f"server {server} targets {host}, not a lorabroker node")
            listen_env, proxy_env = _LISTENERS.get(int(tport), (None, None))
            if listen_env is None:
                problems.add(where, f"server {server} targets port {tport}, not a node listener")
                continue
            env = services.get(host, {}).get("environment", {})
            listens = int(tport) == 1883 or str(env.get(listen_env, "")).endswith(f":{tport}")
            problems.check(listens, where, f"{host} does not listen on {tport} ({listen_env})")
            sends = proxy or backend["proxy"]
            requires = str(env.get(proxy_env, "false")).lower() == "true"
            problems.check(sends == requires, where,
                           f"{server} on {tport}: haproxy {'sends' if sends else 'does not send'} a PROXY header "
                           f"but {host} has {proxy_env}={str(requires).lower()}")
    print(f"  {where}: {len(frontends) // 2} MQTT frontends, PROXY headers match the nodes", flush=True)


# ---------------------------------------------------------------------------------------
# Dockerfile and .dockerignore (no Docker engine here: parse with BuildKit's own parser,
# then check what the image promises and that the build context has what cargo needs)

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (relative, no leading ./): last match wins,
    `!` re-includes, a pattern also excludes everything below a matched directory."""
    from fnmatch import fnmatch

    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat[1:] if negate else pat
        pat = pat.strip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch(p, pat[3:]) or fnmatch(p, pat) for p in prefixes) or any(
                fnmatch(part, pat[3:]) for part in parts)
        else:
            hit = any(fnmatch(p, pat) for p in prefixes)
        if hit:
            result = not negate
    return result


def check_dockerfile(problems: Problems) -> None:
    import dockerfile  # BuildKit's parser (PyPI "dockerfile")

    where = "Dockerfile"
    try:
        commands = dockerfile.parse_file(str(DOCKERFILE))
    except dockerfile.GoParseError as e:
        problems.add(where, f"does not parse: {e}")
        return
    known = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
             "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
    for c in commands:
        problems.check(c.cmd in known, f"{where}:{c.start_line}", f"unknown instruction {c.original.split()[0]}")
    stages: list[list[Any]] = []
    for c in commands:
        if c.cmd == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(c)
    problems.check(len(stages) >= 2, where, "expected a multi-stage build (build, runtime)")
    if not stages:
        return
    build, final = stages[0], stages[-1]

    def last(stage: list[Any], cmd: str) -> Any:
        found = [c for c in stage if c.cmd == cmd]
        return found[-1] if found else None

    runs = " ".join(" ".join(c.value) for c in build if c.cmd == "RUN")
    problems.check("cargo build --release --locked" in runs, where, "the build stage must run cargo build --release --locked")
    copies = [c for c in build if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)]
    problems.check(any(c.value[0] == "." for c in copies), where,
                   "the build stage must copy the whole (filtered) context: Cargo.toml may declare targets anywhere")
    user = last(final, "USER")
    problems.check(user is not None and user.value[0].split(":")[0] not in ("root", "0"), where,
                   "the runtime stage must switch to a non-root USER")
    exposed = {p.split("/")[0] for c in final if c.cmd == "EXPOSE" for p in c.value}
    problems.check({"1883", "8883", "8083", "8084", "8080"} <= exposed, where,
                   f"EXPOSE 1883 8883 8083 8084 8080, got {sorted(exposed)}")
    entry, cmd = last(final, "ENTRYPOINT"), last(final, "CMD")
    problems.check(entry is not None and entry.json and list(entry.value) == ["lorabroker"], where,
                   'ENTRYPOINT ["lorabroker"] (exec form, so SIGTERM reaches the node and starts its drain)')
    problems.check(cmd is not None and list(cmd.value) == ["serve"], where, 'CMD ["serve"]')
    health = last(final, "HEALTHCHECK")
    problems.check(health is not None and any("/healthz" in v for v in health.value), where, "HEALTHCHECK on /healthz")
    if health is not None:
        tool = health.value[1] if len(health.value) > 1 and health.value[0] == "CMD" else None
        installs = " ".join(" ".join(c.value) for c in final if c.cmd == "RUN")
        problems.check(tool is None or tool in installs, where,
                       f"the HEALTHCHECK runs {tool}, which the runtime stage does not install")
    for c in final:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                problems.check((ROOT / src).exists(), where, f"COPY source {src} does not exist")

    # The build context: everything cargo reads must survive .dockerignore.
    patterns = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()
                if ln.strip() and not ln.strip().startswith("#")]
    with (ROOT / "Cargo.toml").open("rb") as f:
        manifest = tomllib.load(f)
    needed = {"Cargo.toml", "Cargo.lock", "src/main.rs", "src/lib.rs"}
    for src in [c.value[0] for c in final if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags)]:
        needed.add(src)
    for kind, default_dir in (("bin", "src/bin"), ("test", "tests"), ("bench", "benches"), ("example", "examples")):
        for target in manifest.get(kind, []):
            needed.add(target.get("path") or f"{default_dir}/{target['name']}.rs")
    lib = manifest.get("lib", {}).get("path")
    if lib:
        needed.add(lib)
    for d in ("src", "tests", "benches", "examples"):
        if (ROOT / d).is_dir():
            needed.update(str(p.relative_to(ROOT)) for p in (ROOT / d).rglob("*.rs"))
    for path in sorted(needed):
        problems.check(not ignored(path, patterns), ".dockerignore", f"excludes {path}, which the build needs")
    for path in ("target/release/lorabroker", ".git/HEAD"):
        problems.check(ignored(path, patterns), ".dockerignore", f"should exclude {path.split('/')[0]}/")
    print(f"  Dockerfile: {len(commands)} instructions in {len(stages)} stages; "
          f"{len(needed)} build inputs kept by .dockerignore", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["chart", "compose", "dockerfile", "dashboard"], help="run one part only")
    args = parser.parse_args()
    # Helm's own log records (e.g. the INFO line `fail` writes during lint) go through
    # Python logging; warnings and errors are shown, the rest is noise here.
    logging.basicConfig(level=logging.WARNING, format="  helm: %(levelname)s %(message)s")
    helm.enable_logging(logging.WARNING)
    problems = Problems()
    print(f"check_chart: helm-python-sdk {helm.__version__} (Helm {helm.helm_sdk_version()}), "
          f"kubernetes-validate {kubernetes_validate.version.__version__}, Kubernetes {', '.join(KUBE_VERSIONS)}",
          flush=True)
    parts: dict[str, Callable[[Problems], None]] = {
        "dockerfile": check_dockerfile,
        "compose": check_compose,
        "chart": check_chart,
        "dashboard": check_dashboard,
    }
    for name, part in parts.items():
        if args.only in (None, name):
            part(problems)
    if problems.items:
        print(f"check_chart: {len(problems.items)} problem(s):", file=sys.stderr)
        for p in problems.items:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("check_chart: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
