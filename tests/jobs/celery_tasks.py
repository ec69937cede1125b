"""Jobs for tests/jobs: the worker imports this module as `celery_tasks:app`; clients send by task name.

`counter` arguments name a Redis key each run increments, so a test can count how often a job ran.
"""

import os
import time

from kinema.errors import Unavailable
from kinema.jobs.celery_app import make_celery

# The URLs come from CELERY_BROKER_URL / CELERY_RESULT_BACKEND, which CeleryWorker sets.
app = make_celery(visibility_timeout=float(os.environ.get("KINEMA_TEST_VISIBILITY_TIMEOUT", "3600")))


def _count(counter: str | None) -> int:
    return int(app.backend.client.incr(counter)) if counter else 0


@app.task(name="kinema_test.add")
def add(a: int, b: int) -> int:
    return a + b


@app.task(bind=True, name="kinema_test.steps")
def steps(self, n: int, dt: float, counter: str | None = None) -> int:
    """`n` steps of `dt` s; reports progress and stops when cancelled."""
    _count(counter)
    for i in range(n):
        self.raise_if_cancelled()
        self.progress(i, n, note="stepping")
        time.sleep(dt)
    return n


@app.task(bind=True, name="kinema_test.sleep_blind")
def sleep_blind(self, seconds: float, counter: str | None = None) -> float:
    """Sleeps without ever checking for cancellation: only a terminate can stop it."""
    _count(counter)
    self.progress(0, 1)
    time.sleep(seconds)
    return seconds


@app.task(bind=True, name="kinema_test.flaky", max_retries=2, retry_backoff=False, retry_kwargs={"countdown": 0.05})
def flaky(self, failures: int, counter: str) -> dict:
    """Fails with a transient error on its first `failures` runs."""
    attempt = _count(counter)
    if attempt <= failures:
        raise Unavailable(f"transient: the store is down (attempt {attempt})")
    return {"attempt": attempt, "retries": self.request.retries}
