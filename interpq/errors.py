"""Every exception interpq raises on purpose, in one tree.

::

    InterpqError                      base; str(exc) is one line a user can act on
    ├── ConfigError                   settings or providers file wrong
    │   └── MissingApiKey             key env var unset or a placeholder (names the variable)
    ├── SpecError                     a job spec or batch refused at submit (names the field)
    ├── EnqueueError                  the broker refused the batch; nothing was enqueued
    └── JobError                      raised inside a job; becomes the job's ``error``
        ├── PermanentJobError         do not retry: bad key, 4xx, missing layer, budget exceeded
        ├── RetryableJobError         retry with backoff: timeouts, 429, 5xx, malformed JSON
        ├── YieldTurn                 not an error: the part goes to the back of its queue
        └── JobCancelled              not an error: the job was cancelled; the part stops

Third-party exceptions are translated at the boundary (``raise X(...) from exc``), so a job's
stored error is always one of these, one line, never a traceback.
"""

from __future__ import annotations


class InterpqError(Exception):
    """Base of all interpq errors. The message is one line that says what to do."""


class ConfigError(InterpqError):
    """The settings or the providers file are wrong."""


class MissingApiKey(ConfigError):
    """A provider's key is not in the environment, or is a placeholder."""

    def __init__(self, provider: str, env_var: str, placeholder: bool = False) -> None:
        self.provider = provider
        self.env_var = env_var
        what = "holds a placeholder value" if placeholder else "is not set"
        super().__init__(
            f"provider {provider!r} needs an API key: environment variable {env_var} {what}; "
            f"export {env_var}=<your key> (or put it in .env) where the workers and the submitter run"
        )


class SpecError(InterpqError):
    """A job spec or a batch is invalid; the message names the field."""


class EnqueueError(InterpqError):
    """The batch could not be handed to the broker; it was not enqueued."""


class JobError(InterpqError):
    """An error inside a job; its message is stored as the job's error."""

    retryable = False


class PermanentJobError(JobError):
    """Retrying would not help (bad key, bad request, missing layer, budget exceeded)."""


class RetryableJobError(JobError):
    """Transient: retry with backoff (timeout, connection error, 429, 5xx, malformed JSON)."""

    retryable = True

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class YieldTurn(JobError):
    """Raised by a runner after a turn of work: the part is sent to the back of its queue so
    parts of other batches get a worker (fairness); it continues where it stopped."""


class JobCancelled(JobError):
    """Raised by a runner at a turn or checkpoint when its job was cancelled meanwhile: the
    part stops there; the job keeps the reason its canceller stored."""
