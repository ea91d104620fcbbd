"""interpq: a distributed job queue for batched interpretability experiments.

::

    from interpq import Client, Benchmark
    batch = Client().submit([Benchmark(provider="local", models=["all-MiniLM-L6-v2"],
                                       endpoint="embeddings", requests=50)], name="exp")
    batch.wait(progress=True)
    batch.results()
"""

from interpq.errors import (
    ConfigError,
    EnqueueError,
    InterpqError,
    JobError,
    MissingApiKey,
    PermanentJobError,
    RetryableJobError,
    SpecError,
)
from interpq.scheduler import Batch, BatchStatus, Client, JobResult, LatencyRow, load_batch_file
from interpq.specs import (
    BatchSpec,
    Benchmark,
    Explain,
    Extract,
    FeatureRecords,
    JobSpec,
    Noop,
    Patch,
    Ref,
    Score,
    TrainSAE,
)

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "BatchSpec",
    "BatchStatus",
    "Benchmark",
    "Client",
    "ConfigError",
    "EnqueueError",
    "Explain",
    "Extract",
    "FeatureRecords",
    "InterpqError",
    "JobError",
    "JobResult",
    "JobSpec",
    "LatencyRow",
    "MissingApiKey",
    "Noop",
    "Patch",
    "PermanentJobError",
    "Ref",
    "RetryableJobError",
    "Score",
    "SpecError",
    "TrainSAE",
    "load_batch_file",
]
