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

{{- /* The owner's DSN and the proxy role its migrations grant: the operator's and the migrations Job's env. */ -}}
{{- define "promptcache.databaseEnv" -}}
- name: PROMPTCACHE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.database.existingSecret }}
      key: {{ .Values.database.secretKey }}
- name: PROMPTCACHE_PROXY_ROLE
  value: {{ .Values.database.proxyRole | quote }}
{{- end -}}

{{- /* name/key of the Secret proxy pods and replay Jobs read in their namespace (a login in the proxy role). */ -}}
{{- define "promptcache.proxySecret" -}}
{{ .Values.database.proxySecret.name | default .Values.database.existingSecret }}/{{ .Values.database.proxySecret.key | default .Values.database.secretKey }}
{{- end -}}

{{- /* The Secrets the operator copies into model namespaces (database.proxySecret.copy): the proxies' DSN and, when
it is secret, the Redis URL. The owner's DSN is never among them. */ -}}
{{- define "promptcache.copiedSecrets" -}}
{{- if not .Values.database.proxySecret.name -}}
{{- fail "database.proxySecret.copy needs database.proxySecret.name: the operator never copies the owner's DSN (database.existingSecret)" -}}
{{- end -}}
{{- $names := list .Values.database.proxySecret.name -}}
{{- if and .Values.redis.existingSecret (ne .Values.redis.existingSecret .Values.database.proxySecret.name) -}}
{{- $names = append $names .Values.redis.existingSecret -}}
{{- end -}}
{{- toJson $names -}}
{{- end -}}

{{- /* RBAC for the copies (docs/design.md#secrets-in-model-namespaces): read and kept equal by name only; created
(a create cannot be limited to names). */ -}}
{{- define "promptcache.secretRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: {{ include "promptcache.copiedSecrets" . }}
  verbs: ["get", "update"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- end -}}

{{- /* RBAC for key-request Secrets (operator.keyRequests; docs/design.md#api-keys-from-secrets): kopf lists and
watches them (a label selector cannot narrow RBAC, so this reads every Secret of the served namespaces); the
operator patches in the key, its annotations and its finalizer. */ -}}
{{- define "promptcache.keyRequestRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch", "patch"]
{{- end -}}
