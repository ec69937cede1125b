#!/usr/bin/env bash
# One lent-GPU session, run from the repository root on the GPU machine with `.gpu/` (from
# bench/gpu/pack.py) carried beside the tree and $OUT set:
#   1. the SD3-medium MMDiT step bench (bench/mmdit_gpu.py, bf16, 1024 px) beside diffusers;
#   2. the 'small' autoencoder, trained from scratch (kinema.train.autoencoder);
#   3. the 'tiny' denoiser, trained from scratch on that autoencoder's latents (kinema.train.flow).
# Each stage has its own time budget so the whole stays inside one 10-minute call, and a stage
# that fails leaves the others running. Weights come back split into 15 MB parts of models.tar.
# SMOKE=1 runs the same stages at toy sizes on a CPU, to check the script before a lease.
set -uo pipefail
export PYTHONUNBUFFERED=1
SITE=/tmp/kinema-site
MODELS=/tmp/kinema-models
RUNS=/tmp/kinema-runs
mkdir -p "$SITE" "$OUT/bench" "$RUNS"
exec > >(tee "$RUNS/train.log") 2>&1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu/wheels/*.whl \
  || echo "wheels not installed: the bench times kinema alone"
python3 bench/gpu/unpack.py "$SITE" || exit 1
export PYTHONPATH="$SITE:$PWD/.gpu/site:$PWD/shared"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu; W=2; BENCH="--device cpu --preset mini --latent 16 --tokens 16 --dtype fp32 --reps 2 --warmup 1"
  N=600; AE="--steps 20 --batch 8 --real-pool 64 --max-seconds 20"; FLOW="--steps 20 --batch 8 --max-seconds 15"
  T_BENCH=120; T_AE=200; T_FLOW=200
else
  DEV=cuda; W=15; BENCH=""
  N=160000; AE="--steps 20000 --batch 64 --real-pool 20000 --max-seconds ${AE_SECONDS:-130}"
  FLOW="--steps 200000 --batch 256 --lr 1e-3 --max-seconds ${FLOW_SECONDS:-160}"
  T_BENCH=90; T_AE=235; T_FLOW=225
fi

rm -rf "$MODELS" && mkdir -p "$MODELS" && cp -r models/vae_encoder models/vae_decoder models/denoiser "$MODELS"/
rm -f "$MODELS/denoiser/1/mmdit.safetensors"
date +%T
timeout "$T_BENCH" python3 bench/mmdit_gpu.py $BENCH --out "$OUT/bench" || echo "STAGE bench failed ($?)"
date +%T
timeout "$T_AE" python3 -m kinema.train.autoencoder --preset small --crop 64 --synthetic-pool "$N" $AE \
  --device "$DEV" --amp --workers "$W" --checkpoint-every 2000 --out "$RUNS/autoencoder" --export "$MODELS" \
  || echo "STAGE autoencoder failed ($?): the denoiser trains on the shipped autoencoder"
date +%T
python3 bench/gpu/unpack.py "$SITE" --check-captions .cache/kinema/world-train-"$N"-*.json || exit 1
timeout "$T_FLOW" python3 -m kinema.train.flow --preset tiny --samples "$N" $FLOW --models "$MODELS" \
  --device "$DEV" --amp --workers "$W" --checkpoint-every 5000 --snapshot-every 1000000 --out "$RUNS/denoiser" \
  --export "$MODELS" || echo "STAGE denoiser failed ($?)"
date +%T
tar -cf - -C "$MODELS" . | split -b 15M - "$OUT/models.tar.part-"
tar -czf "$OUT/logs.tgz" -C "$RUNS" --exclude='*.safetensors' .
ls -la "$OUT"
