{{/* Names */}}
{{- define "guestbus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "guestbus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* <fullname>-<component>; call with (dict "ctx" $ "component" "rpc-router") */}}
{{- define "guestbus.componentName" -}}
{{- printf "%s-%s" (include "guestbus.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "guestbus.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "guestbus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: guestbus
{{- end -}}

{{/* (dict "ctx" $ "component" "rpc-router") */}}
{{- define "guestbus.componentLabels" -}}
{{ include "guestbus.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "guestbus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "guestbus.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "guestbus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "guestbus.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* image for a component: (dict "ctx" $ "component" "rpc-router") */}}
{{- define "guestbus.image" -}}
{{- $img := .ctx.Values.image -}}
{{- $repo := printf "%s%s" $img.repositoryPrefix .component -}}
{{- if $img.registry -}}{{- $repo = printf "%s/%s" (trimSuffix "/" $img.registry) $repo -}}{{- end -}}
{{- printf "%s:%s" $repo (default .ctx.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* The NATS URL the services use. */}}
{{- define "guestbus.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- $natsName := default (printf "%s-nats" .Release.Name) .Values.nats.fullnameOverride -}}
{{- printf "nats://%s:4222" $natsName -}}
{{- else -}}
{{- required "externalNats.url is required when nats.enabled is false" .Values.externalNats.url -}}
{{- end -}}
{{- end -}}

{{/* NATS connection environment for a role: (dict "ctx" $ "role" "rpc-router") */}}
{{- define "guestbus.natsEnv" -}}
{{- $v := .ctx.Values -}}
- name: GUESTBUS_NATS_URL
  value: {{ include "guestbus.natsUrl" .ctx | quote }}
- name: GUESTBUS_NATS_INBOX_PREFIX
  value: {{ printf "_INBOX.%s" .role | quote }}
{{- if $v.nats.enabled }}
- name: GUESTBUS_NATS_USER
  value: {{ .role | quote }}
- name: GUESTBUS_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $v.natsAuth.secretName }}
      key: {{ .role }}
{{- else if eq $v.externalNats.auth.type "password" }}
- name: GUESTBUS_NATS_USER
  value: {{ .role | quote }}
- name: GUESTBUS_NATS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "externalNats.auth.secretName is required" $v.externalNats.auth.secretName }}
      key: {{ .role }}
{{- else if eq $v.externalNats.auth.type "creds" }}
- name: GUESTBUS_NATS_CREDS
  value: {{ printf "/etc/guestbus/nats/%s.creds" .role | quote }}
{{- end }}
{{- if and (not $v.nats.enabled) $v.externalNats.tlsCaSecret }}
- name: GUESTBUS_NATS_TLS_CA
  value: /etc/guestbus/nats-ca/ca.crt
{{- end }}
{{- end -}}

{{/* Volumes for the NATS credentials (external NATS): (dict "ctx" $ "role" ...) */}}
{{- define "guestbus.natsVolumes" -}}
{{- $v := .ctx.Values -}}
{{- if and (not $v.nats.enabled) (eq $v.externalNats.auth.type "creds") }}
- name: nats-creds
  secret:
    secretName: {{ required "externalNats.auth.secretName is required" $v.externalNats.auth.secretName }}
    items:
      - key: {{ printf "%s.creds" .role }}
        path: {{ printf "%s.creds" .role }}
{{- end }}
{{- if and (not $v.nats.enabled) $v.externalNats.tlsCaSecret }}
- name: nats-ca
  secret:
    secretName: {{ $v.externalNats.tlsCaSecret }}
{{- end }}
{{- end -}}

{{- define "guestbus.natsVolumeMounts" -}}
{{- $v := .ctx.Values -}}
{{- if and (not $v.nats.enabled) (eq $v.externalNats.auth.type "creds") }}
- name: nats-creds
  mountPath: /etc/guestbus/nats
  readOnly: true
{{- end }}
{{- if and (not $v.nats.enabled) $v.externalNats.tlsCaSecret }}
- name: nats-ca
  mountPath: /etc/guestbus/nats-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* Environment every service gets. */}}
{{- define "guestbus.commonEnv" -}}
- name: GUESTBUS_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: GUESTBUS_JS_REPLICAS
  value: {{ .Values.jetstream.replicas | quote }}
- name: GUESTBUS_HTTP_PORT
  value: "8080"
- name: GUESTBUS_STATE_DIR
  value: /var/lib/guestbus
{{- end -}}

{{- define "guestbus.probes" -}}
{{- $p := .Values.probes -}}
startupProbe:
  httpGet: {path: /healthz, port: http}
  {{- toYaml $p.startup | nindent 2 }}
livenessProbe:
  httpGet: {path: /healthz, port: http}
  {{- toYaml $p.liveness | nindent 2 }}
readinessProbe:
  httpGet: {path: /readyz, port: http}
  {{- toYaml $p.readiness | nindent 2 }}
{{- end -}}

{{/* init container waiting for the role's JetStream resources: (dict "ctx" $ "role" ... "component" ...) */}}
{{- define "guestbus.waitForProvisioning" -}}
{{- if .ctx.Values.waitForProvisioning }}
initContainers:
  - name: wait-for-jetstream
    image: {{ include "guestbus.image" (dict "ctx" .ctx "component" .component) }}
    imagePullPolicy: {{ .ctx.Values.image.pullPolicy }}
    command: ["guestbus", "provision", "--check", {{ .role | quote }}, "--wait", "900"]
    env:
      {{- include "guestbus.natsEnv" (dict "ctx" .ctx "role" .role) | nindent 6 }}
    securityContext:
      {{- toYaml .securityContext | nindent 6 }}
    volumeMounts:
      - {name: tmp, mountPath: /tmp}
      {{- include "guestbus.natsVolumeMounts" . | nindent 6 }}
{{- end }}
{{- end -}}

{{- define "guestbus.caPassphraseSecret" -}}
{{- default (printf "%s-ca-passphrase" (include "guestbus.fullname" .)) .Values.certAuthority.passphrase.existingSecret -}}
{{- end -}}
