{{/* TLS (docs/deploy.md#tls): Secrets in cert-manager's layout (tls.crt, tls.key, ca.crt), mounted read-only, and the
     KINEMA_* settings that point at them (kinema/rpc/settings.py, kinema.rpc.tls).
     - orchestrator.tls.existingSecret: the orchestrator's public gRPC port speaks TLS with tls.crt / tls.key.
     - internalTls.existingSecret: mTLS between the orchestrator and its workers (clients, presenting tls.crt) and
       the model services they call (kinema.orchestratedServices: servers requiring a client certificate ca.crt
       signed); with internalTls.triton also between every model service and Triton's gRPC port.
     A server whose gRPC port speaks TLS also serves health alone, in plaintext, on kinema.healthPort: Kubernetes' grpc
     probe cannot speak TLS, so its probes ask there (kinema.grpcDeployment). */}}

{{- define "kinema.healthPort" -}}50052{{- end -}}
{{- define "kinema.tlsDir" -}}/etc/kinema/tls{{- end -}}
{{- define "kinema.internalTlsDir" -}}/etc/kinema/internal-tls{{- end -}}

{{/* Whether the model service `.name` serves mTLS: internal TLS is on and the orchestrator or its workers call it. */}}
{{- define "kinema.servesInternalTls" -}}
{{- if and .ctx.Values.internalTls.existingSecret (has .name (include "kinema.orchestratedServices" .ctx | fromJsonArray)) -}}
true
{{- end -}}
{{- end -}}

{{/* The serving port's certificate, from the Secret mounted at .dir; with .clientCA, clients need one ca.crt signed. */}}
{{- define "kinema.servingTlsEnv" -}}
- name: KINEMA_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" .dir | quote }}
- name: KINEMA_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" .dir | quote }}
{{- if .clientCA }}
- name: KINEMA_TLS_CLIENT_CA_FILE
  value: {{ printf "%s/ca.crt" .dir | quote }}
{{- end }}
{{- end -}}

{{/* What a process presents, and trusts, when it calls the internal servers (model services, Triton). */}}
{{- define "kinema.internalTlsEnv" -}}
{{- $dir := include "kinema.internalTlsDir" . -}}
- name: KINEMA_INTERNAL_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" $dir | quote }}
- name: KINEMA_INTERNAL_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" $dir | quote }}
- name: KINEMA_INTERNAL_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" $dir | quote }}
{{- end -}}

{{/* A TLS Secret as a read-only volume and its mount: (dict "name" VOLUME "secret" SECRET "dir" PATH). */}}
{{- define "kinema.tlsVolume" -}}
- name: {{ .name }}
  secret:
    secretName: {{ .secret }}
{{- end -}}
{{- define "kinema.tlsMount" -}}
- name: {{ .name }}
  mountPath: {{ .dir }}
  readOnly: true
{{- end -}}
{{- define "kinema.internalTlsVolume" -}}
{{- include "kinema.tlsVolume" (dict "name" "internal-tls" "secret" .Values.internalTls.existingSecret) -}}
{{- end -}}
{{- define "kinema.internalTlsMount" -}}
{{- include "kinema.tlsMount" (dict "name" "internal-tls" "dir" (include "kinema.internalTlsDir" .)) -}}
{{- end -}}
