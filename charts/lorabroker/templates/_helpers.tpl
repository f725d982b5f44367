{{/*
Names and labels.
*/}}
{{- define "lorabroker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorabroker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorabroker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lorabroker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lorabroker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lorabroker.labels" -}}
helm.sh/chart: {{ include "lorabroker.chart" . }}
{{ include "lorabroker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lorabroker
{{- end }}

{{- define "lorabroker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lorabroker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lorabroker.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
terminationGracePeriodSeconds, derived from the node's drain window so the two can't drift:
the preStop sleep runs first (it counts against the grace period), then SIGTERM starts a
drain of shutdown.gracePeriodSeconds that ends at the latest 5s later, then a margin.
*/}}
{{- define "lorabroker.terminationGracePeriodSeconds" -}}
{{- $s := .Values.shutdown }}
{{- if lt (int $s.terminationMarginSeconds) 6 }}
{{- fail "shutdown.terminationMarginSeconds must be at least 6: the node may take up to gracePeriodSeconds + 5s to exit" }}
{{- end }}
{{- add (int $s.preStopSleepSeconds) (int $s.gracePeriodSeconds) (int $s.terminationMarginSeconds) }}
{{- end }}

{{/*
Checks of values that would otherwise give a cluster that renders but can't work.
*/}}
{{- define "lorabroker.validate" -}}
{{- $clustered := or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) }}
{{- if and $clustered (not (or .Values.externalNats.url .Values.externalNats.existingSecret)) }}
{{- fail "more than one node needs a shared NATS: set externalNats.url or externalNats.existingSecret" }}
{{- end }}
{{- with .Values.externalRedis }}
{{- if and $clustered (eq .mode "standalone") (not (or .url .existingSecret)) }}
{{- fail "more than one node needs a shared Redis: set externalRedis.url or externalRedis.existingSecret (or a sentinel or cluster mode)" }}
{{- end }}
{{- if and (eq .mode "sentinel") (not (and .sentinel.masterName .sentinel.urls)) }}
{{- fail "externalRedis.mode sentinel needs externalRedis.sentinel.masterName and externalRedis.sentinel.urls" }}
{{- end }}
{{- if and (eq .mode "cluster") (not .cluster.urls) }}
{{- fail "externalRedis.mode cluster needs externalRedis.cluster.urls" }}
{{- end }}
{{- end }}
{{- if lt (int .Values.shutdown.gracePeriodSeconds) 1 }}
{{- fail "shutdown.gracePeriodSeconds must be at least 1" }}
{{- end }}
{{- range $key := list "node_name" "shutdown" }}
{{- if hasKey $.Values.config $key }}
{{- fail (printf "config.%s is set by the chart (see the comments above config in values.yaml); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- range $key := list "url" "user" "tls_required" "password_file" "token_file" "nkey_seed_file" "creds_file" "tls_ca_file" "tls_cert_file" "tls_key_file" }}
{{- if and (hasKey $.Values.config "nats") (hasKey $.Values.config.nats $key) }}
{{- fail (printf "config.nats.%s is set by the chart from externalNats (see values.yaml); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- range $key := list "mode" "username" "password_file" "tls_ca_file" "tls_cert_file" "tls_key_file" "sentinel_master" "sentinel_urls" "sentinel_username" "sentinel_password_file" "cluster_urls" }}
{{- if and (hasKey $.Values.config "redis") (hasKey $.Values.config.redis $key) }}
{{- fail (printf "config.redis.%s is set by the chart from externalRedis (see values.yaml); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- range $section, $key := dict "mqtt" "listen" "http" "listen" "redis" "url" }}
{{- if and (hasKey $.Values.config $section) (hasKey (index $.Values.config $section) $key) }}
{{- fail (printf "config.%s.%s is set by the chart (see the comments above config in values.yaml); remove it from config" $section $key) }}
{{- end }}
{{- end }}
{{- $mqttCfg := get .Values.config "mqtt" | default dict }}
{{- range $key := list "proxy_protocol" "tls" "wss" }}
{{- if hasKey $mqttCfg $key }}
{{- fail (printf "config.mqtt.%s is set by the chart from tls, websocket and proxyProtocol (see values.yaml); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- range $key := list "listen" "proxy_protocol" }}
{{- if hasKey (get $mqttCfg "ws" | default dict) $key }}
{{- fail (printf "config.mqtt.ws.%s is set by the chart from websocket and proxyProtocol (see values.yaml); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- if .Values.tls.certManager.enabled }}
{{- if not .Values.tls.certManager.issuerRef.name }}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name" }}
{{- end }}
{{- if not .Values.tls.certManager.dnsNames }}
{{- fail "tls.certManager.enabled needs tls.certManager.dnsNames (the host names clients connect to)" }}
{{- end }}
{{- else if not .Values.tls.existingSecret }}
{{- fail "tls.enabled needs a certificate: set tls.existingSecret (a kubernetes.io/tls Secret) or tls.certManager.enabled" }}
{{- end }}
{{- end }}
{{- if and (hasKey .Values.config "http") (hasKey .Values.config.http "admin_token") }}
{{- fail "config.http.admin_token must not be written into a ConfigMap: use adminToken.existingSecret" }}
{{- end }}
{{- end }}

{{/*
One TOML value. Helm reads values as JSON types; a JSON string, number or boolean is
also a valid TOML value (JSON string escapes are TOML basic-string escapes), as is an
array of them; a map becomes an inline table (the rates of [limits]).
*/}}
{{- define "lorabroker.tomlValue" -}}
{{- if kindIs "map" . }}
{{- /* An inline table, e.g. a rate: { burst = 500, per_second = 50 }. */}}
{{- $parts := list }}
{{- range $k, $v := . }}
{{- $parts = append $parts (printf "%s = %s" $k (include "lorabroker.tomlValue" $v)) }}
{{- end }}
{{- printf "{ %s }" (join ", " $parts) }}
{{- else if kindIs "invalid" . }}
{{- fail "lorabroker.toml: null values are not allowed; leave the key out to keep its default" }}
{{- else }}
{{- toJson . }}
{{- end }}
{{- end }}

{{/*
lorabroker.toml: .Values.config plus what the chart owns (listen addresses, drain window).
*/}}
{{- define "lorabroker.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- $mqtt := get $cfg "mqtt" | default dict }}
{{- $_ := set $mqtt "listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.mqtt)) }}
{{- $_ := set $mqtt "proxy_protocol" .Values.proxyProtocol.mqtt }}
{{- if .Values.tls.enabled }}
{{- $tls := dict "listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.mqtts)) "cert_file" "/etc/lorabroker-tls/tls.crt" "key_file" "/etc/lorabroker-tls/tls.key" "proxy_protocol" .Values.proxyProtocol.mqtts }}
{{- if .Values.tls.clientCaSecret }}
{{- $_ := set $tls "client_ca_file" "/etc/lorabroker-client-ca/ca.crt" }}
{{- end }}
{{- $_ := set $mqtt "tls" $tls }}
{{- end }}
{{- if .Values.websocket.enabled }}
{{- $ws := get $mqtt "ws" | default dict }}
{{- $_ := set $ws "listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.ws)) }}
{{- $_ := set $ws "proxy_protocol" .Values.proxyProtocol.ws }}
{{- $_ := set $mqtt "ws" $ws }}
{{- if .Values.tls.enabled }}
{{- $_ := set $mqtt "wss" (dict "listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.wss)) "proxy_protocol" .Values.proxyProtocol.wss) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "mqtt" $mqtt }}
{{- $http := get $cfg "http" | default dict }}
{{- $_ := set $http "listen" (printf "0.0.0.0:%d" (int .Values.containerPorts.http)) }}
{{- $_ := set $cfg "http" $http }}
{{- $_ := set $cfg "shutdown" (dict "grace_period" (printf "%ds" (int .Values.shutdown.gracePeriodSeconds))) }}
# lorabroker.toml rendered by the {{ include "lorabroker.chart" . }} chart from its values.
# Keys and defaults: config/lorabroker.toml in the lorabroker repository. NATS and Redis
# URLs and the admin token come from the environment (LORABROKER_NATS__URL,
# LORABROKER_REDIS__URL, LORABROKER_HTTP__ADMIN_TOKEN), the node name from the pod name.
{{- range $section, $keys := $cfg }}
{{- if not (kindIs "map" $keys) }}
{{- fail (printf "config.%s must be a section (a map of keys), as in lorabroker.toml" $section) }}
{{- end }}

[{{ $section }}]
{{- range $key, $value := $keys }}
{{ $key }} = {{ include "lorabroker.tomlValue" $value }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lorabroker.tenancyMode" -}}
{{- dig "tenancy" "mode" "multi" .Values.config }}
{{- end }}

{{/*
The Secrets mounted for Redis (a YAML list of name, secret, mountPath): the password,
the sentinels' password, the CA and the client certificate, each in a directory of its
own under /etc/lorabroker-redis/.
*/}}
{{- define "lorabroker.redisSecretVolumes" -}}
{{- $r := .Values.externalRedis }}
{{- $volumes := list }}
{{- with $r.passwordSecret.name }}
{{- $volumes = append $volumes (dict "name" "redis-password" "secret" . "mountPath" "/etc/lorabroker-redis/password") }}
{{- end }}
{{- if eq $r.mode "sentinel" }}
{{- with $r.sentinel.passwordSecret.name }}
{{- $volumes = append $volumes (dict "name" "redis-sentinel-password" "secret" . "mountPath" "/etc/lorabroker-redis/sentinel-password") }}
{{- end }}
{{- end }}
{{- with $r.tls.caSecret.name }}
{{- $volumes = append $volumes (dict "name" "redis-ca" "secret" . "mountPath" "/etc/lorabroker-redis/ca") }}
{{- end }}
{{- with $r.tls.clientCertSecret.name }}
{{- $volumes = append $volumes (dict "name" "redis-client-cert" "secret" . "mountPath" "/etc/lorabroker-redis/client") }}
{{- end }}
{{- toYaml $volumes }}
{{- end }}

{{/*
The Secret holding the TLS certificate: cert-manager's (named after the release) or the given one.
*/}}
{{- define "lorabroker.tlsSecretName" -}}
{{- if .Values.tls.certManager.enabled }}
{{- printf "%s-tls" (include "lorabroker.fullname" .) }}
{{- else }}
{{- .Values.tls.existingSecret }}
{{- end }}
{{- end }}
