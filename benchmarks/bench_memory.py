"""Peak GPU memory of ``measure`` on a ~1M-parameter convnet, by ``chunk_size``.

Run: ``python benchmarks/bench_memory.py --device cuda [--width 52] [--rows 1024]
[--chunks 16 64 256 0] [--dtype float64] [--no-tf32] [--memory-gib 16]`` (``0``: the
automatic chunk, a quarter of the free memory).  ``--memory-gib G`` emulates a GPU of ``G``
GiB: PyTorch's allocator is capped there (``set_per_process_memory_fraction``: more is an
out-of-memory error) and ``torch.cuda.mem_get_info``, from which perturb sizes its chunks
and its message cache, reports the free memory under that cap.

``smooth_convnet((1, 28, 28), 10, width=W)`` (``W = 52``: 1,027,530 parameters) at random
inputs, float32 by default; the 10 order-3 test-loss contractions of online SGD with the tuple
estimator.  For each chunk size: seconds, peak memory allocated by PyTorch above what the
model and data hold, and the largest relative difference of the values from the first
chunk size's, relative and in units of the standard error (the chunking must not change
them beyond rounding).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from perturb.experiments.models import smooth_convnet
from perturb.numeric.measuring import measure
from perturb.symbolic.schedules import Online


def _cap_memory(device: torch.device, gib: float) -> None:
    """Make this process see a GPU of ``gib`` GiB (allocator cap and reported free memory)."""
    limit = int(gib * 2**30)
    index = torch.cuda.current_device() if device.index is None else device.index
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), index)
    real = torch.cuda.mem_get_info

    def capped(dev=None):
        free, _ = real(dev)
        return min(free, limit - torch.cuda.memory_reserved(dev)), limit

    torch.cuda.mem_get_info = capped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--width", type=int, default=52)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--chunks", type=int, nargs="+", default=[16, 64, 256, 0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--no-tf32", action="store_true", help="full float32 convolutions (cuDNN allow_tf32 off)"
    )
    parser.add_argument("--memory-gib", type=float, default=None, help="emulate a smaller GPU")
    args = parser.parse_args()
    if args.memory_gib is not None:
        _cap_memory(torch.device(args.device), args.memory_gib)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    model = smooth_convnet((1, 28, 28), 10, width=args.width).to(device)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (args.rows,), generator=gen).to(device)
    schedule = Online(steps=100, batch_size=1)
    tf32 = "off" if args.no_tf32 else "PyTorch default"
    cap = "" if args.memory_gib is None else f", capped at {args.memory_gib:g} GiB"
    print(
        f"{params:,} parameters, {args.rows} rows, device {device}{cap}, {args.dtype}, "
        f"TF32 {tf32}\n"
    )
    print(
        "| chunk_size | seconds | peak extra memory (GiB) | max rel. diff. of values "
        "| max diff. / standard error |"
    )
    print("|---|---:|---:|---:|---:|")
    first = None
    for chunk in args.chunks:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        stats = measure(
            model,
            (x, y),
            order=3,
            schedules=schedule,
            dtype=dtype,
            chunk_size=chunk or None,
            progress=False,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
            # auto_chunk resets the peak statistics after its probes: read after the run
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
            torch.cuda.reset_peak_memory_stats()
        else:
            peak = float("nan")
        spent = time.perf_counter() - start
        values = {k: stats.value(k) for k in stats.contractions}
        errors = {k: stats.se(k) for k in stats.contractions}
        if first is None:
            first = values
        diff = max(
            float(np.max(np.abs(values[k] - first[k])) / max(np.max(np.abs(first[k])), 1e-30))
            for k in values
        )
        in_se = max(
            float(np.max(np.abs(values[k] - first[k]) / np.maximum(errors[k], 1e-300)))
            for k in values
        )
        label = chunk if chunk else "auto"
        print(f"| {label} | {spent:.2f} | {peak:.2f} | {diff:.1e} | {in_se:.1e} |")


if __name__ == "__main__":
    main()
