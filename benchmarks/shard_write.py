"""How much of a shard's writing stays on an extraction's critical path, side by side.

Batches of rows arrive as ``interpq.core.extraction.extract`` hands them out: forward i is
queued, batch i-1 is handed out when its forward is done, and a forward of ``--forward-ms``
(a stand-in for the GPU's) runs back to back with the others whenever it is queued. The
shard is written through ``FileStore.put_atomic`` by:

- ``write_shard`` (now): rows ``pwrite``n as they come, the sha256 computed by a trailing
  thread over the final prefix of the file, writeback started as it goes;
- the method before issue 14's second pass (kept here as the baseline): rows written into a
  memory map, ``msync``, ``fsync``, then the whole file read back for its sha256.

Reported: the time beyond the forwards (what writing adds to an extraction).

    python benchmarks/shard_write.py --texts 2048 --dtype float16
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from interpq.store.artifacts import FileStore  # noqa: E402
from interpq.store.shards import META_COLUMNS, SHARD_FORMAT, shard_writer, write_shard  # noqa: E402


@dataclass
class Batch:
    text_index: list[int]
    rows_per_text: list[int]
    acts: dict[str, np.ndarray]
    positions: np.ndarray
    token_ids: np.ndarray


def batches(args: argparse.Namespace, block: np.ndarray) -> Iterator[Batch]:
    """Batches handed out as ``extract`` pipelines them (see the module docstring)."""
    B, T, fwd = args.batch, args.tokens, args.forward_ms / 1e3

    def batch(lo: int) -> Batch:
        return Batch(list(range(lo, lo + B)), [T] * B, {"h": block},
                     np.tile(np.arange(T), B), np.zeros(B * T, np.int64))  # fmt: skip

    end_prev = None
    for lo in range(0, args.texts, B):
        start = time.perf_counter() if end_prev is None else max(end_prev, time.perf_counter())
        end_i = start + fwd
        if end_prev is not None:
            time.sleep(max(0.0, end_prev - time.perf_counter()))
            yield batch(lo - B)
        end_prev = end_i
    assert end_prev is not None
    time.sleep(max(0.0, end_prev - time.perf_counter()))
    yield batch(args.texts - B)


def memmap_then_hash(path: Path, args: argparse.Namespace, feed: Iterator[Batch]) -> None:
    """The baseline: rows into a memory map; put_atomic fsyncs and reads the file back."""
    T, n_rows = args.tokens, args.texts * args.tokens
    tensors = {"h": (args.dtype, (n_rows, args.d))} | {
        c: ("int32", (n_rows,)) for c in META_COLUMNS
    }
    with shard_writer(path, tensors, {"format": SHARD_FORMAT, "cache_key": "k"}) as out:
        out["text_id"][:] = np.repeat(np.arange(args.texts, dtype=np.int32), T)
        for b in feed:
            for j, t in enumerate(b.text_index):
                out["h"][t * T : (t + 1) * T] = b.acts["h"][j * T : (j + 1) * T]
                out["position"][t * T : (t + 1) * T] = b.positions[j * T : (j + 1) * T]
                out["token_id"][t * T : (t + 1) * T] = b.token_ids[j * T : (j + 1) * T]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=128, help="tokens (rows) per text")
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--batch", type=int, default=64, help="texts per batch")
    p.add_argument("--forward-ms", type=float, default=45.0, help="one batch's forward")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tmp", default=None)
    args = p.parse_args()
    block = np.random.default_rng(0).standard_normal((args.batch * args.tokens, args.d))
    block = block.astype(args.dtype)
    columns = {"position": np.tile(np.arange(args.tokens), args.texts),
               "token_id": np.zeros(args.texts * args.tokens, np.int64)}  # fmt: skip
    store = FileStore(tempfile.mkdtemp(prefix="shard-write-", dir=args.tmp))
    n_batches = args.texts // args.batch
    forwards = n_batches * args.forward_ms / 1e3

    def ours(tmp: Path) -> object:
        return write_shard(tmp, widths={"h": args.d}, rows_per_text=[args.tokens] * args.texts,
                           batches=batches(args, block), dtype=args.dtype,
                           metadata={"cache_key": "k"}, columns=columns)  # fmt: skip

    def before(tmp: Path) -> None:
        memmap_then_hash(tmp, args, batches(args, block))

    best = {"write_shard (pwrite, trailing sha256)": 1e9, "memmap, fsync, sha256 re-read": 1e9}
    for r in range(args.repeats):
        for name, fn in zip(best, (ours, before), strict=True):
            t0 = time.perf_counter()
            stored = store.put_atomic(store.uri_for(f"{r}-{len(name)}.safetensors"), fn)
            best[name] = min(best[name], time.perf_counter() - t0)
            store.delete(stored.uri)
    mb = args.texts * args.tokens * args.d * np.dtype(args.dtype).itemsize / 1e6
    print(f"{mb:.0f} MB of {args.dtype} rows, {n_batches} batches x {args.forward_ms:g} ms of "
          f"forward ({forwards:.2f} s), best of {args.repeats}")  # fmt: skip
    print("| writer | total s | beyond the forwards s | forwards / total |\n|---|---:|---:|---:|")
    for name, s in best.items():
        print(f"| {name} | {s:.2f} | {s - forwards:.2f} | {forwards / s:.1%} |")


if __name__ == "__main__":
    main()
