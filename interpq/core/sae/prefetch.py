"""Batches read ahead in background threads and copied to the device without stalling it.

``Prefetcher(fill, ...)`` calls ``fill(position, out)`` for positions ``start, start+1, ...``
in ``n_threads`` daemon threads, each writing one batch into a slot of a small ring of host
buffers (pinned when the device is CUDA), at most ``n_slots`` batches ahead of the
consumer. ``get(position)`` hands batches out strictly in order:

- on CUDA, the host slot is copied to the device on a side stream (``non_blocking``, from
  pinned memory, so the call returns at once), the compute stream waits for that copy only,
  and the conversion to the training dtype runs on the GPU (a float16 store crosses PCIe at
  half the bytes). The copy of batch ``p + 1`` is issued as batch ``p`` is handed out, so it
  overlaps the step that trains on ``p``; a slot is refilled only after its copy finished;
- elsewhere, the slot is converted into a fresh tensor on the calling thread.

What is read does not depend on the threads: ``fill`` is a pure function of the position,
so a prefetched run sees exactly the batches an unprefetched one does.

This module knows nothing about datasets or SAEs: it moves ``[rows, d]`` batches.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor

Fill = Callable[[int, Tensor], None]
"""``fill(position, out)``: write batch ``position`` into ``out`` [batch_size, d] (host)."""


class Prefetcher:
    """In-order batches from ``fill``, read ahead by background threads."""

    def __init__(
        self,
        fill: Fill,
        shape: tuple[int, int],
        host_dtype: torch.dtype,
        device: torch.device,
        dtype: torch.dtype,
        start: int,
        *,
        n_slots: int = 4,
        n_threads: int = 2,
    ) -> None:
        if n_slots < 2:
            raise ValueError(f"a prefetch ring needs at least 2 slots, got {n_slots}")
        self.fill, self.device, self.dtype = fill, device, dtype
        self.n_slots = n_slots
        cuda = device.type == "cuda"
        self.slots = [torch.empty(shape, dtype=host_dtype, pin_memory=cuda) for _ in range(n_slots)]
        self.cond = threading.Condition()
        self.next_to_fill = start
        """The next position a thread will claim."""
        self.consumed = start
        """Positions below this are handed out (their slot may be reused once copied)."""
        self.ready: set[int] = set()
        self.copied: dict[int, torch.cuda.Event | None] = {}
        """Per slot: the event that marks its last host-to-device copy done."""
        self.error: BaseException | None = None
        self.closed = False
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        self.pending: tuple[int, Tensor, torch.cuda.Event] | None = None
        """CUDA: the next batch, already on its way to the device."""
        self.threads = [
            threading.Thread(target=self._work, name=f"interpq-prefetch-{i}", daemon=True)
            for i in range(min(n_threads, n_slots - 1))
        ]
        for t in self.threads:
            t.start()

    # ------------------------------------------------------------------ consumer
    def get(self, position: int) -> Tensor:
        """Batch ``position`` on the device as ``dtype``; positions must come in order."""
        if self.stream is None:
            slot = self._wait_ready(position)
            out = self.slots[slot].to(dtype=self.dtype, copy=True)
            self._release(position)
            return out
        if self.pending is None or self.pending[0] != position:
            self.pending = self._copy_to_device(position)
        _, dev, copied = self.pending
        current = torch.cuda.current_stream(self.device)
        current.wait_event(copied)
        dev.record_stream(current)  # allocated on the side stream, used on this one
        out = dev.to(self.dtype)
        self.pending = self._copy_to_device(position + 1)
        return out

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for t in self.threads:
            t.join(timeout=10)

    def _copy_to_device(self, position: int) -> tuple[int, Tensor, torch.cuda.Event]:
        assert self.stream is not None
        slot = self._wait_ready(position)
        with torch.cuda.stream(self.stream):
            dev = self.slots[slot].to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        with self.cond:
            self.copied[slot] = done
        self._release(position)
        return position, dev, done

    def _wait_ready(self, position: int) -> int:
        with self.cond:
            while position not in self.ready:
                if self.error is not None:
                    raise self.error
                if self.closed:
                    raise RuntimeError("the prefetcher is closed")
                self.cond.wait()
            self.ready.discard(position)
        return position % self.n_slots

    def _release(self, position: int) -> None:
        with self.cond:
            self.consumed = max(self.consumed, position + 1)
            self.cond.notify_all()

    # ------------------------------------------------------------------- threads
    def _work(self) -> None:
        try:
            while True:
                with self.cond:
                    # claim the next position once its slot's previous batch is handed out
                    while not self.closed and self.next_to_fill >= self.consumed + self.n_slots:
                        self.cond.wait()
                    if self.closed:
                        return
                    position = self.next_to_fill
                    self.next_to_fill += 1
                    copied = self.copied.pop(position % self.n_slots, None)
                if copied is not None:
                    copied.synchronize()  # the slot's last copy to the device has finished
                self.fill(position, self.slots[position % self.n_slots])
                with self.cond:
                    self.ready.add(position)
                    self.cond.notify_all()
        except BaseException as exc:  # handed to the consumer, which raises it
            with self.cond:
                self.error = exc
                self.cond.notify_all()
