{{/* Names, labels and the pieces every TenSafe workload shares. */}}

{{- define "tensafe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tensafe.fullname" -}}
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

{{/* Resource name of a component: <fullname>-<component>, within 63 characters. */}}
{{- define "tensafe.componentName" -}}
{{- printf "%s-%s" (include "tensafe.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tensafe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tensafe.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tensafe.labels" -}}
{{ include "tensafe.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "tensafe.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The trainer workers' image: the chart's image unless trainerWorker.image names a
variant (the CUDA build of the same version), so GPU workers need no second release. */}}
{{- define "tensafe.workerImage" -}}
{{- $worker := .Values.trainerWorker.image | default dict -}}
{{- if $worker.digest -}}
{{- printf "%s@%s" .Values.image.repository $worker.digest -}}
{{- else if $worker.tag -}}
{{- printf "%s:%s" .Values.image.repository $worker.tag -}}
{{- else -}}
{{- include "tensafe.image" . -}}
{{- end -}}
{{- end -}}

{{- define "tensafe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tensafe.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Pod-level security: non-root, the image's UID/GID, default seccomp profile. */}}
{{- define "tensafe.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Container-level security: read-only root, no privilege escalation, no capabilities. */}}
{{- define "tensafe.containerSecurityContext" -}}
runAsNonRoot: true
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
{{- end -}}

{{- define "tensafe.podSpecCommon" -}}
serviceAccountName: {{ include "tensafe.serviceAccountName" . }}
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ add (int .Values.shutdownGraceSeconds) 10 }}
securityContext:
  {{- include "tensafe.podSecurityContext" . | nindent 2 }}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
  {{- range . }}
  - name: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Settings every process takes (TENSAFE_* as in docs/operations.md). */}}
{{- define "tensafe.commonEnv" -}}
- name: TENSAFE_DEV_MODE
  value: {{ ternary "1" "0" .Values.devMode | quote }}
- name: TENSAFE_HOST
  value: "0.0.0.0"
- name: TENSAFE_PORT
  value: {{ .Values.grpcPort | quote }}
- name: TENSAFE_DATA_DIR
  value: /var/lib/tensafe
- name: TENSAFE_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: TENSAFE_LOG_FORMAT
  value: json
- name: TENSAFE_SHUTDOWN_GRACE_SECONDS
  value: {{ .Values.shutdownGraceSeconds | quote }}
- name: TENSAFE_OTEL_EXPORTER
  value: {{ .Values.otel.exporter | quote }}
- name: TENSAFE_OTEL_ENDPOINT
  value: {{ .Values.otel.endpoint | quote }}
{{- if .Values.nats.existingSecret }}
- name: TENSAFE_NATS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.nats.existingSecret }}
      key: {{ .Values.nats.urlKey }}
{{- else }}
- name: TENSAFE_NATS_URL
  value: {{ .Values.nats.url | quote }}
{{- end }}
{{- if .Values.tls.enabled }}
- name: TENSAFE_TLS_CERT_FILE
  value: /etc/tensafe/tls/tls.crt
- name: TENSAFE_TLS_KEY_FILE
  value: /etc/tensafe/tls/tls.key
- name: TENSAFE_TLS_CLIENT_CA_FILE
  value: /etc/tensafe/tls/ca.crt
- name: TENSAFE_TLS_CA_FILE
  value: /etc/tensafe/tls/ca.crt
{{- end }}
{{- end -}}

{{/* The TLS Secret, mounted read-only where commonEnv's TENSAFE_TLS_* point. */}}
{{- define "tensafe.tlsMount" -}}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/tensafe/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "tensafe.tlsVolume" -}}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* The database URL of a component, from the PostgreSQL secret. Args: root, urlKey. */}}
{{- define "tensafe.databaseEnv" -}}
- name: TENSAFE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.postgresql.existingSecret }}
      key: {{ .urlKey }}
{{- end -}}

{{/* A service account's API key and the auth address (every service but auth). */}}
{{- define "tensafe.serviceAuthEnv" -}}
- name: TENSAFE_AUTH_URL
  value: {{ printf "%s:%v" (include "tensafe.componentName" (dict "root" .root "component" "auth")) .root.Values.grpcPort | quote }}
{{- if .root.Values.secrets.serviceApiKeys.existingSecret }}
- name: TENSAFE_SERVICE_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.secrets.serviceApiKeys.existingSecret }}
      key: {{ .apiKeyKey }}
{{- end }}
{{- end -}}

{{/*
Native gRPC probes (grpc.health.v1) cannot speak TLS; with tls.enabled the probes are
tcpSocket probes rather than a second, plaintext port (docs/operations.md).
*/}}
{{- define "tensafe.probeCheck" -}}
{{- if .Values.tls.enabled }}
tcpSocket:
  port: {{ .Values.grpcPort }}
{{- else }}
grpc:
  port: {{ .Values.grpcPort }}
{{- end }}
{{- end -}}

{{- define "tensafe.grpcProbes" -}}
startupProbe:
  {{- include "tensafe.probeCheck" . | nindent 2 }}
  periodSeconds: 5
  failureThreshold: 60
livenessProbe:
  {{- include "tensafe.probeCheck" . | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
readinessProbe:
  {{- include "tensafe.probeCheck" . | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
{{- end -}}

{{/*
A gRPC service: Deployment + ClusterIP Service. Args (dict):
  root, component (resource suffix), module (python -m target), values (the component's
  values), env (extra env, YAML list string), volumeMounts / volumes / initContainers
  (YAML list strings).
*/}}
{{- define "tensafe.grpcService" -}}
{{- $root := .root -}}
{{- $ctx := dict "root" $root "component" .component -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tensafe.componentName" $ctx }}
  labels:
    {{- include "tensafe.labels" $ctx | nindent 4 }}
spec:
  replicas: {{ .values.replicas }}
  selector:
    matchLabels:
      {{- include "tensafe.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tensafe.labels" $ctx | nindent 8 }}
      {{- with .values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      {{- include "tensafe.podSpecCommon" $root | nindent 6 }}
      {{- include "tensafe.scheduling" .values | nindent 6 }}
      {{- with .initContainers }}
      initContainers:
        {{- . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "tensafe.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args: [{{ .module | quote }}]
          ports:
            - name: grpc
              containerPort: {{ $root.Values.grpcPort }}
              protocol: TCP
            {{- include "tensafe.metricsPort" $root | nindent 12 }}
          env:
            {{- include "tensafe.commonEnv" $root | nindent 12 }}
            {{- include "tensafe.metricsEnv" $root | nindent 12 }}
            {{- with .env }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with .values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "tensafe.grpcProbes" $root | nindent 10 }}
          resources:
            {{- toYaml .values.resources | nindent 12 }}
          securityContext:
            {{- include "tensafe.containerSecurityContext" $root | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- with .volumeMounts }}
            {{- . | nindent 12 }}
            {{- end }}
            {{- with (include "tensafe.tlsMount" $root) }}
            {{- . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: {{ $root.Values.tmpSizeLimit }}
        {{- with .volumes }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with (include "tensafe.tlsVolume" $root) }}
        {{- . | nindent 8 }}
        {{- end }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ include "tensafe.componentName" $ctx }}
  labels:
    {{- include "tensafe.labels" $ctx | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "tensafe.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $root.Values.grpcPort }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    {{- if $root.Values.metrics.enabled }}
    - name: metrics
      port: {{ $root.Values.metrics.port }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- end -}}

{{/* The data volume of a component: its claim when given, else an emptyDir. */}}
{{- define "tensafe.dataVolume" -}}
- name: data
{{- if .claim }}
  persistentVolumeClaim:
    claimName: {{ .claim }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/*
Secret files the services require to be private to their user (mode 0600, no group or
other bits): a Secret volume is root-owned and group-readable through fsGroup, so an
init container copies the file into a memory-backed emptyDir owned by the pod's user.
Args: root, name (volume prefix), secret, key, file (name under /var/run/tensafe/keys).
*/}}
{{- define "tensafe.keyInitContainer" -}}
- name: install-{{ .name }}
  image: {{ include "tensafe.image" .root }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  command: ["install", "-m", "0600", "/var/run/tensafe/{{ .name }}-secret/{{ .key }}", "/var/run/tensafe/keys/{{ .file }}"]
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 32Mi}
  securityContext:
    {{- include "tensafe.containerSecurityContext" .root | nindent 4 }}
  volumeMounts:
    - name: {{ .name }}-secret
      mountPath: /var/run/tensafe/{{ .name }}-secret
      readOnly: true
    - name: keys
      mountPath: /var/run/tensafe/keys
{{- end -}}

{{/* nodeSelector, tolerations and affinity of a component's pods. Arg: its values. */}}
{{- define "tensafe.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The /metrics container port and setting (metrics.enabled). Arg: root. */}}
{{- define "tensafe.metricsPort" -}}
{{- if .Values.metrics.enabled }}
- name: metrics
  containerPort: {{ .Values.metrics.port }}
  protocol: TCP
{{- end }}
{{- end -}}

{{- define "tensafe.metricsEnv" -}}
{{- if .Values.metrics.enabled }}
- name: TENSAFE_METRICS_PORT
  value: {{ .Values.metrics.port | quote }}
{{- end }}
{{- end -}}

{{/* Components with pods, in the order their objects are rendered. */}}
{{- define "tensafe.components" -}}
auth trainer trainer-worker registry he-runtime
{{- end -}}
