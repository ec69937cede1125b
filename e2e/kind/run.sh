#!/usr/bin/env bash
# The chart in a kind cluster, with the e2e suite against it (`make e2e-kind`; docs/deploy.md):
# build the images, create the cluster, load the images, install charts/kinema with the CPU profile, wait until
# every pod is ready, port-forward the orchestrator (and MinIO and each /metrics), run `pytest e2e`.
# On failure it collects pod state and logs under $KIND_LOGS. Without Docker or kind it stops, non-zero.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CLUSTER=${KIND_CLUSTER:-kinema-e2e}
NAMESPACE=${KINEMA_NAMESPACE:-kinema}
RELEASE=${KINEMA_RELEASE:-kinema}
IMAGE_PREFIX=${IMAGE_PREFIX:-kinema}
IMAGE_TAG=${IMAGE_TAG:-dev}
HELM=${HELM:-helm}
PYTHON=${PYTHON:-python3}
KIND_LOGS=${KIND_LOGS:-$ROOT/runs/kind-e2e}
KEEP_CLUSTER=${KEEP_CLUSTER:-0}
WAIT_TIMEOUT=${WAIT_TIMEOUT:-900s}
IMAGES=(text_encoder autoencoder denoiser distill depth interpret orchestrator worker triton)
FORWARDS=()

die() {
  echo "e2e/kind: $*" >&2
  exit 1
}

for tool in docker kind kubectl "$HELM" "$PYTHON"; do
  command -v "$tool" >/dev/null 2>&1 || die "'$tool' is not installed; kind e2e needs Docker, kind, kubectl and helm"
done
docker info >/dev/null 2>&1 || die "no Docker engine answers ('docker info' failed); kind e2e needs one"

collect_logs() {
  mkdir -p "$KIND_LOGS"
  echo "e2e/kind: collecting cluster state and logs in $KIND_LOGS" >&2
  kubectl -n "$NAMESPACE" get all,networkpolicy,pvc -o wide >"$KIND_LOGS/resources.txt" 2>&1 || true
  kubectl -n "$NAMESPACE" describe pods >"$KIND_LOGS/pods.txt" 2>&1 || true
  kubectl -n "$NAMESPACE" get events --sort-by=.lastTimestamp >"$KIND_LOGS/events.txt" 2>&1 || true
  local pod
  for pod in $(kubectl -n "$NAMESPACE" get pods -o name 2>/dev/null); do
    kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix >"$KIND_LOGS/${pod#pod/}.log" 2>&1 || true
    kubectl -n "$NAMESPACE" logs "$pod" --all-containers --prefix --previous \
      >"$KIND_LOGS/${pod#pod/}.previous.log" 2>/dev/null || true
  done
  kind export logs "$KIND_LOGS/kind" --name "$CLUSTER" >/dev/null 2>&1 || true
}

cleanup() {
  local status=$?
  local pid
  for pid in "${FORWARDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  if [ "$status" -ne 0 ]; then
    collect_logs
  fi
  if [ "$KEEP_CLUSTER" != 1 ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$status"
}

# port_forward RESOURCE LOCAL:REMOTE: in the background until the script ends; waits until the local port answers.
port_forward() {
  local local_port=${2%%:*}
  kubectl -n "$NAMESPACE" port-forward "$1" "$2" >>"$KIND_LOGS/port-forward.log" 2>&1 &
  FORWARDS+=("$!")
  local _
  for _ in $(seq 1 60); do
    if (echo >"/dev/tcp/127.0.0.1/$local_port") 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  die "port-forward $1 $2 did not come up"
}

echo "e2e/kind: building images ($IMAGE_PREFIX/*:$IMAGE_TAG)"
make -C "$ROOT" images IMAGE_PREFIX="$IMAGE_PREFIX" IMAGE_TAG="$IMAGE_TAG"

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  die "a kind cluster named $CLUSTER exists already; delete it or set KIND_CLUSTER"
fi
trap cleanup EXIT
mkdir -p "$KIND_LOGS"
echo "e2e/kind: creating cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config "$ROOT/e2e/kind/cluster.yaml" --wait 120s
for image in "${IMAGES[@]}"; do
  kind load docker-image --name "$CLUSTER" "$IMAGE_PREFIX/$image:$IMAGE_TAG"
done

echo "e2e/kind: installing the chart (ci/cpu-values.yaml)"
"$HELM" upgrade --install "$RELEASE" "$ROOT/charts/kinema" --namespace "$NAMESPACE" --create-namespace \
  -f "$ROOT/charts/kinema/ci/cpu-values.yaml" \
  --set "image.tag=$IMAGE_TAG" \
  --wait --timeout "$WAIT_TIMEOUT"
kubectl -n "$NAMESPACE" wait --for=condition=Ready pod -l "app.kubernetes.io/instance=$RELEASE" --timeout "$WAIT_TIMEOUT"

name="$RELEASE-kinema"
if [[ $RELEASE == *kinema* ]]; then
  name=$RELEASE
fi
port_forward "svc/$name-orchestrator" 50050:50051
port_forward "svc/$name-minio" 9000:9000 # presigned URLs name 127.0.0.1:9000 (artifacts.publicEndpoint)
port_forward "svc/$name-orchestrator" 19100:9100
port_forward "svc/$name-text-encoder" 19101:9100
port_forward "svc/$name-autoencoder" 19102:9100
port_forward "svc/$name-denoiser" 19103:9100
port_forward "svc/$name-depth" 19104:9100
port_forward "svc/$name-worker" 19105:9100
port_forward "svc/$name-interpret" 19106:9100
port_forward "svc/$name-distill" 19107:9100
port_forward "svc/$name-triton" 18002:8002

export KINEMA_E2E_ADDRESS=127.0.0.1:50050
metrics="orchestrator=http://127.0.0.1:19100/metrics,text_encoder=http://127.0.0.1:19101/metrics"
metrics+=",autoencoder=http://127.0.0.1:19102/metrics,denoiser=http://127.0.0.1:19103/metrics"
metrics+=",depth=http://127.0.0.1:19104/metrics,worker=http://127.0.0.1:19105/metrics"
metrics+=",interpret=http://127.0.0.1:19106/metrics,distill=http://127.0.0.1:19107/metrics"
metrics+=",triton=http://127.0.0.1:18002/metrics"
export KINEMA_E2E_METRICS=$metrics
echo "e2e/kind: running the e2e suite against $KINEMA_E2E_ADDRESS"
cd "$ROOT"
"$PYTHON" -m pytest e2e -q -p no:cacheprovider
