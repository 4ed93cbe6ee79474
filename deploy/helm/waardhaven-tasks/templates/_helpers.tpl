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

{{/* The full DNS name, for callers from other namespaces (KEDA's operator). */}}
{{- define "waardhaven-tasks.redis.address" -}}
{{- if .Values.redis.enabled -}}
{{- printf "%s.%s.svc.%s:6379" (include "waardhaven-tasks.redis.fullname" .) .Release.Namespace .Values.clusterDomain -}}
{{- else -}}
{{- printf "%s:%v" .Values.externalRedis.host .Values.externalRedis.port -}}
{{- end -}}
{{- end -}}

{{/* The in-chart Redis password ("" with an existing Secret or an external Redis). */}}
{{- define "waardhaven-tasks.redis.password" -}}
{{- if and .Values.redis.enabled (not .Values.redis.auth.existingSecret) -}}
{{- include "waardhaven-tasks.credential" (dict "ctx" . "secret" (include "waardhaven-tasks.redis.fullname" .) "key" "redis-password" "given" .Values.redis.auth.password "length" 32 "values" "redis.auth.password or redis.auth.existingSecret") -}}
{{- end -}}
{{- end -}}

{{/* A Redis probe command: healthy only when the reply is PONG (or matches the given extra
shell pattern, e.g. "LOADING*"); the reply is printed for the pod's events otherwise. */}}
{{- define "waardhaven-tasks.redis.probe" -}}
{{- $ok := ternary "PONG" (printf "PONG|%s" .) (eq . "") -}}
{{- list "sh" "-c" (printf "reply=\"$(redis-cli ping 2>&1)\"; case \"$reply\" in %s) exit 0 ;; esac; echo \"$reply\"; exit 1" $ok) | toJson -}}
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

{{/* Credentials ------------------------------------------------------------------------ */}}

{{/*
A generated credential, never silently replaced: the given value; else the one the Secret
already holds (lookup, so an upgrade keeps it); else, at install, a new random one. An upgrade
that cannot read it back (no cluster access, or the Secret is gone) fails and names the values
to set, as Bitnami's common.secrets.passwords.manage does. Cached per render in .Values, so
the Secret and every checksum of one render see the same value.
(dict "ctx" $ "secret" name "key" key "given" value "length" n "values" "what to set")
*/}}
{{- define "waardhaven-tasks.credential" -}}
{{- if not (hasKey .ctx.Values "__credentials") -}}
{{- $_ := set .ctx.Values "__credentials" dict -}}
{{- end -}}
{{- $cache := get .ctx.Values "__credentials" -}}
{{- $id := printf "%s/%s" .secret .key -}}
{{- if not (hasKey $cache $id) -}}
{{- $value := .given -}}
{{- if not $value -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace .secret -}}
{{- if and $existing $existing.data (hasKey $existing.data .key) -}}
{{- $value = index $existing.data .key | b64dec -}}
{{- else if .ctx.Release.IsUpgrade -}}
{{- fail (printf "upgrade: the generated %s of Secret %s cannot be read back (no cluster access, e.g. helm template, or the Secret is gone); set %s to keep the current one instead of generating a new one" .key .secret .values) -}}
{{- else -}}
{{- $value = randAlphaNum (int .length) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cache $id $value -}}
{{- end -}}
{{- get $cache $id -}}
{{- end -}}

{{/* The in-chart evaluation PostgreSQL runs when no database is given. */}}
{{- define "waardhaven-tasks.postgresql.enabled" -}}
{{- if not (or .Values.database.url .Values.database.existingSecret) -}}true{{- end -}}
{{- end -}}

{{- define "waardhaven-tasks.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "waardhaven-tasks.fullname" .) -}}
{{- end -}}

{{- define "waardhaven-tasks.postgresql.secretName" -}}
{{- default (include "waardhaven-tasks.postgresql.fullname" .) .Values.postgresql.auth.existingSecret -}}
{{- end -}}

{{- define "waardhaven-tasks.postgresql.secretKey" -}}
{{- ternary .Values.postgresql.auth.existingSecretPasswordKey "postgres-password" (ne .Values.postgresql.auth.existingSecret "") -}}
{{- end -}}

{{- define "waardhaven-tasks.postgresql.password" -}}
{{- if and (include "waardhaven-tasks.postgresql.enabled" .) (not .Values.postgresql.auth.existingSecret) -}}
{{- include "waardhaven-tasks.credential" (dict "ctx" . "secret" (include "waardhaven-tasks.postgresql.fullname" .) "key" "postgres-password" "given" .Values.postgresql.auth.password "length" 32 "values" "postgresql.auth.password or postgresql.auth.existingSecret") -}}
{{- end -}}
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
{{- if include "waardhaven-tasks.redis.sentinelMode" . }}
{{ include "waardhaven-tasks.redis.sentinelEnv" . }}
{{- else }}
- name: REDIS_URL
  value: {{ include "waardhaven-tasks.redis.url" . | quote }}
{{- end }}
{{- if include "waardhaven-tasks.postgresql.enabled" . }}
- name: DATABASE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "waardhaven-tasks.postgresql.secretName" . }}
      key: {{ include "waardhaven-tasks.postgresql.secretKey" . }}
- name: DATABASE_URL
  value: {{ printf "postgresql+psycopg2://%s:$(DATABASE_PASSWORD)@%s:5432/%s" .Values.postgresql.auth.username (include "waardhaven-tasks.postgresql.fullname" .) .Values.postgresql.auth.database | quote }}
{{- else }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ default (include "waardhaven-tasks.fullname" .) .Values.database.existingSecret }}
      key: {{ ternary .Values.database.existingSecretKey "DATABASE_URL" (ne .Values.database.existingSecret "") }}
{{- end }}
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

{{/* Pod annotations: roll pods when the ConfigMap, the chart's Secret or a generated or given
credential they use (Redis, PostgreSQL) changes. Existing Secrets are the user's to roll. */}}
{{- define "waardhaven-tasks.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include "waardhaven-tasks.secret.data" . | sha256sum }}
checksum/credentials: {{ printf "%s/%s/%s" (include "waardhaven-tasks.redis.password" .) (include "waardhaven-tasks.postgresql.password" .) (include "waardhaven-tasks.redis.sentinelPassword" .) | sha256sum }}
{{- include "waardhaven-tasks.extraPodAnnotations" . }}
{{- end -}}

{{/* commonAnnotations and podAnnotations: on every pod the chart makes. */}}
{{- define "waardhaven-tasks.extraPodAnnotations" -}}
{{- with .Values.commonAnnotations }}
{{ toYaml . }}
{{- end }}
{{- with .Values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Prometheus Operator monitors rendered? Then pods get no prometheus.io/* annotations
(a Prometheus that reads both would scrape twice). */}}
{{- define "waardhaven-tasks.monitors" -}}
{{- if and .Values.serviceMonitor.enabled (or .Values.serviceMonitor.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) -}}true{{- end -}}
{{- end -}}

{{/* Pod spec fields shared by every pod. */}}
{{- define "waardhaven-tasks.podCommon" -}}
serviceAccountName: {{ include "waardhaven-tasks.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
enableServiceLinks: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with concat .Values.imagePullSecrets ((.Values.global).imagePullSecrets | default list) | uniq }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Scheduling fields of a pod from a component's values: (dict "v" values "affinity" default) */}}
{{- define "waardhaven-tasks.scheduling" -}}
{{- with .v.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- if .v.affinity }}
affinity:
  {{- toYaml .v.affinity | nindent 2 }}
{{- else if .affinity }}
affinity:
  {{- .affinity | nindent 2 }}
{{- end }}
{{- with .v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .v.topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The wait-for-migrations init container (workers, beat): new code never starts on the old
schema. The migrate Job of the same revision brings the schema to head. */}}
{{- define "waardhaven-tasks.waitForMigrations" -}}
{{- if and .Values.database.migrate.enabled .Values.database.migrate.waitForMigrations }}
- name: wait-for-migrations
  image: {{ include "waardhaven-tasks.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: [waardhaven-tasks, wait-for-migrations, --timeout, {{ .Values.database.migrate.waitTimeout | quote }}]
  env:
    {{- include "waardhaven-tasks.env" . | nindent 4 }}
  envFrom:
    {{- include "waardhaven-tasks.envFrom" . | nindent 4 }}
  resources:
    {{- toYaml .Values.database.migrate.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    {{- include "waardhaven-tasks.tmpMount" . | nindent 4 }}
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
{{- if $out.autoscaling.enabled -}}
{{- $scaler = "hpa" -}}
{{- if or (eq $keda "true") (and (eq $keda "auto") $kedaServed) -}}
{{- $scaler = "keda" -}}
{{- end -}}
{{- end -}}
{{- $_ := set $out "scaler" $scaler -}}
{{- toJson $out -}}
{{- end -}}

{{/* Flower ----------------------------------------------------------------------------- */}}

{{- define "waardhaven-tasks.flower.secretName" -}}
{{- default (printf "%s-flower-auth" (include "waardhaven-tasks.fullname" .)) .Values.flower.auth.existingSecret -}}
{{- end -}}

{{- define "waardhaven-tasks.flower.password" -}}
{{- include "waardhaven-tasks.credential" (dict "ctx" . "secret" (printf "%s-flower-auth" (include "waardhaven-tasks.fullname" .)) "key" "password" "given" .Values.flower.auth.password "length" 24 "values" "flower.auth.password (and flower.auth.htpasswd) or flower.auth.existingSecret") -}}
{{- end -}}

{{- define "waardhaven-tasks.flower.path" -}}
{{- printf "/%s" .Values.flower.urlPrefix | trimSuffix "/" -}}
{{- end -}}

{{/* Signed task messages ----------------------------------------------------------------- */}}

{{- define "waardhaven-tasks.signing.secretName" -}}
{{- default (printf "%s-signing" (include "waardhaven-tasks.fullname" .)) .Values.signing.existingSecret -}}
{{- end -}}

{{/*
The generated RSA key and self-signed certificate (JSON {key, cert}), like
waardhaven-tasks.credential: the pair the Secret already holds (lookup), else at install a new
one; an upgrade that cannot read it back fails. Cached per render. "" with existingSecret.
*/}}
{{- define "waardhaven-tasks.signing.pair" -}}
{{- if and .Values.signing.enabled (not .Values.signing.existingSecret) -}}
{{- if not (hasKey .Values "__credentials") -}}
{{- $_ := set .Values "__credentials" dict -}}
{{- end -}}
{{- $cache := get .Values "__credentials" -}}
{{- $name := include "waardhaven-tasks.signing.secretName" . -}}
{{- if not (hasKey $cache $name) -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name -}}
{{- $data := ($existing).data | default dict -}}
{{- if and (hasKey $data "signing.key") (hasKey $data "signing.crt") -}}
{{- $_ := set $cache $name (dict "key" (index $data "signing.key" | b64dec) "cert" (index $data "signing.crt" | b64dec)) -}}
{{- else if .Release.IsUpgrade -}}
{{- fail (printf "upgrade: the generated signing key of Secret %s cannot be read back (no cluster access, e.g. helm template, or the Secret is gone); set signing.existingSecret to keep signing with a known key" $name) -}}
{{- else -}}
{{- $key := genPrivateKey "rsa" -}}
{{- $cert := genSelfSignedCertWithKey (include "waardhaven-tasks.fullname" .) nil nil (int .Values.signing.validityDays) $key -}}
{{- $_ := set $cache $name (dict "key" $cert.Key "cert" $cert.Cert) -}}
{{- end -}}
{{- end -}}
{{- get $cache $name | toJson -}}
{{- end -}}
{{- end -}}

{{/* env of a container that sends or runs tasks (workers, beat, Flower, API, helm test). */}}
{{- define "waardhaven-tasks.signing.env" -}}
{{- if .Values.signing.enabled }}
- name: TASK_SIGNING
  value: "true"
- name: TASK_SIGNING_KEY
  value: /etc/waardhaven-tasks/signing/signing.key
- name: TASK_SIGNING_CERT
  value: /etc/waardhaven-tasks/signing/signing.crt
# Only certificates in here: the signers whose messages workers accept.
- name: TASK_SIGNING_CERT_STORE
  value: /etc/waardhaven-tasks/signing-certs
{{- end }}
{{- end -}}

{{- define "waardhaven-tasks.signing.volumeMounts" -}}
{{- if .Values.signing.enabled }}
- name: signing
  mountPath: /etc/waardhaven-tasks/signing
  readOnly: true
- name: signing-certs
  mountPath: /etc/waardhaven-tasks/signing-certs
  readOnly: true
{{- end }}
{{- end -}}

{{/* Whole-directory mounts (no subPath): the kubelet updates them in place. */}}
{{- define "waardhaven-tasks.signing.volumes" -}}
{{- if .Values.signing.enabled }}
- name: signing
  secret:
    secretName: {{ include "waardhaven-tasks.signing.secretName" . }}
    defaultMode: 0440
    items:
      - key: signing.key
        path: signing.key
      - key: signing.crt
        path: signing.crt
- name: signing-certs
  projected:
    defaultMode: 0444
    sources:
      - secret:
          name: {{ include "waardhaven-tasks.signing.secretName" . }}
          items:
            - key: signing.crt
              path: signing.crt
      {{- if .Values.signing.extraCertificates }}
      - configMap:
          name: {{ include "waardhaven-tasks.fullname" . }}-signing-certs
      {{- end }}
{{- end }}
{{- end -}}

{{/* Pod annotations: roll when the generated key or the extra certificates change. */}}
{{- define "waardhaven-tasks.signing.checksum" -}}
{{- if .Values.signing.enabled }}
checksum/signing: {{ printf "%s/%s" (include "waardhaven-tasks.signing.pair" .) (toJson .Values.signing.extraCertificates) | sha256sum }}
{{- end }}
{{- end -}}

{{/* API --------------------------------------------------------------------------------- */}}

{{- define "waardhaven-tasks.api.fullname" -}}
{{- printf "%s-api" (include "waardhaven-tasks.fullname" .) -}}
{{- end -}}

{{- define "waardhaven-tasks.api.tokensSecretName" -}}
{{- default (printf "%s-tokens" (include "waardhaven-tasks.api.fullname" .)) .Values.api.tokens.existingSecret -}}
{{- end -}}

{{/* The generated admin token (only when neither entries nor existingSecret are given). */}}
{{- define "waardhaven-tasks.api.adminToken" -}}
{{- if and .Values.api.enabled (not .Values.api.tokens.existingSecret) (not .Values.api.tokens.entries) -}}
{{- printf "wht_%s" (include "waardhaven-tasks.credential" (dict "ctx" . "secret" (printf "%s-admin-token" (include "waardhaven-tasks.api.fullname" .)) "key" "token" "given" "" "length" 43 "values" "api.tokens.entries (or api.tokens.existingSecret)")) -}}
{{- end -}}
{{- end -}}

{{/* The `helm test` token: may submit and read ping, nothing else. */}}
{{- define "waardhaven-tasks.api.testToken" -}}
{{- if and .Values.api.enabled .Values.tests.enabled (not .Values.api.tokens.existingSecret) -}}
{{- printf "wht_%s" (include "waardhaven-tasks.credential" (dict "ctx" . "secret" (printf "%s-test-token" (include "waardhaven-tasks.api.fullname" .)) "key" "token" "given" "" "length" 43 "values" "api.tokens.existingSecret or tests.enabled=false")) -}}
{{- end -}}
{{- end -}}

{{/* The tokens file: hashes and permissions only. */}}
{{- define "waardhaven-tasks.api.tokensFile" -}}
{{- $entries := list -}}
{{- range .Values.api.tokens.entries }}{{ $entries = append $entries . }}{{ end -}}
{{- with include "waardhaven-tasks.api.adminToken" . -}}
{{- $entries = append $entries (dict "name" "admin" "sha256" (sha256sum .) "permissions" (dict "*" (list "*"))) -}}
{{- end -}}
{{- with include "waardhaven-tasks.api.testToken" . -}}
{{- $entries = append $entries (dict "name" "helm-test" "sha256" (sha256sum .) "permissions" (dict "ping" (list "submit" "read"))) -}}
{{- end -}}
{{- dict "tokens" $entries | toPrettyJson -}}
{{- end -}}

{{/* Redis Sentinel ----------------------------------------------------------------------- */}}

{{/* Sentinel mode: the in-chart Redis with redis.sentinel, or externalRedis.sentinel. */}}
{{- define "waardhaven-tasks.redis.sentinelMode" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.sentinel.enabled }}true{{ end -}}
{{- else if .Values.externalRedis.sentinel.enabled -}}true{{- end -}}
{{- end -}}

{{/* FQDN of in-chart Redis pod i: (dict "ctx" $ "i" i) */}}
{{- define "waardhaven-tasks.redis.podHost" -}}
{{- $full := include "waardhaven-tasks.redis.fullname" .ctx -}}
{{- printf "%s-%d.%s-headless.%s.svc.%s" $full (int .i) $full .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}

{{/* The Sentinels, host:port,... (REDIS_SENTINELS). */}}
{{- define "waardhaven-tasks.redis.sentinels" -}}
{{- if .Values.redis.enabled -}}
{{- $out := list -}}
{{- range $i := until (int .Values.redis.sentinel.replicas) -}}
{{- $out = append $out (printf "%s:26379" (include "waardhaven-tasks.redis.podHost" (dict "ctx" $ "i" $i))) -}}
{{- end -}}
{{- join "," $out -}}
{{- else -}}
{{- join "," .Values.externalRedis.sentinel.hosts -}}
{{- end -}}
{{- end -}}

{{- define "waardhaven-tasks.redis.sentinelMaster" -}}
{{- ternary .Values.redis.sentinel.masterName .Values.externalRedis.sentinel.masterName .Values.redis.enabled -}}
{{- end -}}

{{- define "waardhaven-tasks.redis.sentinelSecretName" -}}
{{- if .Values.redis.enabled -}}
{{- default (printf "%s-sentinel" (include "waardhaven-tasks.redis.fullname" .)) .Values.redis.sentinel.auth.existingSecret -}}
{{- else -}}
{{- .Values.externalRedis.sentinel.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "waardhaven-tasks.redis.sentinelSecretKey" -}}
{{- if .Values.redis.enabled -}}
{{- ternary .Values.redis.sentinel.auth.existingSecretPasswordKey "sentinel-password" (ne .Values.redis.sentinel.auth.existingSecret "") -}}
{{- else -}}
{{- .Values.externalRedis.sentinel.existingSecretPasswordKey -}}
{{- end -}}
{{- end -}}

{{/* The generated in-chart Sentinel password ("" otherwise). */}}
{{- define "waardhaven-tasks.redis.sentinelPassword" -}}
{{- if and .Values.redis.enabled .Values.redis.sentinel.enabled (not .Values.redis.sentinel.auth.existingSecret) -}}
{{- include "waardhaven-tasks.credential" (dict "ctx" . "secret" (printf "%s-sentinel" (include "waardhaven-tasks.redis.fullname" .)) "key" "sentinel-password" "given" .Values.redis.sentinel.auth.password "length" 32 "values" "redis.sentinel.auth.password or redis.sentinel.auth.existingSecret") -}}
{{- end -}}
{{- end -}}

{{/* Sentinel mode env (instead of REDIS_URL; settings refuse both). */}}
{{- define "waardhaven-tasks.redis.sentinelEnv" -}}
- name: REDIS_SENTINELS
  value: {{ include "waardhaven-tasks.redis.sentinels" . | quote }}
- name: REDIS_SENTINEL_MASTER
  value: {{ include "waardhaven-tasks.redis.sentinelMaster" . | quote }}
- name: REDIS_SENTINEL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "waardhaven-tasks.redis.sentinelSecretName" . }}
      key: {{ include "waardhaven-tasks.redis.sentinelSecretKey" . }}
{{- end -}}
