"""tests/jobs/celery_tasks.py's app with the worker metrics of kinema.jobs.metrics: the worker imports this module as
`metrics_tasks:app` and serves /metrics on KINEMA_METRICS_PORT, as services/orchestrator/worker.py does."""

from celery_tasks import app

from kinema.jobs.metrics import serve_worker_metrics
from kinema.rpc.settings import ServiceSettings

metrics = serve_worker_metrics(app, ServiceSettings.from_env())

__all__ = ["app", "metrics"]
