{{/*
Render-time checks that values.schema.json cannot express (they depend on devMode or on
two values together). Each failure names the value to set.
*/}}
{{- define "tensafe.validate" -}}
{{- $v := .Values -}}
{{- if not $v.devMode }}
{{- $_ := required "postgresql.existingSecret is required: a Secret with each service's database URL" $v.postgresql.existingSecret -}}
{{- $_ := required "secrets.authKeyEncryption.existingSecret is required outside devMode" $v.secrets.authKeyEncryption.existingSecret -}}
{{- $_ := required "secrets.serviceApiKeys.existingSecret is required outside devMode" $v.secrets.serviceApiKeys.existingSecret -}}
{{- $_ := required "secrets.registrySigningKey.existingSecret is required outside devMode" $v.secrets.registrySigningKey.existingSecret -}}
{{- $_ := required "secrets.datasetKek.existingSecret is required outside devMode" $v.secrets.datasetKek.existingSecret -}}
{{- $_ := required "trainer.baseModels.existingClaim is required outside devMode: the base models the trainer serves" $v.trainer.baseModels.existingClaim -}}
{{- if $v.publishing.enabled }}
{{- $_ := required "secrets.trainerSigningKey.existingSecret is required with publishing.enabled outside devMode" $v.secrets.trainerSigningKey.existingSecret -}}
{{- if not (and $v.registry.trustedSigningKeys.existingConfigMap $v.registry.trustedSigningKeys.keys) }}
{{- fail "registry.trustedSigningKeys (existingConfigMap and keys) is required with publishing.enabled: the registry must trust the trainer's public key" -}}
{{- end }}
{{- end }}
{{- end }}
{{- if and (not $v.devMode) $v.heRuntime.adaptersFromRegistry (not $v.trustList.existingConfigMap) }}
{{- fail "trustList.existingConfigMap is required outside devMode: the HE runtime verifies packages against a pinned trust list of signers bound to tenants" -}}
{{- end }}
{{- if and (eq $v.kekProvider "local-file") (not $v.devMode) }}
{{- fail "kekProvider=local-file keeps KEKs in plain files and is accepted only with devMode; set kekProvider=pkcs11 and secrets.pkcs11" -}}
{{- end }}
{{- if eq $v.kekProvider "pkcs11" }}
{{- $_ := required "secrets.pkcs11.existingSecret is required with kekProvider=pkcs11: a Secret with the PKCS#11 module path, token label and PIN" $v.secrets.pkcs11.existingSecret -}}
{{- end }}
{{- if and $v.registry.actingServicePrincipals (not $v.registry.platformTenantId) }}
{{- fail "registry.platformTenantId is required with registry.actingServicePrincipals" -}}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.secretName) }}
{{- fail "tls.secretName is required with tls.enabled: a Secret with tls.crt, tls.key and ca.crt" -}}
{{- end }}
{{- if and (eq $v.otel.exporter "otlp") (not $v.otel.endpoint) }}
{{- fail "otel.endpoint is required when otel.exporter is otlp" -}}
{{- end }}
{{- if and (not $v.nats.existingSecret) (not $v.nats.url) }}
{{- fail "nats.url (or nats.existingSecret) is required: TenSafe needs an external NATS JetStream" -}}
{{- end }}
{{- if and (gt (int $v.trainerWorker.replicas) 0) (gt (int $v.trainer.replicas) 0) (not $v.trainer.persistence.existingClaim) (not $v.devMode) }}
{{- fail "trainer.persistence.existingClaim is required outside devMode: the trainer API and workers share checkpoints through a ReadWriteMany claim" -}}
{{- end }}
{{- /* Kubernetes does not overcommit extended resources: a GPU request without the same
limit is refused by the API server at apply time; failing here names the value. */ -}}
{{- $gpuRequest := index ($v.trainerWorker.resources.requests | default dict) "nvidia.com/gpu" -}}
{{- $gpuLimit := index ($v.trainerWorker.resources.limits | default dict) "nvidia.com/gpu" -}}
{{- if and (not (kindIs "invalid" $gpuRequest)) (ne (toString $gpuRequest) (toString $gpuLimit)) }}
{{- fail "trainerWorker.resources.limits.nvidia.com/gpu must equal trainerWorker.resources.requests.nvidia.com/gpu (Kubernetes does not overcommit GPUs; setting only the limit is enough)" -}}
{{- end }}
{{- if and (not $v.heRuntime.persistence.existingClaim) (not $v.devMode) }}
{{- fail "heRuntime.persistence.existingClaim is required outside devMode: HE sessions' Galois keys must outlive a pod" -}}
{{- end }}
{{- if and (not $v.registry.persistence.existingClaim) (not $v.devMode) }}
{{- fail "registry.persistence.existingClaim is required outside devMode: packages and envelope keys must outlive a pod" -}}
{{- end }}
{{- end -}}
