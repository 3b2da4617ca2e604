{{/* The release's resource names. */}}
{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluice.labels" -}}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* kafka or embedded; anything else fails the render. */}}
{{- define "sluice.kafka" -}}
{{- if eq .Values.log.kind "kafka" -}}
{{- if not .Values.log.kafka.bootstrapServers -}}
{{- fail "log.kafka.bootstrapServers is required with log.kind = kafka" -}}
{{- end -}}
true
{{- else if ne .Values.log.kind "embedded" -}}
{{- fail (printf "log.kind is embedded or kafka, not %q" .Values.log.kind) -}}
{{- end -}}
{{- end -}}

{{/* A StatefulSet (one volume per gateway) for the embedded log, or Kafka with persistence. */}}
{{- define "sluice.stateful" -}}
{{- if or (not (include "sluice.kafka" .)) .Values.persistence.enabled -}}
true
{{- end -}}
{{- end -}}

{{- define "sluice.workload" -}}
{{- if include "sluice.stateful" . -}}StatefulSet{{- else -}}Deployment{{- end -}}
{{- end -}}
