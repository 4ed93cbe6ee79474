{{/* Names ------------------------------------------------------------------------------- */}}

{{- define "waardhaven-tasks.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" -}}
{{- end -}}

{{/* "<release>-<chart>", or the release name when it already contains the chart name. */}}
{{- define "waardhaven-tasks.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "waardhaven-tasks.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: `include "waardhaven-tasks.labels" (dict "ctx" $ "component" "worker")`. */}}
{{- define "waardhaven-tasks.selectorLabels" -}}
app.kubernetes.io/name: {{ include "waardhaven-tasks.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{- define "waardhaven-tasks.labels" -}}
helm.sh/chart: {{ include "waardhaven-tasks.chart" .ctx }}
{{ include "waardhaven-tasks.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: waardhaven-tasks
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "waardhaven-tasks.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "waardhaven-tasks.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The image: digest wins over tag; the tag defaults to the chart's appVersion. */}}
{{- define "waardhaven-tasks.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Redis ------------------------------------------------------------------------------- */}}

{{- define "waardhaven-tasks.redis.fullname" -}}
{{- printf "%s-redis" (include "waardhaven-tasks.fullname" .) -}}
{{- end -}}

{{/* Secret and key of the Redis password; empty name: no password (external Redis only). */}}
{{- define "waardhaven-tasks.redis.secretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (include "waardhaven-tasks.redis.fullname" .) .Values.redis.auth.existingSecret -}}
{{- else if .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecret -}}
{{- else if .Values.externalRedis.password -}}
{{- include "waardhaven-tasks.fullname" . -}}
{{- end -}}
{{- end -}}

{{- define "waardhaven-tasks.redis.secretKey" -}}
{{- if .Values.redis.enabled -}}
{{- ternary .Values.redis.auth.existingSecretPasswordKey "redis-password" (ne .Values.redis.auth.existingSecret "") -}}
{{- else if .Values.externalRedis.existingSecret -}}
{{- .Values.externalRedis.existingSecretPasswordKey -}}
{{- else -}}
REDIS_PASSWORD
{{- end -}}
{{- end -}}

{{- define "waardhaven-tasks.redis.host" -}}
{{- if .Values.redis.enabled -}}
{{- include "waardhaven-tasks.redis.fullname" . -}}
{{- else -}}
{{- .Values.externalRedis.host -}}
{{- end -}}
{{- end -}}

{{- define "waardhaven-tasks.redis.port" -}}
{{- ternary 6379 .Values.externalRedis.port .Values.redis.enabled -}}
{{- end -}}

{{/* REDIS_URL, composed by Kubernetes from $(REDIS_PASSWORD): the password stays in a Secret. */}}
{{- define "waardhaven-tasks.redis.url" -}}
{{- $scheme := ternary "rediss" "redis" (and (not .Values.redis.enabled) .Values.externalRedis.tls) -}}
{{- $auth := ternary ":$(REDIS_PASSWORD)@" "" (ne (include "waardhaven-tasks.redis.secretName" .) "") -}}
{{- $db := ternary 0 .Values.externalRedis.db .Values.redis.enabled -}}
{{- printf "%s://%s%s:%v/%v" $scheme $auth (include "waardhaven-tasks.redis.host" .) (include "waardhaven-tasks.redis.port" .) $db -}}
{{- end -}}

{{/* The chart's own Secret (DATABASE_URL, secretEnv, external Redis password): rendered? */}}
{{- define "waardhaven-tasks.secret.data" -}}
{{- if and .Values.database.url (not .Values.database.existingSecret) }}
DATABASE_URL: {{ .Values.database.url | b64enc | quote }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.password (not .Values.externalRedis.existingSecret) }}
REDIS_PASSWORD: {{ .Values.externalRedis.password | b64enc | quote }}
{{- end }}
{{- range $key, $value := .Values.secretEnv }}
{{ $key }}: {{ $value | b64enc | quote }}
{{- end }}
{{- end -}}

{{/* Containers ------------------------------------------------------------------------- */}}

{{/* env shared by every container of the chart. */}}
{{- define "waardhaven-tasks.env" -}}
- name: HEALTH_DIR
  value: /tmp/waardhaven-health
{{- $redisSecret := include "waardhaven-tasks.redis.secretName" . }}
{{- if $redisSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redisSecret }}
      key: {{ include "waardhaven-tasks.redis.secretKey" . }}
{{- end }}
- name: REDIS_URL
  value: {{ include "waardhaven-tasks.redis.url" . | quote }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "waardhaven-tasks.fullname" .) .Values.database.existingSecret }}
      key: {{ ternary .Values.database.existingSecretKey "DATABASE_URL" (ne .Values.database.existingSecret "") }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "waardhaven-tasks.envFrom" -}}
- configMapRef:
    name: {{ include "waardhaven-tasks.fullname" . }}-config
{{- if .Values.secretEnv }}
- secretRef:
    name: {{ include "waardhaven-tasks.fullname" . }}
{{- end }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod annotations: roll pods when the ConfigMap or the chart's Secret changes. */}}
{{- define "waardhaven-tasks.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include "waardhaven-tasks.secret.data" . | sha256sum }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod spec fields shared by every pod. */}}
{{- define "waardhaven-tasks.podCommon" -}}
serviceAccountName: {{ include "waardhaven-tasks.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "waardhaven-tasks.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
{{- end -}}

{{- define "waardhaven-tasks.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* Preferred anti-affinity: spread one component's pods over nodes. (dict "ctx" $ "component" c) */}}
{{- define "waardhaven-tasks.antiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "waardhaven-tasks.selectorLabels" . | nindent 12 }}
{{- end -}}

{{/* Workers ---------------------------------------------------------------------------- */}}

{{/*
A worker pool's settings: workerDefaults overridden by the entry, maps merged one level deep
(so `autoscaling: {enabled: false}` keeps the default min/max). Returns JSON: use fromJson.
(dict "ctx" $ "name" name "worker" entry)
*/}}
{{- define "waardhaven-tasks.worker" -}}
{{- $out := dict "name" .name "enabled" true -}}
{{- range $k, $v := .ctx.Values.workerDefaults -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- range $k, $v := .worker -}}
{{- if and (kindIs "map" $v) (kindIs "map" (get $out $k)) -}}
{{- $merged := dict -}}
{{- range $k2, $v2 := (get $out $k) }}{{ $_ := set $merged $k2 $v2 }}{{ end -}}
{{- range $k2, $v2 := $v }}{{ $_ := set $merged $k2 $v2 }}{{ end -}}
{{- $_ := set $out $k $merged -}}
{{- else -}}
{{- $_ := set $out $k $v -}}
{{- end -}}
{{- end -}}
{{- /* scaler: "keda" (ScaledObject on queue length), "hpa" (CPU) or "" (fixed replicas).
keda.enabled "auto" picks KEDA where the cluster serves its API (bench/scaling.py: queue
length drains a backlog sooner than CPU for the same pod-minutes), else the CPU HPA. */ -}}
{{- $keda := toString $out.keda.enabled -}}
{{- $kedaServed := .ctx.Capabilities.APIVersions.Has "keda.sh/v1alpha1" -}}
{{- $scaler := "" -}}
{{- if eq $keda "true" -}}
{{- $scaler = "keda" -}}
{{- else if and $out.autoscaling.enabled (eq $keda "auto") $kedaServed -}}
{{- $scaler = "keda" -}}
{{- else if $out.autoscaling.enabled -}}
{{- $scaler = "hpa" -}}
{{- end -}}
{{- $_ := set $out "scaler" $scaler -}}
{{- toJson $out -}}
{{- end -}}

{{/* Flower ----------------------------------------------------------------------------- */}}

{{- define "waardhaven-tasks.flower.secretName" -}}
{{- default (printf "%s-flower-auth" (include "waardhaven-tasks.fullname" .)) .Values.flower.auth.existingSecret -}}
{{- end -}}

{{- define "waardhaven-tasks.flower.path" -}}
{{- printf "/%s" .Values.flower.urlPrefix | trimSuffix "/" -}}
{{- end -}}
