"""Entry point: the ``interpq`` command (``interpq.cli.main``); ``python -m interpq.cli`` too.

Knows every layer below it and is imported by none of them.
"""

from interpq.cli.main import main

__all__ = ["main"]
