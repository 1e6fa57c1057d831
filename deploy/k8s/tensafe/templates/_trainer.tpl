{{/* Env, mounts, volumes and init containers the trainer API and its workers share. */}}
{{- define "tensafe.trainerEnv" -}}
{{- $ctx := dict "root" . "apiKeyKey" .Values.secrets.serviceApiKeys.keys.trainer -}}
{{ include "tensafe.databaseEnv" (dict "root" . "urlKey" .Values.postgresql.urlKeys.trainer) }}
{{ include "tensafe.serviceAuthEnv" $ctx }}
- name: TENSAFE_BASE_MODELS_DIR
  value: /models
{{- if .Values.secrets.datasetKek.existingSecret }}
- name: TENSAFE_DATASET_KEK_FILE
  value: /var/run/tensafe/keys/dataset.kek
{{- end }}
{{- if .Values.publishing.enabled }}
- name: TENSAFE_REGISTRY_URL
  value: {{ printf "%s:%v" (include "tensafe.componentName" (dict "root" . "component" "registry")) .Values.grpcPort | quote }}
{{ include "tensafe.kekEnv" (dict "root" . "dirSetting" "TENSAFE_KEK_DIR") }}
{{- if .Values.secrets.trainerSigningKey.existingSecret }}
- name: TENSAFE_TRAINER_SIGNING_KEY_FILE
  value: /var/run/tensafe/keys/trainer-signing-key.pem
{{- end }}
{{- end }}
{{- with .Values.trainer.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tensafe.trainerHasKeys" -}}
{{- if or .Values.secrets.datasetKek.existingSecret (and .Values.publishing.enabled .Values.secrets.trainerSigningKey.existingSecret) -}}
true
{{- end -}}
{{- end -}}

{{- define "tensafe.trainerMounts" -}}
- name: data
  mountPath: /var/lib/tensafe
- name: models
  mountPath: /models
  readOnly: true
{{- if and .Values.publishing.enabled (eq .Values.kekProvider "local-file") }}
- name: keks
  mountPath: /var/lib/tensafe-keks
{{- end }}
{{- if include "tensafe.trainerHasKeys" . }}
- name: keys
  mountPath: /var/run/tensafe/keys
  readOnly: true
{{- end }}
{{- end -}}

{{- define "tensafe.trainerVolumes" -}}
{{ include "tensafe.dataVolume" (dict "claim" .Values.trainer.persistence.existingClaim) }}
{{- if .Values.trainer.baseModels.existingClaim }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.trainer.baseModels.existingClaim }}
    readOnly: true
{{- else }}
- name: models
  emptyDir: {}
{{- end }}
{{- if and .Values.publishing.enabled (eq .Values.kekProvider "local-file") }}
{{ include "tensafe.kekVolume" . }}
{{- end }}
{{- if include "tensafe.trainerHasKeys" . }}
- name: keys
  emptyDir:
    medium: Memory
    sizeLimit: 1Mi
{{- end }}
{{- with .Values.secrets.datasetKek }}
{{- if .existingSecret }}
- name: dataset-kek-secret
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0400
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- with .Values.secrets.trainerSigningKey }}
{{- if and $.Values.publishing.enabled .existingSecret }}
- name: trainer-signing-key-secret
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0400
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "tensafe.trainerInit" -}}
{{- if .Values.secrets.datasetKek.existingSecret }}
{{ include "tensafe.keyInitContainer" (dict "root" . "name" "dataset-kek" "key" .Values.secrets.datasetKek.key "file" "dataset.kek") }}
{{- end }}
{{- if and .Values.publishing.enabled .Values.secrets.trainerSigningKey.existingSecret }}
{{ include "tensafe.keyInitContainer" (dict "root" . "name" "trainer-signing-key" "key" .Values.secrets.trainerSigningKey.key "file" "trainer-signing-key.pem") }}
{{- end }}
{{- end -}}

{{/*
The KEK provider of the services that wrap or unwrap data keys (registry, trainer).
pkcs11: module path, token label and PIN from one Secret (secrets.pkcs11); the module
itself must be in the image. local-file (devMode only): a folder of plain key files.
*/}}
{{- define "tensafe.kekEnv" -}}
- name: TENSAFE_KEK_PROVIDER
  value: {{ .root.Values.kekProvider | quote }}
{{- if eq .root.Values.kekProvider "pkcs11" }}
{{- with .root.Values.secrets.pkcs11 }}
- name: TENSAFE_KEK_PKCS11_MODULE
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .keys.module }}
- name: TENSAFE_KEK_PKCS11_TOKEN_LABEL
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .keys.tokenLabel }}
- name: TENSAFE_KEK_PKCS11_PIN
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .keys.pin }}
{{- end }}
{{- else }}
- name: {{ .dirSetting }}
  value: /var/lib/tensafe-keks
{{- end }}
{{- end -}}

{{/* The local-file KEK folder shared by the registry and the trainer (devMode only). */}}
{{- define "tensafe.kekVolume" -}}
- name: keks
{{- if .Values.keks.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.keks.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* The pinned trust list of package signers (registry and HE runtime). */}}
{{- define "tensafe.trustListFile" -}}
{{- printf "/etc/tensafe/trust-list/%s" .Values.trustList.key -}}
{{- end -}}
{{- define "tensafe.trustListMount" -}}
- name: trust-list
  mountPath: /etc/tensafe/trust-list
  readOnly: true
{{- end -}}
{{- define "tensafe.trustListVolume" -}}
- name: trust-list
  configMap:
    name: {{ .Values.trustList.existingConfigMap }}
{{- end -}}
