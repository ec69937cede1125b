{{/* A Kinema gRPC server (model service or orchestrator): its Deployment and Service, one definition for all.
     (dict "ctx" $ "component" NAME "values" VALUES "env" ENV-YAML ["mounts" MOUNTS-YAML "volumes" VOLUMES-YAML]
     ["tls" true: its gRPC port speaks TLS, see _tls.tpl]) */}}

{{- define "kinema.grpcDeployment" -}}
{{- $ctx := .ctx -}}
{{- $v := .values -}}
{{- $probePort := ternary (include "kinema.healthPort" $ctx) (include "kinema.grpcPort" $ctx) (eq (toString .tls) "true") -}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "kinema.componentName" . }}
  labels:
    {{- include "kinema.labels" . | nindent 4 }}
spec:
  {{- if not $v.autoscaling.enabled }}
  replicas: {{ $v.replicaCount }}
  {{- end }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 1
  selector:
    matchLabels:
      {{- include "kinema.selectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "kinema.labels" . | nindent 8 }}
    spec:
      {{- include "kinema.podCommon" . | nindent 6 }}
      {{- with include "kinema.scheduling" (dict "values" $v) | trim }}{{ . | nindent 6 }}{{- end }}
      terminationGracePeriodSeconds: 30
      containers:
        - name: {{ .component | replace "_" "-" }}
          image: {{ include "kinema.image" (dict "ctx" $ctx "image" $v.image) }}
          imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
          {{- /* the image's CMD: python -m services.<name>, as kinema.rpc.process.ServiceProcess starts it */}}
          ports:
            - name: grpc
              containerPort: {{ include "kinema.grpcPort" $ctx }}
              protocol: TCP
            - name: metrics
              containerPort: {{ include "kinema.metricsPort" $ctx }}
              protocol: TCP
            {{- if eq (toString .tls) "true" }}
            - name: health
              containerPort: {{ include "kinema.healthPort" $ctx }}
              protocol: TCP
            {{- end }}
          env:
            {{- include "kinema.serverEnv" $ctx | nindent 12 }}
            {{- /* admission control (kinema.rpc.admission): int64, as a float64 like 1e+06 does not parse */}}
            - name: KINEMA_MAX_IN_FLIGHT
              value: {{ $v.maxInFlight | int64 | quote }}
            {{- if eq (toString .tls) "true" }}
            - name: KINEMA_HEALTH_PORT
              value: {{ include "kinema.healthPort" $ctx | quote }}
            {{- end }}
            {{- .env | trim | nindent 12 }}
            {{- with $v.env }}{{ include "kinema.extraEnv" . | trim | nindent 12 }}{{- end }}
          {{- /* grpc.health.v1 on the serving port (kinema.rpc.server), as `kinema stack status` asks it; under TLS on the
               plaintext health-only port (KINEMA_HEALTH_PORT): Kubernetes' grpc probe speaks no TLS */}}
          startupProbe:
            grpc:
              port: {{ $probePort }}
            periodSeconds: 2
            failureThreshold: 60
          readinessProbe:
            grpc:
              port: {{ $probePort }}
            periodSeconds: 10
            timeoutSeconds: 2
            failureThreshold: 3
          livenessProbe:
            grpc:
              port: {{ $probePort }}
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 3
          resources:
            {{- toYaml $v.resources | nindent 12 }}
          securityContext:
            {{- include "kinema.containerSecurityContext" $ctx | nindent 12 }}
          volumeMounts:
            {{- include "kinema.tmpMount" $ctx | nindent 12 }}
            {{- with .mounts }}{{ . | trim | nindent 12 }}{{- end }}
      volumes:
        {{- include "kinema.tmpVolume" $ctx | nindent 8 }}
        {{- with .volumes }}{{ . | trim | nindent 8 }}{{- end }}
{{- end -}}

{{- define "kinema.grpcService" -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "kinema.componentName" . }}
  labels:
    {{- include "kinema.labels" . | nindent 4 }}
  {{- with .annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ .type | default "ClusterIP" }}
  selector:
    {{- include "kinema.selectorLabels" . | nindent 4 }}
  ports:
    - name: grpc
      port: {{ .port | default (include "kinema.grpcPort" .ctx) }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
    - name: metrics
      port: {{ include "kinema.metricsPort" .ctx }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
{{- end -}}
