"""Background jobs: Celery with Redis as broker and result store (`celery_app`), and a real redis-server launcher."""
