{{/*
Secured NATS (values: externalNats.auth, externalNats.tls): the Secrets (and the CA's
ConfigMap) are mounted as files under /etc/lorabroker-nats/, and the node is told their
paths with the nats.*_file settings, as LORABROKER_NATS__* variables. The node reads the
secrets from those files only; none of them is ever in an environment variable.
*/}}
{{- define "lorabroker.natsAuthFile" -}}
{{- printf "/etc/lorabroker-nats/auth/%s" .Values.externalNats.auth.existingSecretKey }}
{{- end }}

{{- define "lorabroker.natsHasCa" -}}
{{- with .Values.externalNats.tls.ca }}{{ if or .existingSecret .existingConfigMap }}true{{ end }}{{ end }}
{{- end }}

{{- define "lorabroker.natsEnv" -}}
{{- $auth := .Values.externalNats.auth }}
{{- $tls := .Values.externalNats.tls }}
{{- if $auth.type }}
{{- if not $auth.existingSecret }}
{{- fail "externalNats.auth.existingSecret: name the Secret holding the NATS password, token, NKey seed or .creds file (externalNats.auth.type is set)" }}
{{- end }}
{{- if not $auth.existingSecretKey }}
{{- fail "externalNats.auth.existingSecretKey: name the key of the NATS secret in externalNats.auth.existingSecret" }}
{{- end }}
{{- if eq $auth.type "password" }}
{{- if not $auth.user }}
{{- fail "externalNats.auth.user: the NATS user name is needed with externalNats.auth.type password" }}
{{- end }}
- name: LORABROKER_NATS__USER
  value: {{ $auth.user | quote }}
- name: LORABROKER_NATS__PASSWORD_FILE
  value: {{ include "lorabroker.natsAuthFile" . | quote }}
{{- else if eq $auth.type "token" }}
- name: LORABROKER_NATS__TOKEN_FILE
  value: {{ include "lorabroker.natsAuthFile" . | quote }}
{{- else if eq $auth.type "nkey" }}
- name: LORABROKER_NATS__NKEY_SEED_FILE
  value: {{ include "lorabroker.natsAuthFile" . | quote }}
{{- else if eq $auth.type "creds" }}
- name: LORABROKER_NATS__CREDS_FILE
  value: {{ include "lorabroker.natsAuthFile" . | quote }}
{{- else }}
{{- fail "externalNats.auth.type must be \"\", \"password\", \"token\", \"nkey\" or \"creds\"" }}
{{- end }}
{{- end }}
{{- if include "lorabroker.natsHasCa" . }}
- name: LORABROKER_NATS__TLS_CA_FILE
  value: {{ printf "/etc/lorabroker-nats/ca/%s" $tls.ca.key | quote }}
{{- end }}
{{- if $tls.clientCertificate.existingSecret }}
- name: LORABROKER_NATS__TLS_CERT_FILE
  value: "/etc/lorabroker-nats/client/tls.crt"
- name: LORABROKER_NATS__TLS_KEY_FILE
  value: "/etc/lorabroker-nats/client/tls.key"
{{- end }}
{{- if $tls.required }}
- name: LORABROKER_NATS__TLS_REQUIRED
  value: "true"
{{- end }}
{{- end }}

{{- define "lorabroker.natsVolumeMounts" -}}
{{- if .Values.externalNats.auth.type }}
- name: nats-auth
  mountPath: /etc/lorabroker-nats/auth
  readOnly: true
{{- end }}
{{- if include "lorabroker.natsHasCa" . }}
- name: nats-ca
  mountPath: /etc/lorabroker-nats/ca
  readOnly: true
{{- end }}
{{- if .Values.externalNats.tls.clientCertificate.existingSecret }}
- name: nats-client-tls
  mountPath: /etc/lorabroker-nats/client
  readOnly: true
{{- end }}
{{- end }}

{{/* Files readable by the pod's group (fsGroup) only: mode 0440. */}}
{{- define "lorabroker.natsVolumes" -}}
{{- with .Values.externalNats }}
{{- if .auth.type }}
- name: nats-auth
  secret:
    secretName: {{ .auth.existingSecret }}
    defaultMode: 288
    items:
      - key: {{ .auth.existingSecretKey | quote }}
        path: {{ .auth.existingSecretKey | quote }}
{{- end }}
{{- if .tls.ca.existingSecret }}
- name: nats-ca
  secret:
    secretName: {{ .tls.ca.existingSecret }}
    defaultMode: 288
    items:
      - key: {{ .tls.ca.key | quote }}
        path: {{ .tls.ca.key | quote }}
{{- else if .tls.ca.existingConfigMap }}
- name: nats-ca
  configMap:
    name: {{ .tls.ca.existingConfigMap }}
    defaultMode: 288
    items:
      - key: {{ .tls.ca.key | quote }}
        path: {{ .tls.ca.key | quote }}
{{- end }}
{{- if .tls.clientCertificate.existingSecret }}
- name: nats-client-tls
  secret:
    secretName: {{ .tls.clientCertificate.existingSecret }}
    defaultMode: 288
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- end }}
{{- end }}
