"""The queue both sides share: the Celery app, publishing job parts, Redis leases and the
global rate limiter.

The submitter (``scheduler``) publishes through it; workers (``worker``) run under its leases
and limiter. Knows job ids, parts and queues, never what a job kind does; task modules are
registered with the app by name (``include``), not imported.
"""
