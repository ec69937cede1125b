#!/usr/bin/env bash
# The e2e suite against a local stack started for it (`make e2e`): `kinema stack up` in a run folder of its own, the
# suite pointed at the stack's orchestrator and metrics endpoints, and the stack stopped again whatever happens.
# Extra arguments go to pytest (e.g. `make e2e ARGS="-k jobs"`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
RUN_DIR=${KINEMA_E2E_RUN_DIR:-runs/e2e-stack}

"$BIN/kinema" stack down --run-dir "$RUN_DIR" >/dev/null  # a stack a killed run left behind
trap '"$BIN/kinema" stack down --run-dir "$RUN_DIR"' EXIT
"$BIN/kinema" stack up --run-dir "$RUN_DIR" --port 0

# The orchestrator's address and every service's metrics endpoint, as the stack recorded them.
read -r address metrics < <("$BIN/python" - "$RUN_DIR/stack.json" <<'PY'
import json, sys
state = json.load(open(sys.argv[1]))
print(state["orchestrator"], ",".join(f"{name}={url}" for name, url in state["metrics"].items()))
PY
)
export KINEMA_E2E_ADDRESS=$address KINEMA_E2E_METRICS=$metrics
echo "e2e against $KINEMA_E2E_ADDRESS (logs in $RUN_DIR/logs)"
"$BIN/python" -m pytest e2e -q -p no:cacheprovider "$@"
