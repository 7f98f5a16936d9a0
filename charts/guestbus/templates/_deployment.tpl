{{/*
A service Deployment. (dict "ctx" $ "component" "rpc-router" "cfg" .Values.rpcRouter
  "env" <yaml list> "volumes" <yaml list> "mounts" <yaml list> "ports" <yaml list>
  "annotations" <yaml map>)
*/}}
{{- define "guestbus.deployment" -}}
{{- $ctx := .ctx -}}
{{- $cfg := .cfg -}}
{{- $sel := dict "ctx" $ctx "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "guestbus.componentName" $sel }}
  labels:
    {{- include "guestbus.componentLabels" $sel | nindent 4 }}
spec:
  replicas: {{ $cfg.replicas }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "guestbus.selectorLabels" $sel | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "guestbus.selectorLabels" $sel | nindent 8 }}
        app.kubernetes.io/part-of: guestbus
        {{- with $ctx.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        kubectl.kubernetes.io/default-container: {{ .component }}
        {{- with .annotations }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $ctx.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "guestbus.serviceAccountName" $ctx }}
      automountServiceAccountToken: false
      {{- with $ctx.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.podSecurityContext | nindent 8 }}
      {{- include "guestbus.waitForProvisioning" (dict "ctx" $ctx "role" .component "component" .component "securityContext" $ctx.Values.securityContext) | nindent 6 }}
      containers:
        - name: {{ .component }}
          image: {{ include "guestbus.image" $sel }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          ports:
            - {name: http, containerPort: 8080, protocol: TCP}
            {{- with .ports }}
            {{- . | nindent 12 }}
            {{- end }}
          env:
            {{- include "guestbus.natsEnv" (dict "ctx" $ctx "role" .component) | nindent 12 }}
            {{- include "guestbus.commonEnv" $ctx | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- range $name, $value := $cfg.env }}
            - name: {{ $name }}
              value: {{ $value | quote }}
            {{- end }}
          {{- include "guestbus.probes" $ctx | nindent 10 }}
          securityContext:
            {{- toYaml $ctx.Values.securityContext | nindent 12 }}
          resources:
            {{- toYaml $cfg.resources | nindent 12 }}
          volumeMounts:
            - {name: tmp, mountPath: /tmp}
            - {name: state, mountPath: /var/lib/guestbus}
            {{- include "guestbus.natsVolumeMounts" (dict "ctx" $ctx "role" .component) | nindent 12 }}
            {{- with .mounts }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        - name: state
          emptyDir: {}
        {{- include "guestbus.natsVolumes" (dict "ctx" $ctx "role" .component) | nindent 8 }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
      {{- with $cfg.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $cfg.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if $cfg.affinity }}
      affinity:
        {{- toYaml $cfg.affinity | nindent 8 }}
      {{- else }}
      affinity:
        podAntiAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              podAffinityTerm:
                topologyKey: kubernetes.io/hostname
                labelSelector:
                  matchLabels:
                    {{- include "guestbus.selectorLabels" $sel | nindent 20 }}
      {{- end }}
{{- end -}}
