{{/* Full name of the release's objects: the release name, plus "-weir" unless it says weir. */}}
{{- define "weir.fullname" -}}
{{- if contains "weir" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-weir" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object (Kubernetes recommended labels). */}}
{{- define "weir.labels" -}}
app.kubernetes.io/name: weir
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Labels that select the operator Pods. */}}
{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: weir
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "weir.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "weir.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "weir.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "weir.brokerImage" -}}
{{- printf "%s:%s" (default .Values.image.repository .Values.brokers.image.repository) (default (default .Chart.AppVersion .Values.image.tag) .Values.brokers.image.tag) -}}
{{- end -}}

{{/* The operator's broker config file (see `weir-operator run --broker-config`). */}}
{{- define "weir.brokerConfig" -}}
image: {{ include "weir.brokerImage" . | quote }}
imagePullPolicy: {{ .Values.image.pullPolicy | quote }}
minBrokers: {{ .Values.brokers.minBrokers }}
maxBrokers: {{ .Values.brokers.maxBrokers }}
storage:
  size: {{ .Values.brokers.storage.size | quote }}
  className: {{ .Values.brokers.storage.className | quote }}
resources: {{- toYaml .Values.brokers.resources | nindent 2 }}
podSecurityContext: {{- toYaml .Values.brokers.podSecurityContext | nindent 2 }}
securityContext: {{- toYaml .Values.brokers.securityContext | nindent 2 }}
tolerations: {{- toYaml .Values.brokers.tolerations | nindent 2 }}
affinity: {{- toYaml .Values.brokers.affinity | nindent 2 }}
nodeSelector: {{- toYaml .Values.brokers.nodeSelector | nindent 2 }}
env: {{- toYaml .Values.brokers.env | nindent 2 }}
{{- end -}}
