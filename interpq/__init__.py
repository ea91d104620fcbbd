"""interpq: a distributed job queue for batched interpretability experiments."""

__version__ = "0.1.0"
