"""Entry points for one machine: the embedded stack (``interpq up``: Redis, workers, Flower,
the local provider) and the demo batch.

Starts processes and submits through ``scheduler``; nothing in the library imports it.
"""
