"""Running an iterator ahead of its consumer in a thread.

``read_ahead(items, depth)`` yields what ``items`` yields, produced by a thread at most
``depth`` items ahead, so that producing the next items (forward passes, reading and pinning
rows) overlaps what the consumer does with this one (writing a shard, a GPU step). Errors
raised by the producer reach the consumer where it reads the next item; a consumer that stops
early (``close()``, an exception, garbage collection) stops the thread. ``prepare`` runs on
each item in the thread (e.g. copying rows into pinned memory). On a GPU the thread works
with ``device`` current; it keeps the caller's grad and inference modes (they are per thread).

It imports torch only.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_DONE = object()


def read_ahead(
    items: Iterable[T],
    depth: int,
    *,
    device: torch.device | None = None,
    prepare: Callable[[T], T] | None = None,
    name: str = "interpq-read-ahead",
) -> Iterator[T]:
    """``items``, produced by a thread at most ``depth`` ahead of the consumer."""
    out: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def produce() -> None:
        try:
            cuda = device is not None and device.type == "cuda"
            with (
                torch.cuda.device(device) if cuda else contextlib.nullcontext(),
                torch.inference_mode(inference),  # the caller's autograd modes (per thread)
                torch.set_grad_enabled(grad),
            ):
                for item in items:
                    if prepare is not None:
                        item = prepare(item)
                    while not stop.is_set():
                        try:
                            out.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            out.put(_DONE)
        except BaseException as exc:  # noqa: BLE001  (handed to the consumer)
            out.put(exc)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # let a blocked put return
            with contextlib.suppress(queue.Empty):
                out.get(timeout=0.05)
        thread.join()
