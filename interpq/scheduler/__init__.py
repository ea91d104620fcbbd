"""The submitter side: ``Client``, ``Batch``, batch files, publishing and dependencies."""

from interpq.scheduler.batch import Batch, BatchStatus, JobResult, LatencyRow
from interpq.scheduler.client import Client, load_batch_file

__all__ = ["Batch", "BatchStatus", "Client", "JobResult", "LatencyRow", "load_batch_file"]
