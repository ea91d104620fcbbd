"""A file's sha256 computed while the file is still being written, in a background thread.

A writer that fills a file out of order (rows of a shard land at their text's place as the
batches come) tells ``TrailingHasher`` how far the file is final (``advance(offset)``: no
byte before it will change again); the thread reads that prefix back from the page cache,
hashes it and asks the kernel to start writing it to disk (``sync_file_range``, Linux),
while the writer goes on. When the writer is done, ``finish(size)`` hashes what is left and
returns the digest, so neither the hashing nor most of the disk writes remain after the last
row: the caller's ``fsync`` finds little left to flush. ``hashlib`` and ``os.pread`` release
the GIL, so the thread runs beside the writer and the model.

This module knows bytes and file descriptors only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import threading
from typing import Any

CHUNK_BYTES = 4 << 20
"""Bytes read and hashed at a time."""
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Any:
    """libc's ``sync_file_range`` (start writeback of a byte range), or None off Linux."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_START_WRITEBACK = _sync_file_range()


class TrailingHasher:
    """sha256 of the file open at ``fd``, trailing its writer (see the module docstring)."""

    def __init__(self, fd: int, *, writeback: bool = True) -> None:
        self.fd = fd
        self.writeback = writeback and _START_WRITEBACK is not None
        self._digest = hashlib.sha256()
        self._done = 0  # bytes hashed
        self._final = 0  # bytes the writer says are final
        self._end: int | None = None  # the file's size, once the writer finished
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="trailing-sha256", daemon=True)
        self._thread.start()

    def advance(self, final_bytes: int) -> None:
        """The first ``final_bytes`` bytes of the file will not change again."""
        with self._cond:
            if final_bytes > self._final:
                self._final = final_bytes
                self._cond.notify()

    def finish(self, size: int) -> str:
        """The file is complete at ``size`` bytes: hash the rest, return the hex digest."""
        with self._cond:
            self._final = max(self._final, size)
            self._end = size
            self._cond.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._done == size, f"hashed {self._done} of {size} bytes"
        return self._digest.hexdigest()

    def abandon(self) -> None:
        """Stop the thread (the writer failed; the file is thrown away)."""
        with self._cond:
            self._end = -1
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._done >= self._final and self._end is None:
                        self._cond.wait()
                    if self._end == -1:
                        return
                    final, end = self._final, self._end
                self._hash_until(final)
                if end is not None and self._done >= end:
                    return
        except BaseException as exc:  # handed to the writer by finish()
            self._error = exc

    def _hash_until(self, final: int) -> None:
        start = self._done
        while self._done < final:
            data = os.pread(self.fd, min(CHUNK_BYTES, final - self._done), self._done)
            if not data:
                raise OSError(f"file ended at {self._done} bytes, expected {final}")
            self._digest.update(data)
            self._done += len(data)
        if self.writeback and self._done > start:
            _START_WRITEBACK(self.fd, start, self._done - start, _SYNC_FILE_RANGE_WRITE)
