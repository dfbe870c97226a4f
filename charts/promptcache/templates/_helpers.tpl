{{- define "promptcache.name" -}}promptcache{{- end -}}

{{- define "promptcache.fullname" -}}
{{- if contains "promptcache" .Release.Name -}}{{ .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else -}}{{ printf "%s-promptcache" .Release.Name | trunc 52 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "promptcache.labels" -}}
app.kubernetes.io/name: promptcache
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "promptcache.selector" -}}
app.kubernetes.io/name: promptcache
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "promptcache.image" -}}
{{ required "image.repository is required: push the image built from the Dockerfile and set it (README: Installing in a cluster)" .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "promptcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}{{ default (include "promptcache.fullname" .) .Values.serviceAccount.name }}
{{- else -}}{{ default "default" .Values.serviceAccount.name }}{{- end -}}
{{- end -}}

{{- define "promptcache.databaseEnv" -}}
- name: PROMPTCACHE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
{{- end -}}
