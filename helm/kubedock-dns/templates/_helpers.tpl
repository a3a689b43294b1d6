{{/*
Names and labels shared by every template.
*/}}

{{- define "kubedock-dns.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the namespaced objects: <release>-kubedock-dns, or the release name alone when it
already contains the chart name.  Truncated to 63 characters (a DNS label: it names the Service).
*/}}
{{- define "kubedock-dns.fullname" -}}
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
Name of the cluster-scoped MutatingWebhookConfiguration: it carries release AND namespace, so two
installs (in different namespaces, or under different release names) never overwrite each other.
*/}}
{{- define "kubedock-dns.webhookName" -}}
{{- printf "%s-%s" (include "kubedock-dns.fullname" .) .Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "kubedock-dns.tlsSecretName" -}}
{{- printf "%s-tls" (include "kubedock-dns.fullname" .) }}
{{- end }}

{{- define "kubedock-dns.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubedock-dns.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubedock-dns.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The labels the chart itself sets on every object, without commonLabels.
*/}}
{{- define "kubedock-dns.ownLabels" -}}
helm.sh/chart: {{ include "kubedock-dns.chart" . }}
{{ include "kubedock-dns.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubedock-dns.labels" -}}
{{ include "kubedock-dns.ownLabels" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
commonLabels may add labels, never replace one the chart sets (a changed selector label would
orphan the running pods; a duplicate key would make the YAML invalid).
*/}}
{{- define "kubedock-dns.checkCommonLabels" -}}
{{- $own := include "kubedock-dns.ownLabels" . | fromYaml }}
{{- range $key, $value := .Values.commonLabels }}
{{- if hasKey $own $key }}
{{- fail (printf "commonLabels.%s: the chart sets this label itself (to %q); choose another label name." $key (toString (index $own $key))) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The pods' labels: the selector labels, then commonLabels, then podLabels (podLabels win over
commonLabels; neither may replace a selector label).
*/}}
{{- define "kubedock-dns.podLabels" -}}
{{- $selector := include "kubedock-dns.selectorLabels" . | fromYaml }}
{{- $labels := merge (deepCopy (.Values.podLabels | default dict)) (.Values.commonLabels | default dict) }}
{{- range $key, $value := $labels }}
{{- if hasKey $selector $key }}
{{- fail (printf "podLabels/commonLabels.%s: the Deployment selects its pods by this label; choose another label name." $key) }}
{{- end }}
{{- end }}
{{- toYaml (merge $labels $selector) }}
{{- end }}

{{/*
The image reference: <repository>@<digest> when a digest is given (the tag is then ignored),
else <repository>:<tag, default appVersion>.
*/}}
{{- define "kubedock-dns.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Name of the Service exposing the ops port for Prometheus (a DNS label: 63 characters). */}}
{{- define "kubedock-dns.metricsServiceName" -}}
{{- printf "%s-metrics" (include "kubedock-dns.fullname" . | trunc 55 | trimSuffix "-") }}
{{- end }}

{{/*
Only one Prometheus Operator object may scrape the replicas (two would count every series
twice), and the ServiceMonitor needs the metrics Service it selects.
*/}}
{{- define "kubedock-dns.checkMonitors" -}}
{{- $m := .Values.metrics }}
{{- if and $m.serviceMonitor.enabled $m.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled are both true: Prometheus would scrape every replica twice. Enable one of them." }}
{{- end }}
{{- if and $m.serviceMonitor.enabled (not $m.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled: the ServiceMonitor scrapes the metrics Service's endpoints. Enable the Service, or use metrics.podMonitor instead." }}
{{- end }}
{{- end }}

{{/*
Hostnames the API server uses to reach the webhook through its Service.
*/}}
{{- define "kubedock-dns.serviceHosts" -}}
{{- $svc := include "kubedock-dns.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.dns.clusterDomain) | toJson }}
{{- end }}

{{/*
Upstream resolvers: exactly the values.  Nothing is looked up at install time, so `helm template`
(GitOps) renders what `helm install` does; with none given the server forwards to the
nameservers of its own /etc/resolv.conf, which dnsPolicy ClusterFirst makes the cluster DNS.
*/}}
{{- define "kubedock-dns.upstreams" -}}
{{- .Values.dns.upstreams | default list | toJson }}
{{- end }}

{{/*
Refuse pod labels that would opt kubedock-dns' own pods in: the webhook would point them at
their own Service, and the server would forward every unknown name to itself.
*/}}
{{- define "kubedock-dns.checkPodLabels" -}}
{{- range $source := list "podLabels" "commonLabels" }}
{{- $labels := index $.Values $source | default dict }}
{{- if eq (toString (index $labels $.Values.optInLabel | default "")) "true" }}
{{- fail (printf "%s.%s=true would opt kubedock-dns' own pods in: the webhook would make them their own upstream. Remove it." $source $.Values.optInLabel) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The webhook's TLS material as a dict {caCert, cert, key}, decided once per render:
  1. tls.caCert/tls.cert/tls.key given: used verbatim;
  2. cert-manager enabled: nothing here (cert-manager writes the Secret and injects the CA);
  3. the Secret already exists in the cluster (upgrade): its contents are reused unchanged;
  4. otherwise a new CA and serving certificate.
The result is memoised on the root context, so the Secret and the webhook configuration always
carry the same CA even though genCA is random.
*/}}
{{- define "kubedock-dns.tls" -}}
{{- if not (hasKey $ "kubedockDnsTLS") }}
{{- $tls := dict }}
{{- $v := .Values.tls }}
{{- $given := list $v.caCert $v.cert $v.key | compact }}
{{- if $given }}
{{- if ne (len $given) 3 }}
{{- fail "tls.caCert, tls.cert and tls.key must be given together (or all left empty to generate them)" }}
{{- end }}
{{- $_ := set $tls "caCert" $v.caCert }}
{{- $_ := set $tls "cert" $v.cert }}
{{- $_ := set $tls "key" $v.key }}
{{- else if not .Values.certManager.enabled }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "kubedock-dns.tlsSecretName" .) }}
{{- if and $existing $existing.data (index $existing.data "ca.crt") (index $existing.data "tls.crt") (index $existing.data "tls.key") }}
{{- $_ := set $tls "caCert" (index $existing.data "ca.crt" | b64dec) }}
{{- $_ := set $tls "cert" (index $existing.data "tls.crt" | b64dec) }}
{{- $_ := set $tls "key" (index $existing.data "tls.key" | b64dec) }}
{{- else }}
{{- $days := int .Values.tls.validityDays }}
{{- $ca := genCA (printf "%s-ca" (include "kubedock-dns.fullname" .)) $days }}
{{- $hosts := include "kubedock-dns.serviceHosts" . | fromJsonArray }}
{{- $cert := genSignedCert (index $hosts 2) nil $hosts $days $ca }}
{{- $_ := set $tls "caCert" $ca.Cert }}
{{- $_ := set $tls "cert" $cert.Cert }}
{{- $_ := set $tls "key" $cert.Key }}
{{- end }}
{{- end }}
{{- $_ := set $ "kubedockDnsTLS" $tls }}
{{- end }}
{{- index $ "kubedockDnsTLS" | toJson }}
{{- end }}

{{/* A label map as key=value,key=value (sorted), for --kubedock-pod-selector. */}}
{{- define "kubedock-dns.selectorText" -}}
{{- $parts := list -}}
{{- range $key, $value := . -}}
{{- $parts = append $parts (printf "%s=%s" $key $value) -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}

{{/*
The drain must end before the kubelet's SIGKILL: refuse a grace period that would cut it short.
*/}}
{{- define "kubedock-dns.checkDrain" -}}
{{- if ge (float64 .Values.drainSeconds) (float64 .Values.terminationGracePeriodSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be larger than drainSeconds (%v): the kubelet would kill a replica before its drain ends. Raise terminationGracePeriodSeconds or lower drainSeconds." .Values.terminationGracePeriodSeconds .Values.drainSeconds) }}
{{- end }}
{{- end }}
