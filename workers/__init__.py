"""Celery app, tasks, model cache, artifact store, progress and cancel. Imports ``models`` only."""
