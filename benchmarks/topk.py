"""Per-row top-k of a TopK SAE batch on CUDA: interpq's Triton kernel vs ``torch.topk``.

The [batch, d_sae] pre-activations of the SAE benchmark (4096 × 24576, k = 32), in bf16 (as
under autocast) and fp32. Both run side by side in one process on the same tensors, timed
with CUDA events over many calls after warm-up; the kernel's result is checked against
``torch.topk`` first (same values, indices pointing at them).

    python benchmarks/topk.py                        # the SAE benchmark's shape
    python benchmarks/topk.py --rows 4096 --cols 131072 --k 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sae_train import import_bypassing_init  # noqa: E402


def time_ms(fn, iters: int) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=24576)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument(
        "--variants",
        default="",
        help="comma-separated CHUNK:NUM_WARPS variants to try as well (tuning), e.g. 32:4,64:2",
    )
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    tk = import_bypassing_init("interpq", "interpq.core.sae.triton_topk")
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(args.rows, args.cols, device="cuda", generator=g)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"rows {args.rows}, cols {args.cols}, k {args.k}")
    print(f"{'dtype':>9} {'kernel':>24} {'ms/call':>9} {'GB/s read':>10} {'speed-up':>9}")
    for dtype in (torch.bfloat16, torch.float32):
        x = base.to(dtype)
        if not tk.supports(x, args.k):
            print(f"{dtype}: the Triton kernel does not apply to this shape")
            continue
        values, indices = tk.row_topk(x, args.k)
        expected = x.topk(args.k, dim=-1).values
        assert torch.equal(torch.sort(values, -1, descending=True).values, expected)
        assert torch.equal(x.gather(1, indices), values)
        gbytes = x.numel() * x.element_size() / 1e9
        ref = time_ms(lambda x=x: x.topk(args.k, dim=-1, sorted=False), args.iters)
        variants = [("interpq row_topk", {})]
        for spec in filter(None, args.variants.split(",")):
            chunk, warps = spec.split(":")
            options = {"chunk": int(chunk), "num_warps": int(warps)}
            variants.append((spec, options))
        name = str(dtype).removeprefix("torch.")
        print(f"{name:>9} {'torch.topk':>24} {ref:9.3f} {gbytes / ref * 1e3:10.0f} {1:9.2f}x")
        for label, options in variants:
            ms = time_ms(lambda x=x, o=options: tk.row_topk(x, args.k, **o), args.iters)
            print(f"{name:>9} {label:>24} {ms:9.3f} {gbytes / ms * 1e3:10.0f} {ref / ms:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
