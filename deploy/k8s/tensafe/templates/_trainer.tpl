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
- name: TENSAFE_KEK_DIR
  value: /var/lib/tensafe-keks
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
{{- if .Values.publishing.enabled }}
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
{{- if .Values.publishing.enabled }}
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

{{/* The KEK folder shared by the registry and the trainer. */}}
{{- define "tensafe.kekVolume" -}}
- name: keks
{{- if .Values.keks.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.keks.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}
