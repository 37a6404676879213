{{/* Common labels. */}}
{{- define "dynamig.labels" -}}
app.kubernetes.io/part-of: dynamig
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{/* The node selector as a label selector string: "dynamig.io/partitioning=mig". */}}
{{- define "dynamig.nodeSelectorString" -}}
{{- $parts := list -}}
{{- range $k, $v := .Values.nodeSelector -}}
{{- $parts = append $parts (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $parts -}}
{{- end }}

{{- define "dynamig.schedulerImage" -}}
{{ .Values.scheduler.image.repository }}:{{ .Values.scheduler.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "dynamig.agentImage" -}}
{{ .Values.agent.image.repository }}:{{ .Values.agent.image.tag | default .Chart.AppVersion }}
{{- end }}
