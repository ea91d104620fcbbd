"""The science, pure: SAE training and metrics, activation patching, extraction math, model
layouts, latency statistics and text sources.

Imports torch, numpy and transformers' model classes, never Celery, SQLAlchemy, Redis, HTTP
clients or the environment: the library (``interpq.sae``, ``interpq.patching``) and a queued
job call the same functions with the same settings objects. Knows nothing of jobs, queues,
databases or where arrays are stored.
"""
