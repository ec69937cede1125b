{{/* Names, labels, images, the security context and the KINEMA_* environment every template shares. */}}

{{- define "kinema.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kinema.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's resource name: <fullname>-<component>, underscores (text_encoder) as dashes. */}}
{{- define "kinema.componentName" -}}
{{- printf "%s-%s" (include "kinema.fullname" .ctx) (.component | replace "_" "-") | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kinema.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of a component: (dict "ctx" $ "component" "orchestrator"). */}}
{{- define "kinema.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kinema.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component | replace "_" "-" }}
{{- end -}}

{{- define "kinema.labels" -}}
helm.sh/chart: {{ include "kinema.chart" .ctx }}
{{ include "kinema.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: kinema
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Labels of resources that belong to the release rather than one component (the default-deny policy). */}}
{{- define "kinema.releaseLabels" -}}
helm.sh/chart: {{ include "kinema.chart" . }}
app.kubernetes.io/name: {{ include "kinema.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kinema
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A Kinema image: (dict "ctx" $ "image" .Values.orchestrator.image). */}}
{{- define "kinema.image" -}}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion -}}
{{- $repo := .image.repository -}}
{{- if .ctx.Values.image.registry -}}
{{- $repo = printf "%s/%s" (trimSuffix "/" .ctx.Values.image.registry) $repo -}}
{{- end -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{- define "kinema.serviceAccountName" -}}
{{- if .ctx.Values.serviceAccount.create -}}
{{- include "kinema.componentName" . -}}
{{- else -}}
default
{{- end -}}
{{- end -}}

{{/* What every pod of the release shares: service account, pull secrets, the pod security context. */}}
{{- define "kinema.podCommon" -}}
serviceAccountName: {{ include "kinema.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .ctx.Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{- define "kinema.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/* Scheduling: (dict "values" .Values.orchestrator). */}}
{{- define "kinema.scheduling" -}}
{{- with .values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Ports. The services listen where their images and ServiceSettings put them (KINEMA_PORT 50051,
     KINEMA_METRICS_PORT 9100); Triton where `kinema triton` puts it (8000 http, 8001 grpc, 8002 metrics). */}}
{{- define "kinema.grpcPort" -}}50051{{- end -}}
{{- define "kinema.metricsPort" -}}9100{{- end -}}
{{- define "kinema.tritonHttpPort" -}}8000{{- end -}}
{{- define "kinema.tritonGrpcPort" -}}8001{{- end -}}
{{- define "kinema.tritonMetricsPort" -}}8002{{- end -}}
{{- define "kinema.minioPort" -}}9000{{- end -}}
{{- define "kinema.redisPort" -}}6379{{- end -}}

{{/* Secrets and the keys in them. */}}
{{- define "kinema.s3SecretName" -}}
{{- .Values.artifacts.existingSecret | default (include "kinema.componentName" (dict "ctx" . "component" "s3")) -}}
{{- end -}}
{{- define "kinema.s3AccessKeyKey" -}}
{{- ternary .Values.artifacts.existingSecretAccessKeyKey "access-key" (ne .Values.artifacts.existingSecret "") -}}
{{- end -}}
{{- define "kinema.s3SecretKeyKey" -}}
{{- ternary .Values.artifacts.existingSecretSecretKeyKey "secret-key" (ne .Values.artifacts.existingSecret "") -}}
{{- end -}}
{{- define "kinema.redisSecretName" -}}
{{- .Values.redis.existingSecret | default (include "kinema.componentName" (dict "ctx" . "component" "redis")) -}}
{{- end -}}
{{- define "kinema.redisUrlKey" -}}
{{- ternary .Values.redis.existingSecretUrlKey "redis-url" (ne .Values.redis.existingSecret "") -}}
{{- end -}}
{{- define "kinema.redisPasswordKey" -}}
{{- ternary .Values.redis.existingSecretPasswordKey "redis-password" (ne .Values.redis.existingSecret "") -}}
{{- end -}}

{{/* host:port of the S3 endpoint the services use. */}}
{{- define "kinema.s3Endpoint" -}}
{{- if .Values.minio.enabled -}}
{{- printf "%s:%s" (include "kinema.componentName" (dict "ctx" . "component" "minio")) (include "kinema.minioPort" .) -}}
{{- else -}}
{{- required "artifacts.endpoint (host:port of your S3) is required when minio.enabled=false" .Values.artifacts.endpoint -}}
{{- end -}}
{{- end -}}

{{- define "kinema.s3Secure" -}}
{{- if and (not .Values.minio.enabled) .Values.artifacts.secure -}}1{{- else -}}0{{- end -}}
{{- end -}}

{{/* KINEMA_ARTIFACTS: s3://bucket?endpoint=host:port&secure=0|1[&region=..][&public_endpoint=..]
     (kinema.storage.artifacts.store_from_uri). */}}
{{- define "kinema.artifactsUri" -}}
{{- $uri := printf "s3://%s?endpoint=%s&secure=%s" .Values.artifacts.bucket (include "kinema.s3Endpoint" .) (include "kinema.s3Secure" .) -}}
{{- if .Values.artifacts.region -}}
{{- $uri = printf "%s&region=%s" $uri .Values.artifacts.region -}}
{{- end -}}
{{- if .Values.artifacts.publicEndpoint -}}
{{- $uri = printf "%s&public_endpoint=%s" $uri .Values.artifacts.publicEndpoint -}}
{{- end -}}
{{- $uri -}}
{{- end -}}

{{/* The enabled model services the orchestrator and its worker call, as a JSON list: those whose
     KINEMA_<NAME>_URL kinema/orchestration/settings.py reads (tests/deploy/test_chart.py keeps the two in step;
     KINEMA_DISTILL_URL and KINEMA_DEPTH_URL are optional there, so services.<name>.enabled=false leaves them unset:
     no students, no edit_video). depth also answers its own clients (kinema.directServices); interpret only those. */}}
{{- define "kinema.orchestratedServices" -}}
{{- $out := list -}}
{{- range $name := list "text_encoder" "autoencoder" "denoiser" "distill" "depth" }}
{{- $svc := get $.Values.services $name }}
{{- if and $svc $svc.enabled }}{{ $out = append $out $name }}{{ end }}
{{- end }}
{{- toJson $out -}}
{{- end -}}

{{/* The model services clients call directly (their API is open to networkPolicy.apiFrom), orchestrated or not. */}}
{{- define "kinema.directServices" -}}
{{- toJson (list "depth" "interpret") -}}
{{- end -}}

{{/* The settings the orchestrator and its worker share, as `kinema stack up` gives them (stack.py):
     the address of each model service they call, the artifact store, its keys and, with jobs, Redis. */}}
{{- define "kinema.orchestrationEnv" -}}
{{- $ctx := . -}}
{{- range $name := include "kinema.orchestratedServices" . | fromJsonArray }}
- name: KINEMA_{{ upper $name }}_URL
  value: {{ printf "%s:%s" (include "kinema.componentName" (dict "ctx" $ctx "component" $name)) (include "kinema.grpcPort" $ctx) | quote }}
{{- end }}
{{ include "kinema.artifactsEnv" . }}
{{- if .Values.jobs.enabled }}
{{ include "kinema.redisUrlEnv" . }}
{{- end }}
- name: KINEMA_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: OMP_NUM_THREADS
  value: "1"
{{- end -}}

{{/* The artifact store and its keys (the S3 Secret), as kinema.storage.artifacts reads them. */}}
{{- define "kinema.artifactsEnv" -}}
- name: KINEMA_ARTIFACTS
  value: {{ include "kinema.artifactsUri" . | quote }}
- name: KINEMA_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "kinema.s3SecretName" . }}
      key: {{ include "kinema.s3AccessKeyKey" . }}
- name: KINEMA_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "kinema.s3SecretName" . }}
      key: {{ include "kinema.s3SecretKeyKey" . }}
{{- end -}}

{{/* KINEMA_REDIS_URL from the Redis Secret: the orchestrator, its workers and, with distillation, the distill service
     record jobs in the same Redis. */}}
{{- define "kinema.redisUrlEnv" -}}
- name: KINEMA_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "kinema.redisSecretName" . }}
      key: {{ include "kinema.redisUrlKey" . }}
{{- end -}}

{{/* host:port of Triton's gRPC port, as the model services and (distillation) the workers call it. */}}
{{- define "kinema.tritonUrl" -}}
{{- printf "%s:%s" (include "kinema.componentName" (dict "ctx" . "component" "triton")) (include "kinema.tritonGrpcPort" .) -}}
{{- end -}}

{{/* Distillation as a job (docs/distill.md): "true" when distillation.enabled, after refusing what cannot work. A
     student is loaded into the Triton pod the worker's channel reaches, not written into the repository, so more
     than one Triton pod would serve it from one pod only; the worker presents the internal certificate to every
     server it calls (kinema.rpc.tls.internal_credentials), Triton included. */}}
{{- /* The checks of a job kind that trains on the workers and loads its model into Triton; `key` names its values
     section, `service` the model service that answers its start RPC, `rpc` that RPC, `models` what it loads. */}}
{{- define "kinema.modelJobChecks" -}}
{{- $ctx := .ctx -}}
{{- if not $ctx.Values.jobs.enabled -}}
{{- fail (printf "%s.enabled needs jobs.enabled: the job workers train the %s" .key .models) -}}
{{- end -}}
{{- $svc := get $ctx.Values.services .service -}}
{{- if not (and $svc $svc.enabled) -}}
{{- fail (printf "%s.enabled needs services.%s.enabled: the %s service answers %s" .key .service .service .rpc) -}}
{{- end -}}
{{- if or $ctx.Values.triton.autoscaling.enabled (ne (int $ctx.Values.triton.replicaCount) 1) -}}
{{- fail (printf "%s.enabled needs one Triton pod (triton.replicaCount=1, triton.autoscaling.enabled=false): the %s are loaded into the pod the worker reaches, not into the model repository" .key .models) -}}
{{- end -}}
{{- if and $ctx.Values.internalTls.existingSecret (not $ctx.Values.internalTls.triton) -}}
{{- fail (printf "%s.enabled with internalTls.existingSecret needs internalTls.triton=true: the worker loads the %s over mTLS, which Triton's gRPC port speaks only then" .key .models) -}}
{{- end -}}
{{- end -}}

{{- define "kinema.distillation" -}}
{{- if .Values.distillation.enabled -}}
{{- include "kinema.modelJobChecks" (dict "ctx" . "key" "distillation" "service" "distill" "rpc" "StartDistillation" "models" "students") -}}
true
{{- end -}}
{{- end -}}

{{- define "kinema.fitting" -}}
{{- if .Values.fitting.enabled -}}
{{- include "kinema.modelJobChecks" (dict "ctx" . "key" "fitting" "service" "interpret" "rpc" "Fit" "models" "fitted IINs") -}}
true
{{- end -}}
{{- end -}}

{{- /* Whether the workers train models and load them into Triton (distillations, fittings, or both): they then get
     a copy of the model repository, Triton's address and a scratch folder (the distillation.models and
     distillation.scratch values serve both kinds). */}}
{{- define "kinema.modelJobs" -}}
{{- if or (eq (include "kinema.distillation" .) "true") (eq (include "kinema.fitting" .) "true") -}}
true
{{- end -}}
{{- end -}}

{{/* Where the worker holds the model repository (KINEMA_MODELS) and its scratch folder (KINEMA_DISTILL_DIR). */}}
{{- define "kinema.distillModelsDir" -}}/var/lib/kinema/models{{- end -}}
{{- define "kinema.distillScratchDir" -}}/var/lib/kinema/distill{{- end -}}

{{/* The worker's distillation settings, as `kinema stack up` gives them (stack.py). */}}
{{- define "kinema.distillationWorkerEnv" -}}
- name: KINEMA_TRITON_URL
  value: {{ include "kinema.tritonUrl" . | quote }}
- name: KINEMA_MODELS
  value: {{ include "kinema.distillModelsDir" . | quote }}
- name: KINEMA_DISTILL_DIR
  value: {{ include "kinema.distillScratchDir" . | quote }}
{{- end -}}

{{- define "kinema.distillationMounts" -}}
- name: distill-models
  mountPath: {{ include "kinema.distillModelsDir" . }}
  readOnly: true
  {{- if and .Values.distillation.models.existingClaim .Values.distillation.models.subPath }}
  subPath: {{ .Values.distillation.models.subPath }}
  {{- end }}
- name: distill-scratch
  mountPath: {{ include "kinema.distillScratchDir" . }}
{{- end -}}

{{- define "kinema.distillScratchClaim" -}}
{{- $p := .Values.distillation.scratch.persistence -}}
{{- $p.existingClaim | default (printf "%s-distill" (include "kinema.componentName" (dict "ctx" . "component" "worker"))) -}}
{{- end -}}

{{- define "kinema.distillationVolumes" -}}
{{- $d := .Values.distillation -}}
- name: distill-models
  {{- if $d.models.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ $d.models.existingClaim }}
    readOnly: true
  {{- else }}
  emptyDir:
    sizeLimit: {{ $d.models.sizeLimit }}
  {{- end }}
- name: distill-scratch
  {{- if $d.scratch.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "kinema.distillScratchClaim" . }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ $d.scratch.sizeLimit }}
  {{- end }}
{{- end -}}

{{/* The init container that gives the worker a copy of the repository Triton serves, from the same source: the
     Triton image's folder (triton.modelRepository.source=image), or its bucket and prefix (source=s3; kinema's
     loaders read local paths only, so the worker image copies them with `python -m kinema.storage.model_repository`,
     given Triton's own --model-repository argument and S3 keys). */}}
{{- define "kinema.distillationInitContainer" -}}
{{- $t := .Values.triton -}}
{{- $dir := include "kinema.distillModelsDir" . -}}
- name: models
  {{- if eq $t.modelRepository.source "s3" }}
  image: {{ include "kinema.image" (dict "ctx" . "image" .Values.worker.image) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - python
    - -m
    - kinema.storage.model_repository
    - --model-repository=s3://{{ include "kinema.s3Endpoint" . }}/{{ $t.modelRepository.bucket }}/{{ $t.modelRepository.prefix }}
    - {{ $dir }}
    - --secure
    - {{ include "kinema.s3Secure" . | quote }}
  env:
    - name: AWS_ACCESS_KEY_ID
      valueFrom:
        secretKeyRef:
          name: {{ include "kinema.s3SecretName" . }}
          key: {{ include "kinema.s3AccessKeyKey" . }}
    - name: AWS_SECRET_ACCESS_KEY
      valueFrom:
        secretKeyRef:
          name: {{ include "kinema.s3SecretName" . }}
          key: {{ include "kinema.s3SecretKeyKey" . }}
    - name: AWS_DEFAULT_REGION
      value: {{ .Values.artifacts.region | default "us-east-1" | quote }}
  {{- else }}
  image: {{ include "kinema.image" (dict "ctx" . "image" $t.image) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["cp", "-R", "{{ $t.modelRepository.path }}/.", "{{ $dir }}/"]
  {{- end }}
  resources:
    {{- toYaml .Values.distillation.models.resources | nindent 4 }}
  securityContext:
    {{- include "kinema.containerSecurityContext" . | nindent 4 }}
  volumeMounts:
    {{- include "kinema.tmpMount" . | nindent 4 }}
    - name: distill-models
      mountPath: {{ $dir }}
{{- end -}}

{{/* A gRPC server's own address and /metrics, as ServiceProcess starts it (on every address in a pod). */}}
{{- define "kinema.serverEnv" -}}
- name: KINEMA_HOST
  value: "0.0.0.0"
- name: KINEMA_PORT
  value: {{ include "kinema.grpcPort" . | quote }}
{{ include "kinema.metricsEnv" . }}
{{- end -}}

{{/* /metrics of a process on KINEMA_METRICS_PORT: every gRPC server, and the job worker (kinema.jobs.metrics). */}}
{{- define "kinema.metricsEnv" -}}
- name: KINEMA_METRICS_PORT
  value: {{ include "kinema.metricsPort" . | quote }}
{{- end -}}

{{/* Extra settings from a component's `env` map, in a stable order. */}}
{{- define "kinema.extraEnv" -}}
{{- range $key, $value := . }}
- name: {{ $key }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{/* The volumes every Kinema container mounts: a writable /tmp beside the read-only root filesystem. */}}
{{- define "kinema.tmpVolume" -}}
- name: tmp
  emptyDir: {}
{{- end -}}
{{- define "kinema.tmpMount" -}}
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* A peer selecting one component's pods. */}}
{{- define "kinema.peer" -}}
- podSelector:
    matchLabels:
      {{- include "kinema.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* A model service calls Triton (KINEMA_BACKEND=triton, KINEMA_TRITON_URL), as `kinema stack up` starts it. */}}
{{- define "kinema.modelServiceEnv" -}}
- name: KINEMA_BACKEND
  value: triton
- name: KINEMA_TRITON_URL
  value: {{ include "kinema.tritonUrl" . | quote }}
- name: KINEMA_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: OMP_NUM_THREADS
  value: "1"
{{- end -}}

{{/* The prompt length limit (KINEMA_MAX_PROMPT_CHARS) where prompts enter: the orchestrator and the text_encoder
     service, one value for both so that neither refuses what the other took. */}}
{{- define "kinema.promptLimitEnv" -}}
- name: KINEMA_MAX_PROMPT_CHARS
  value: {{ .Values.maxPromptChars | int64 | quote }}
{{- end -}}

{{/* The scaled components (HPA, PDB) as JSON: name -> its values. */}}
{{- define "kinema.scaledComponents" -}}
{{- $out := dict "triton" .Values.triton "orchestrator" .Values.orchestrator -}}
{{- range $name, $svc := .Values.services }}
{{- if $svc.enabled }}
{{- $_ := set $out $name $svc -}}
{{- end }}
{{- end }}
{{- if .Values.jobs.enabled }}
{{- $_ := set $out "worker" .Values.worker -}}
{{- end }}
{{- toJson $out -}}
{{- end -}}

{{/* Every component that runs a pod, as a JSON list. */}}
{{- define "kinema.components" -}}
{{- $out := keys (include "kinema.scaledComponents" . | fromJson) -}}
{{- if .Values.minio.enabled }}{{ $out = append $out "minio" }}{{ end -}}
{{- if and .Values.jobs.enabled .Values.redis.enabled }}{{ $out = append $out "redis" }}{{ end -}}
{{- toJson (sortAlpha $out) -}}
{{- end -}}

{{/* NetworkPolicy rules shared by several components. */}}
{{- define "kinema.metricsIngress" -}}
- ports:
    - port: {{ .port }}
      protocol: TCP
  {{- with .ctx.Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- else }}
  from:
    - namespaceSelector: {}
  {{- end }}
{{- end -}}

{{- define "kinema.externalPeers" -}}
{{- range $i, $cidr := .Values.networkPolicy.externalCidrs }}
{{- if $i }}{{ "\n" }}{{ end -}}
- ipBlock:
    cidr: {{ $cidr }}
{{- end }}
{{- end -}}

{{- define "kinema.s3Egress" -}}
{{- if .Values.minio.enabled -}}
- to:
    {{- include "kinema.peer" (dict "ctx" . "component" "minio") | nindent 4 }}
  ports:
    - port: {{ include "kinema.minioPort" . }}
      protocol: TCP
{{- else -}}
{{- $endpoint := include "kinema.s3Endpoint" . -}}
{{- $port := ternary (last (splitList ":" $endpoint)) (ternary "443" "80" .Values.artifacts.secure) (contains ":" $endpoint) -}}
- to:
    {{- include "kinema.externalPeers" . | nindent 4 }}
  ports:
    - port: {{ $port }}
      protocol: TCP
{{- end -}}
{{- end -}}

{{- define "kinema.redisEgress" -}}
{{- if .Values.redis.enabled -}}
- to:
    {{- include "kinema.peer" (dict "ctx" . "component" "redis") | nindent 4 }}
  ports:
    - port: {{ include "kinema.redisPort" . }}
      protocol: TCP
{{- else -}}
- to:
    {{- include "kinema.externalPeers" . | nindent 4 }}
  ports:
    - port: {{ .Values.networkPolicy.externalRedisPort }}
      protocol: TCP
{{- end -}}
{{- end -}}
