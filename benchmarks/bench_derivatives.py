"""The building blocks of a diagram node, timed: gradients, HVPs, third derivatives.

Run: ``python benchmarks/bench_derivatives.py --device cuda --width 16 --rows 4096``.

A smooth convnet ``smooth_convnet((1, 28, 28), 10, width=W)`` (``W = 16``: 98,442
parameters) at random inputs, cross-entropy, float32.  Times (median of ``--repeat`` runs
after a warm-up; CUDA events on the GPU, ``perf_counter`` on the CPU) and peak memory of:

* the floor: one full-batch gradient ``∇ Σ_i l_i``;
* a full-batch Hessian-vector product two ways: forward-over-reverse (``jvp`` of ``grad``,
  what perturb uses) and reverse-over-reverse (``grad`` of ``∇Σl · u``, double backward);
* a full-batch third-order directional derivative ``J[u, v, ·]`` (``jvp`` of ``jvp`` of
  ``grad``);
* per-sample gradients and per-sample HVPs ``H_i u_i`` for every row with ``vmap`` (chunked),
  again forward-over-reverse and reverse-over-reverse;
* the naive loops a user would write (``torch.autograd.grad`` per row, ``create_graph=True``
  for the HVP), timed on ``--naive-rows`` rows and scaled to all rows.

Every vmapped result is checked against the naive loop on the rows both computed.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch.func import functional_call, grad, jvp, vmap

from perturb.experiments.models import smooth_convnet


def _timer(device: torch.device):
    def run(fn, repeat: int) -> tuple[float, float, object]:
        """Median seconds, peak memory (MiB, CUDA only) and the last output of ``fn()``."""
        out = fn()  # warm-up
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            for _ in range(repeat):
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                out = fn()
                stop.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(stop) / 1e3)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        else:
            for _ in range(repeat):
                t0 = time.perf_counter()
                out = fn()
                times.append(time.perf_counter() - t0)
            peak = float("nan")
        return statistics.median(times), peak, out

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--naive-rows", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    timed = _timer(device)

    model = smooth_convnet((1, 28, 28), 10, width=args.width).to(device)
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    p_count = theta.numel()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (args.rows,), generator=gen).to(device)
    u = torch.randn(p_count, generator=gen).to(device)
    v = torch.randn(p_count, generator=gen).to(device)
    us = torch.randn(args.rows, p_count, generator=gen).to(device) / p_count**0.5

    def losses(t, xb, yb):
        pieces = (c.view(s) for c, s in zip(t.split(sizes), shapes, strict=True))
        params = dict(zip(names, pieces, strict=True))
        logits = functional_call(model, params, (xb,))
        return torch.nn.functional.cross_entropy(logits, yb, reduction="none")

    def total(t):
        return losses(t, x, y).sum()

    def one(t, xi, yi):
        return losses(t, xi[None], yi[None])[0]

    g_full = grad(total)

    def hvp_fwd_rev(vec):
        return jvp(g_full, (theta,), (vec,))[1]

    def hvp_rev_rev(vec):
        return grad(lambda t: torch.dot(g_full(t), vec))(theta)

    def third(a, b):
        return jvp(lambda t: jvp(g_full, (t,), (a,))[1], (theta,), (b,))[1]

    per_grad = vmap(grad(one), in_dims=(None, 0, 0), chunk_size=args.chunk_size)

    def per_hvp_fwd(t, xi, yi, ui):
        return jvp(lambda s: grad(one)(s, xi, yi), (t,), (ui,))[1]

    def per_hvp_rev(t, xi, yi, ui):
        return grad(lambda s: torch.dot(grad(one)(s, xi, yi), ui))(t)

    vm_fwd = vmap(per_hvp_fwd, in_dims=(None, 0, 0, 0), chunk_size=args.chunk_size)
    vm_rev = vmap(per_hvp_rev, in_dims=(None, 0, 0, 0), chunk_size=args.chunk_size)

    def naive_grads(count):
        out = []
        for i in range(count):
            t = theta.detach().requires_grad_(True)
            out.append(torch.autograd.grad(one(t, x[i], y[i]), t)[0])
        return torch.stack(out)

    def naive_hvps(count):
        out = []
        for i in range(count):
            t = theta.detach().requires_grad_(True)
            g = torch.autograd.grad(one(t, x[i], y[i]), t, create_graph=True)[0]
            out.append(torch.autograd.grad(g @ us[i], t)[0])
        return torch.stack(out)

    rows = []
    t_grad, m_grad, _ = timed(lambda: g_full(theta), args.repeat)
    rows.append(("full-batch gradient (floor)", t_grad, m_grad))
    t_hf, m_hf, h_fwd = timed(lambda: hvp_fwd_rev(u), args.repeat)
    rows.append(("full-batch HVP, forward-over-reverse", t_hf, m_hf))
    t_hr, m_hr, h_rev = timed(lambda: hvp_rev_rev(u), args.repeat)
    rows.append(("full-batch HVP, reverse-over-reverse", t_hr, m_hr))
    t_j, m_j, _ = timed(lambda: third(u, v), args.repeat)
    rows.append(("full-batch J[u, v, ·], fwd-over-fwd-over-rev", t_j, m_j))
    t_pg, m_pg, pg = timed(lambda: per_grad(theta, x, y), args.repeat)
    rows.append((f"per-sample gradients, vmap ({args.rows} rows)", t_pg, m_pg))
    t_pf, m_pf, ph_f = timed(lambda: vm_fwd(theta, x, y, us), args.repeat)
    rows.append(("per-sample HVPs, vmap forward-over-reverse", t_pf, m_pf))
    t_pr, m_pr, ph_r = timed(lambda: vm_rev(theta, x, y, us), args.repeat)
    rows.append(("per-sample HVPs, vmap reverse-over-reverse", t_pr, m_pr))
    k = min(args.naive_rows, args.rows)
    t_ng, _, ng = timed(functools.partial(naive_grads, k), 1)
    rows.append(("per-sample gradients, naive loop (scaled)", t_ng * args.rows / k, float("nan")))
    t_nh, _, nh = timed(functools.partial(naive_hvps, k), 1)
    rows.append(("per-sample HVPs, naive loop (scaled)", t_nh * args.rows / k, float("nan")))

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    print(f"{p_count:,} parameters, {args.rows} rows, device {device}, float32\n")
    print(
        "checks (relative difference): full-batch HVP fwd vs rev "
        f"{rel(h_fwd, h_rev):.1e}; per-sample grads vmap vs loop {rel(pg[:k], ng):.1e}; "
        f"per-sample HVPs fwd vs loop {rel(ph_f[:k], nh):.1e}, "
        f"rev vs loop {rel(ph_r[:k], nh):.1e}\n"
    )
    print("| operation | seconds | × full-batch gradient | peak extra memory (MiB) |")
    print("|---|---:|---:|---:|")
    for name, sec, mem in rows:
        print(f"| {name} | {sec:.4f} | {sec / t_grad:.1f} | {mem:.0f} |")
    scale = args.rows / k
    print(
        f"\nforward-over-reverse vs reverse-over-reverse: full batch {t_hr / t_hf:.2f}×, "
        f"per sample {t_pr / t_pf:.2f}×; vmap vs naive loop: gradients "
        f"{t_ng * scale / t_pg:.0f}×, HVPs {t_nh * scale / t_pf:.0f}×"
    )


if __name__ == "__main__":
    main()
