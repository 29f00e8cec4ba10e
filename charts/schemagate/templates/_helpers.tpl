{{/* Chart name, overridable with nameOverride. */}}
{{- define "schemagate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name, the prefix of every resource. Truncated to 63 characters: some fields
(Service names) are DNS labels.
*/}}
{{- define "schemagate.fullname" -}}
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

{{/* Chart name and version, for the helm.sh/chart label. */}}
{{- define "schemagate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every resource. */}}
{{- define "schemagate.labels" -}}
helm.sh/chart: {{ include "schemagate.chart" . }}
{{ include "schemagate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Labels that select the operator's pods. */}}
{{- define "schemagate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "schemagate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Name of the operator's ServiceAccount. */}}
{{- define "schemagate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "schemagate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* "true" when cert-manager issues the webhook certificate, empty otherwise. */}}
{{- define "schemagate.certManager" -}}
{{- if and .Values.webhook.enabled .Values.webhook.certManager.enabled }}true{{ end }}
{{- end }}

{{/* "true" when the operator manages the webhook certificate and caBundle itself. */}}
{{- define "schemagate.selfManagedCert" -}}
{{- if and .Values.webhook.enabled (not .Values.webhook.certManager.enabled) }}true{{ end }}
{{- end }}

{{/* Secret where the operator keeps its self-managed serving certificate. */}}
{{- define "schemagate.webhookCertSecret" -}}
{{- printf "%s-webhook-cert" (include "schemagate.fullname" .) }}
{{- end }}

{{/* Secret where cert-manager writes the serving certificate. */}}
{{- define "schemagate.certManagerSecret" -}}
{{- printf "%s-webhook-tls" (include "schemagate.fullname" .) }}
{{- end }}

{{/* Where the cert-manager certificate is mounted in the operator container. */}}
{{- define "schemagate.webhookCertDir" -}}
/var/run/schemagate/webhook-tls
{{- end }}

{{/* Arguments of `schemagate run`. */}}
{{- define "schemagate.args" -}}
- run
- --metrics-addr=0.0.0.0:{{ .Values.metrics.port }}
- --concurrency={{ .Values.concurrency }}
- --revision-poll-interval={{ .Values.revisionPollInterval }}
- --log-format={{ .Values.logFormat }}
{{- with .Values.watchNamespace }}
- --watch-namespace={{ . }}
{{- end }}
{{- if .Values.webhook.enabled }}
- --webhook-addr=0.0.0.0:{{ .Values.webhook.port }}
{{- if include "schemagate.certManager" . }}
- --webhook-cert-dir={{ include "schemagate.webhookCertDir" . }}
{{- else }}
- --webhook-config-name={{ include "schemagate.fullname" . }}
- --webhook-service-name={{ include "schemagate.fullname" . }}
- --webhook-service-namespace={{ .Release.Namespace }}
- --webhook-cert-secret={{ include "schemagate.webhookCertSecret" . }}
{{- end }}
{{- else }}
- --no-webhook
{{- end }}
- --leader-elect
- --leader-election-lease={{ include "schemagate.fullname" . }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
Permissions on the namespaced objects the operator handles: cluster-wide (ClusterRole)
or, with watchNamespace, in that namespace only (Role).
*/}}
{{- define "schemagate.workloadRules" -}}
# DatabaseMigrations: watched (every replica keeps them in memory). Only their status is
# written (server-side apply).
- apiGroups: ["schemagate.dev"]
  resources: ["databasemigrations"]
  verbs: ["list", "watch"]
- apiGroups: ["schemagate.dev"]
  resources: ["databasemigrations/status"]
  verbs: ["patch"]
# Owner references with blockOwnerDeletion on the migration Jobs need this where the
# OwnerReferencesPermissionEnforcement admission plugin is on (OpenShift).
- apiGroups: ["schemagate.dev"]
  resources: ["databasemigrations/finalizers"]
  verbs: ["update"]
# Migration Jobs; listed in every watched namespace so that migrations of one database
# take turns across namespaces.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Migrator pods, for their termination message and why they cannot start, and watched
# (label-selected) to read the database as soon as a migrator ends.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Opted-in Deployments, paused and released by the controller (merge patches guarded by
# resourceVersion).
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "patch"]
# Database URL Secrets, read by name (spec.database.urlSecretRef). Only get: the operator
# never lists or watches Secrets. A Secret's name can be in any watched namespace, so in
# all-namespaces mode this is cluster-wide; set watchNamespace to confine it.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events: its own, and list for the Job controller's FailedCreate of a migration Job
# (why its pod was refused: Pod Security, a quota).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
