{{/* Names and labels shared by every template. */}}

{{- define "switchyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "switchyard.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of a component: include with (dict "root" $ "component" "engine"). */}}
{{- define "switchyard.labels" -}}
{{ include "switchyard.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "switchyard.componentSelector" -}}
{{ include "switchyard.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "switchyard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "switchyard.servedName" -}}
{{ .Values.model.servedName | default .Values.model.name }}
{{- end -}}

{{- define "switchyard.modelPath" -}}
{{- if .Values.model.pvc.claimName -}}
/models/{{ .Values.model.name }}
{{- else -}}
{{ .Values.model.name }}
{{- end -}}
{{- end -}}

{{- define "switchyard.secretName" -}}
{{ .Values.secret.existingSecret | default (printf "%s-secrets" (include "switchyard.fullname" .)) }}
{{- end -}}

{{- define "switchyard.authEnabled" -}}
{{- if or .Values.secret.existingSecret .Values.secret.apiKeys -}}true{{- end -}}
{{- end -}}

{{- define "switchyard.leaderElection" -}}
{{- if gt (int .Values.controller.replicas) 1 -}}true{{- end -}}
{{- end -}}

{{- define "switchyard.redisUrl" -}}
{{- if .Values.redis.externalUrl -}}
{{ .Values.redis.externalUrl }}
{{- else if .Values.redis.enabled -}}
redis://{{ include "switchyard.fullname" . }}-redis:6379/0
{{- end -}}
{{- end -}}

{{/* What every Switchyard container shares: config, data dir, a writable /tmp, hardening. */}}
{{- define "switchyard.containerCommon" -}}
image: {{ include "switchyard.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities:
    drop: ["ALL"]
{{- end -}}

{{- define "switchyard.commonEnv" -}}
- name: SWITCHYARD_CONFIG
  value: /etc/switchyard/config.yaml
- name: SWITCHYARD_DATA_DIR
  value: /var/lib/switchyard
- name: HOME
  value: /var/lib/switchyard
- name: HF_HOME
  value: /var/lib/switchyard/huggingface
- name: SWITCHYARD_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- end -}}

{{- define "switchyard.commonMounts" -}}
- name: config
  mountPath: /etc/switchyard
  readOnly: true
- name: data
  mountPath: /var/lib/switchyard
- name: tmp
  mountPath: /tmp
{{- end -}}

{{- define "switchyard.commonVolumes" -}}
- name: config
  configMap:
    name: {{ include "switchyard.fullname" . }}-config
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "switchyard.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* Whether engines are split into prefill and decode Deployments: "true" or "". */}}
{{- define "switchyard.disaggregated" -}}
{{- $engine := .Values.engine -}}
{{- if or (gt (int ($engine.prefill | default dict).replicas) 0) (gt (int ($engine.decode | default dict).replicas) 0) -}}
true
{{- end -}}
{{- end -}}
