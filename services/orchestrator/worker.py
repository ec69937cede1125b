"""The orchestrator's job worker: a Celery worker running `kinema.orchestration.worker`'s task.

    python -m services.orchestrator.worker [celery worker options]
    celery -A services.orchestrator.worker:app worker --pool=threads   # the same

It reads the orchestrator's settings (`KINEMA_*`, docs/jobs.md) from the environment. The pool is `threads` unless
told otherwise: prefork deadlocks once torch ran in the parent (RECIPES.md), and threads keep the worker answering
revokes while jobs run. A job's calls reach the model services with the job id as their request id.
"""

from __future__ import annotations

import sys

from kinema.jobs.metrics import serve_worker_metrics
from kinema.orchestration.settings import OrchestratorSettings
from kinema.orchestration.worker import make_job_app

settings = OrchestratorSettings.from_env()
app = make_job_app(settings)
metrics = serve_worker_metrics(app, settings.service)  # /metrics on KINEMA_METRICS_PORT once the worker starts


def main(argv: list[str]) -> None:
    defaults = ["--pool=threads", "--concurrency=2", "--without-gossip", "--without-mingle"]
    given = {a.split("=", 1)[0] for a in argv}
    options = [d for d in defaults if d.split("=", 1)[0] not in given]
    app.worker_main(["worker", f"--loglevel={settings.service.log_level}", *options, *argv])


if __name__ == "__main__":
    main(sys.argv[1:])
