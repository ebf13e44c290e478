{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "infermesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, the prefix of every resource name.
*/}}
{{- define "infermesh.fullname" -}}
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

{{/*
Name of one component's resources: the full name, shortened so that the
suffix always fits in 63 characters (Service names are DNS labels).
Call with (dict "ctx" $ "suffix" "-control-plane").
*/}}
{{- define "infermesh.componentName" -}}
{{- $prefix := include "infermesh.fullname" .ctx | trunc (int (sub 63 (len .suffix))) | trimSuffix "-" }}
{{- printf "%s%s" $prefix .suffix }}
{{- end }}

{{/*
Name of the control plane's Deployment and Service.
*/}}
{{- define "infermesh.controlPlane.name" -}}
{{- include "infermesh.componentName" (dict "ctx" . "suffix" "-control-plane") }}
{{- end }}

{{/*
Name of one region's edge Deployment and Service. Call with (dict "ctx" $ "region" "eu-west").
*/}}
{{- define "infermesh.edge.name" -}}
{{- include "infermesh.componentName" (dict "ctx" .ctx "suffix" (printf "-edge-%s" .region)) }}
{{- end }}

{{/*
Name of the Service that exposes only a component's metrics port: the name of
its API Service plus -metrics, so that scrapers never need the API Service
(and an edge Service of type LoadBalancer never publishes /metrics).
Call with (dict "ctx" $ "suffix" "-control-plane") or "-edge-<region>".
*/}}
{{- define "infermesh.metricsServiceName" -}}
{{- include "infermesh.componentName" (dict "ctx" .ctx "suffix" (printf "%s-metrics" .suffix)) }}
{{- end }}

{{/*
A component's metrics Service: ClusterIP, port `metrics` only, labelled
infermesh.io/metrics: "true" for the ServiceMonitors. Call with (dict "ctx" $
"name" <Service name> "component" "edge" "region" "eu-west" "port" 9090);
region is optional.
*/}}
{{- define "infermesh.metricsService" -}}
{{- $labels := dict "ctx" .ctx "component" .component "region" .region -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ .name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "infermesh.labels" $labels | nindent 4 }}
    infermesh.io/metrics: "true"
spec:
  type: ClusterIP
  selector:
    {{- include "infermesh.selectorLabels" $labels | nindent 4 }}
  ports:
    - name: metrics
      port: {{ .port }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end }}

{{/*
Chart label value.
*/}}
{{- define "infermesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels. Call with (dict "ctx" $ "component" "edge" "region" "eu-west"); region is optional.
*/}}
{{- define "infermesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "infermesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .region }}
infermesh.io/region: {{ . }}
{{- end }}
{{- end }}

{{/*
Standard labels. Same arguments as infermesh.selectorLabels.
*/}}
{{- define "infermesh.labels" -}}
helm.sh/chart: {{ include "infermesh.chart" .ctx }}
{{ include "infermesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: infermesh
{{- end }}

{{/*
Container image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "infermesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
DNS name edges use to reach the control plane; its serving certificate must
carry it as a SAN.
*/}}
{{- define "infermesh.controlPlane.host" -}}
{{- printf "%s.%s.svc" (include "infermesh.controlPlane.name" .) .Release.Namespace }}
{{- end }}

{{/*
Address edges use to reach the control plane: host:port, with no scheme; TLS
is on when INFERMESH_CONTROL_PLANE_CA is set.
*/}}
{{- define "infermesh.controlPlane.address" -}}
{{- printf "%s:7070" (include "infermesh.controlPlane.host" .) }}
{{- end }}

{{/*
"true" when controlPlane.tls.insecurePlaintext is set, else empty. Fails when
it is combined with controlPlane.tls.secretName, or when neither is set (the
control plane refuses both).
*/}}
{{- define "infermesh.controlPlane.insecure" -}}
{{- $tls := .Values.controlPlane.tls | default dict }}
{{- if eq (toString $tls.insecurePlaintext) "true" }}
{{- if $tls.secretName }}
{{- fail "controlPlane.tls.insecurePlaintext: cannot be combined with controlPlane.tls.secretName; unset one of them" }}
{{- end }}
{{- print "true" }}
{{- else }}
{{- $_ := required "controlPlane.tls.secretName is required: name a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt (the CA of edge, sidecar and admin client certificates), or set controlPlane.tls.insecurePlaintext=true for local development" $tls.secretName }}
{{- end }}
{{- end }}

{{/*
Name of the control plane's ServiceAccount.
*/}}
{{- define "infermesh.controlPlane.serviceAccountName" -}}
{{- $sa := .Values.controlPlane.serviceAccount | default dict }}
{{- if $sa.create }}
{{- $sa.name | default (include "infermesh.controlPlane.name" .) }}
{{- else }}
{{- $sa.name | default "default" }}
{{- end }}
{{- end }}

{{/*
Name of the webhook's Service; its serving certificate names
<this>.<namespace>.svc.
*/}}
{{- define "infermesh.webhook.serviceName" -}}
{{- include "infermesh.componentName" (dict "ctx" . "suffix" "-webhook") }}
{{- end }}

{{/*
Secret holding the webhook's serving certificate (tls.crt, tls.key, ca.crt).
*/}}
{{- define "infermesh.webhook.secretName" -}}
{{- include "infermesh.componentName" (dict "ctx" . "suffix" "-webhook-tls") }}
{{- end }}

{{/*
Name of the bundled etcd StatefulSet and its headless Service; short enough
that pod names (<name>-<ordinal>) and their revision labels fit.
*/}}
{{- define "infermesh.etcd.name" -}}
{{- printf "%s-etcd" (include "infermesh.fullname" . | trunc 47 | trimSuffix "-") }}
{{- end }}

{{/*
"true" when the chart runs etcd (etcd.bundled.enabled), else empty.
*/}}
{{- define "infermesh.etcd.bundled" -}}
{{- if ((.Values.etcd.bundled | default dict).enabled) }}
{{- print "true" }}
{{- end }}
{{- end }}

{{/*
Comma-separated client URLs of etcd: the bundled members, or etcd.endpoints.
*/}}
{{- define "infermesh.etcd.endpoints" -}}
{{- if include "infermesh.etcd.bundled" . }}
{{- $name := include "infermesh.etcd.name" . }}
{{- $urls := list }}
{{- range $i := until (int .Values.etcd.bundled.replicas) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:2379" $name $i $name $.Release.Namespace) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- join "," (compact (splitList "," (join "," (.Values.etcd.endpoints | default list)))) }}
{{- end }}
{{- end }}

{{/*
Affinity of a component's pods: the user's `affinity`, plus (unless it sets
podAntiAffinity itself) anti-affinity across zones and nodes.
Call with (dict "ctx" $ "component" "edge" "region" "eu-west" "affinity" .affinity "mode" "soft").
mode: soft (both preferred), hard (zones required, nodes preferred) or none.
*/}}
{{- define "infermesh.affinity" -}}
{{- $aff := deepCopy (.affinity | default dict) }}
{{- $mode := toString (.mode | default "soft") }}
{{- if not (has $mode (list "soft" "hard" "none")) }}
{{- fail (printf "podAntiAffinity of %s: %q must be soft, hard or none" .component $mode) }}
{{- end }}
{{- if and (ne $mode "none") (not (hasKey $aff "podAntiAffinity")) }}
{{- $selector := dict "matchLabels" (fromYaml (include "infermesh.selectorLabels" (dict "ctx" .ctx "component" .component "region" .region))) }}
{{- $zone := dict "labelSelector" $selector "topologyKey" (.ctx.Values.zoneTopologyKey | default "topology.kubernetes.io/zone") }}
{{- $node := dict "labelSelector" $selector "topologyKey" "kubernetes.io/hostname" }}
{{- if eq $mode "hard" }}
{{- $_ := set $aff "podAntiAffinity" (dict
      "requiredDuringSchedulingIgnoredDuringExecution" (list $zone)
      "preferredDuringSchedulingIgnoredDuringExecution" (list (dict "weight" 50 "podAffinityTerm" $node))) }}
{{- else }}
{{- $_ := set $aff "podAntiAffinity" (dict
      "preferredDuringSchedulingIgnoredDuringExecution" (list
        (dict "weight" 100 "podAffinityTerm" $zone)
        (dict "weight" 50 "podAffinityTerm" $node))) }}
{{- end }}
{{- end }}
{{- if $aff }}
{{- toYaml $aff }}
{{- end }}
{{- end }}
