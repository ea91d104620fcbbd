"""``interpq.core.readahead``: an iterator run ahead of its consumer in a thread."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from interpq.core.readahead import read_ahead


def _threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "interpq-read-ahead"]


def test_items_in_order_prepared_in_the_thread_with_the_callers_autograd_modes() -> None:
    def items():
        for i in range(10):
            yield {"i": i, "grad": torch.is_grad_enabled(),
                   "inference": torch.is_inference_mode_enabled()}  # fmt: skip

    seen = []

    def prepare(item):
        seen.append(threading.current_thread().name)
        return {**item, "prepared": True}

    with torch.no_grad():
        got = list(read_ahead(items(), 3, prepare=prepare))
    assert [g["i"] for g in got] == list(range(10)) and all(g["prepared"] for g in got)
    assert not any(g["grad"] for g in got) and set(seen) == {"interpq-read-ahead"}
    with torch.inference_mode():
        assert all(g["inference"] for g in read_ahead(items(), 2))
    assert all(g["grad"] and not g["inference"] for g in read_ahead(items(), 2))
    assert not _threads()


def test_the_producers_error_reaches_the_consumer_after_the_items_before_it() -> None:
    def items():
        yield 1
        yield 2
        raise OSError("shard 3 unreadable")

    got = []
    with pytest.raises(OSError, match="shard 3 unreadable"):
        for x in read_ahead(items(), 4):
            got.append(x)
    assert got == [1, 2] and not _threads()


def test_a_consumer_that_stops_early_stops_the_thread_which_stops_producing() -> None:
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    it = read_ahead(items(), 2)
    assert next(it) == 0
    time.sleep(0.3)  # the thread fills the queue, then waits
    it.close()
    assert not _threads()
    assert len(made) <= 5  # depth 2: one consumed, two queued, one waiting to be put
