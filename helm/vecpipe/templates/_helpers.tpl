{{/* Names, labels and the pieces every stage shares. */}}

{{/* The stages: each is a Deployment with its Service, PDB and autoscaler. */}}
{{- define "vecpipe.stages" -}}
embed write
{{- end }}

{{- define "vecpipe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vecpipe.fullname" -}}
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

{{- define "vecpipe.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "vecpipe.labels" -}}
helm.sh/chart: {{ include "vecpipe.chart" . }}
{{ include "vecpipe.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vecpipe
{{- end }}

{{- define "vecpipe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vecpipe.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels of one stage; call with (dict "root" $ "stage" "embed"). */}}
{{- define "vecpipe.stageLabels" -}}
{{ include "vecpipe.labels" .root }}
app.kubernetes.io/component: {{ .stage }}
{{- end }}

{{- define "vecpipe.stageSelectorLabels" -}}
{{ include "vecpipe.selectorLabels" .root }}
app.kubernetes.io/component: {{ .stage }}
{{- end }}

{{/* Name of a stage's objects: <fullname>-<stage>. */}}
{{- define "vecpipe.stageName" -}}
{{- printf "%s-%s" (include "vecpipe.fullname" .root) .stage | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The image of a stage; the embed stage on GPUs takes the CUDA variant. */}}
{{- define "vecpipe.image" -}}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag }}
{{- if and (eq .stage "embed") .root.Values.embed.gpu.enabled }}
{{- $tag = printf "%s%s" $tag .root.Values.embed.gpu.imageTagSuffix }}
{{- end }}
{{- printf "%s:%s" .root.Values.image.repository $tag }}
{{- end }}

{{/* The workers' replicas may not exceed the topic's partitions: extra consumers idle. */}}
{{- define "vecpipe.maxReplicas" -}}
{{- $v := index .root.Values .stage }}
{{- min (int $v.autoscaling.maxReplicas) (int .root.Values.kafka.partitions) }}
{{- end }}

{{/* terminationGracePeriodSeconds: longer than the drain after SIGTERM. */}}
{{- define "vecpipe.terminationGrace" -}}
{{- add (int (ceil .Values.ops.shutdownGraceSeconds)) (int .Values.ops.terminationGraceMarginSeconds) }}
{{- end }}

{{/*
The non-secret settings as VECPIPE_* name: value, one per line (YAML). The ConfigMap holds them;
the migrate Job, a pre-install hook that runs before the ConfigMap exists, sets them inline.
*/}}
{{- define "vecpipe.config" -}}
{{- $v := .Values -}}
VECPIPE_KAFKA_BOOTSTRAP: {{ $v.kafka.bootstrap | quote }}
VECPIPE_TOPIC_CHUNKS: {{ $v.kafka.chunksTopic | quote }}
VECPIPE_TOPIC_EMBEDDINGS: {{ $v.kafka.embeddingsTopic | quote }}
VECPIPE_KAFKA_EMBED_GROUP: {{ $v.kafka.embedGroup | quote }}
VECPIPE_KAFKA_WRITE_GROUP: {{ $v.kafka.writeGroup | quote }}
VECPIPE_KAFKA_PARTITIONS: {{ $v.kafka.partitions | quote }}
VECPIPE_KAFKA_REPLICATION_FACTOR: {{ $v.kafka.replicationFactor | quote }}
{{- range $key, $value := $v.kafka.client }}
{{ printf "VECPIPE_KAFKA__%s" ($key | replace "." "_" | upper) }}: {{ $value | toString | quote }}
{{- end }}
VECPIPE_DB_SCHEMA: {{ $v.database.schema | quote }}
VECPIPE_DATABASE_POOL_MAX: {{ $v.database.poolMax | quote }}
VECPIPE_DATABASE_PROXY: {{ $v.database.proxy | quote }}
VECPIPE_DIMENSION: {{ $v.vector.dimension | quote }}
VECPIPE_METRIC: {{ $v.vector.metric | quote }}
VECPIPE_VECTOR_COLUMN_TYPE: {{ $v.vector.columnType | quote }}
VECPIPE_VECTOR_INDEX: {{ $v.vector.index | quote }}
VECPIPE_LOG_FORMAT: {{ $v.ops.logFormat | quote }}
VECPIPE_LOG_LEVEL: {{ $v.ops.logLevel | quote }}
VECPIPE_METRICS_PORT: {{ $v.ops.metricsPort | quote }}
VECPIPE_OPS_SHUTDOWN_GRACE_S: {{ $v.ops.shutdownGraceSeconds | quote }}
VECPIPE_HOME: "/tmp/vecpipe"
VECPIPE_MODEL_CACHE_DIR: "/var/cache/vecpipe/models"
{{- range $key, $value := $v.extraConfig }}
{{ $key }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* The secret settings, as container env entries that reference existing Secrets. */}}
{{- define "vecpipe.secretEnv" -}}
- name: VECPIPE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "database.existingSecret must name the Secret holding VECPIPE_DATABASE_URL" .Values.database.existingSecret | quote }}
      key: {{ .Values.database.urlKey | quote }}
{{- if .Values.database.directUrlKey }}
- name: VECPIPE_DATABASE_DIRECT_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret | quote }}
      key: {{ .Values.database.directUrlKey | quote }}
{{- end }}
{{- if .Values.database.searchUrlKey }}
- name: VECPIPE_SEARCH_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret | quote }}
      key: {{ .Values.database.searchUrlKey | quote }}
{{- end }}
{{- if .Values.kafka.sasl.enabled }}
- name: VECPIPE_KAFKA__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret must name the Secret holding the SASL credentials" .Values.kafka.sasl.existingSecret | quote }}
      key: {{ .Values.kafka.sasl.usernameKey | quote }}
- name: VECPIPE_KAFKA__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret | quote }}
      key: {{ .Values.kafka.sasl.passwordKey | quote }}
{{- end }}
{{- end }}

{{/* The writable paths of a read-only root filesystem. */}}
{{- define "vecpipe.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: model-cache
  mountPath: /var/cache/vecpipe
{{- end }}

{{- define "vecpipe.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.volumes.tmpSizeLimit }}
- name: model-cache
  emptyDir:
    sizeLimit: {{ .Values.volumes.modelCacheSizeLimit }}
{{- end }}

{{/* Reject values that would deploy something that cannot work. */}}
{{- define "vecpipe.validate" -}}
{{- if lt (int .Values.kafka.partitions) 1 }}
{{- fail "kafka.partitions must be at least 1" }}
{{- end }}
{{- range $key, $_ := .Values.extraConfig }}
{{- if not (hasPrefix "VECPIPE_" $key) }}
{{- fail (printf "extraConfig key %s is not a VECPIPE_* setting" $key) }}
{{- end }}
{{- end }}
{{- range $stage := splitList " " (include "vecpipe.stages" $) }}
{{- range $key, $_ := (index $.Values $stage).env }}
{{- if not (hasPrefix "VECPIPE_" $key) }}
{{- fail (printf "%s.env key %s is not a VECPIPE_* setting" $stage $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
