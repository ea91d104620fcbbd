"""The worker side: Celery tasks, the part lifecycle (claim, run, complete, fail, release
dependents) and one runner module per job kind (``runners``).

Knows the queue, storage, providers and core below it; never imports the submitter side
(``scheduler``) or the entry points.
"""
