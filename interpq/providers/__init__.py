"""Model APIs: the provider registry (``config``), the OpenAI-compatible HTTP client
(``openai_http``) and the local OpenAI-compatible server (``local``).

Adapters only: a call goes out and its outcome comes back as data or one of our errors.
Knows nothing of limiters, budgets, retries or the database (the worker's API-call policy
wraps these calls).
"""
