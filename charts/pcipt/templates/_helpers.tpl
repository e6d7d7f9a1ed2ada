{{/* Names and labels shared by every template. */}}

{{- define "pcipt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The object-name prefix: the release name, with the chart name unless it already has it. */}}
{{- define "pcipt.fullname" -}}
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

{{- define "pcipt.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "pcipt.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pcipt
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "controller"). */}}
{{- define "pcipt.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pcipt.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pcipt.componentLabels" -}}
{{ include "pcipt.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "pcipt.image" -}}
{{- $img := .Values.image -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $img.repository $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $img.repository (default .Chart.AppVersion $img.tag) -}}
{{- end -}}
{{- end -}}

{{- define "pcipt.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{- default (printf "%s-controller" (include "pcipt.fullname" .)) .Values.controller.serviceAccount.name -}}
{{- else -}}
{{- required "controller.serviceAccount.name is required when controller.serviceAccount.create is false" .Values.controller.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pcipt.nodePlugin.serviceAccountName" -}}
{{- if .Values.nodePlugin.serviceAccount.create -}}
{{- default (printf "%s-node-plugin" (include "pcipt.fullname" .)) .Values.nodePlugin.serviceAccount.name -}}
{{- else -}}
{{- required "nodePlugin.serviceAccount.name is required when nodePlugin.serviceAccount.create is false" .Values.nodePlugin.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pcipt.webhook.serviceName" -}}
{{- printf "%s-webhook" (include "pcipt.fullname" .) -}}
{{- end -}}

{{- define "pcipt.webhook.configName" -}}
{{- printf "%s-webhook" (include "pcipt.fullname" .) -}}
{{- end -}}

{{/* The Secret the webhook's certificate is in: the chart's own (self-issued) or the user's. */}}
{{- define "pcipt.webhook.secretName" -}}
{{- if eq .Values.webhook.certificate.source "secret" -}}
{{- .Values.webhook.certificate.secretName -}}
{{- else -}}
{{- printf "%s-webhook-tls" (include "pcipt.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "pcipt.deviceSpecs.configMapName" -}}
{{- printf "%s-device-specs" (include "pcipt.fullname" .) -}}
{{- end -}}

{{/* Security context of every container but the node plugin's. */}}
{{- define "pcipt.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
