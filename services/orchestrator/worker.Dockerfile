# kinema job worker: the orchestrator image running its Celery worker (services/orchestrator/worker.py) instead of
# the gRPC server. Build the orchestrator image first (`make images` does both):
#   docker build -f services/orchestrator/worker.Dockerfile --build-arg ORCHESTRATOR_IMAGE=kinema/orchestrator:dev \
#     -t kinema/worker:dev .
ARG ORCHESTRATOR_IMAGE=kinema/orchestrator:dev
FROM ${ORCHESTRATOR_IMAGE}
USER 10001
# As the local stack starts it (kinema.jobs.celery_app.CeleryWorker): the threads pool (prefork deadlocks once torch
# ran in the parent), no gossip or mingle; the node is kinema@<pod name>, which the chart's liveness probe pings.
CMD ["celery", "-A", "services.orchestrator.worker:app", "worker", "--pool=threads", "--concurrency=2", \
     "--hostname=kinema@%h", "--loglevel=INFO", "--without-gossip", "--without-mingle"]
