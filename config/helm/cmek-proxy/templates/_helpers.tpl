{{/* Names and labels shared by every template. */}}
{{- define "cmek-proxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cmek-proxy.fullname" -}}
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

{{- define "cmek-proxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cmek-proxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cmek-proxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "cmek-proxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "cmek-proxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cmek-proxy.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The proxy's configuration: the values' config with the chart's listeners. */}}
{{- define "cmek-proxy.config" -}}
{{- $listen := dict "listen" (dict "host" "127.0.0.1" "port" .Values.proxy.s3Port) -}}
{{- $admin := dict "admin" (dict "host" "0.0.0.0" "port" .Values.proxy.adminPort) -}}
{{- $cfg := mustMergeOverwrite (deepCopy .Values.proxy.config) $listen $admin -}}
{{- toYaml $cfg -}}
{{- end -}}
