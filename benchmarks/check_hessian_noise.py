"""How much test loss the per-sample Hessian fluctuations add that no 3-edge diagram holds.

The quadratic model with noise ("resummed 2", the SDE) drives the deviation's second
moment with the gradient covariance only, ``M ← K M K + (η²/B) C``.  With per-sample
Hessians ``H_i = H + A_i`` a step multiplies the deviation by ``I − ηH_i``, which adds
``(η²/B) E_i[A_i S A_i]`` (``S = M + m mᵀ``, ``m`` the mean path): a ladder of Hessian
cumulants with four edges and more, absent from every predictor perturb prints.  This
script evaluates ``½ tr(H (M − M₀))`` (with and without the ladder) on a few projected
bases of a digits convnet checkpoint, for comparison with the misses of the validity
estimate in docs/validation.md.

Run: ``python benchmarks/check_hessian_noise.py --pretrain 200 --lr 0.05 0.02 --steps 20
60 100`` (about a minute on the 2-core CPU).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from torch.func import grad, vmap

from perturb.experiments.validation import load_population, start_point
from perturb.numeric.adapters import objective
from perturb.numeric.derivatives import derivative
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.stability import per_sample_curvatures, per_sample_top_curvatures


def sharp_directions(obj, count: int, iterations: int = 30) -> torch.Tensor:
    """Orthonormalized top eigenvectors of the ``count`` sharpest single-sample Hessians."""
    _, lam = per_sample_top_curvatures(obj, None, iterations=iterations)
    rows = torch.as_tensor(np.argsort(-lam)[:count].copy())
    picked = tuple(r[rows] for r in obj.rows)
    hvp = derivative(obj.single, vector=True, reverse_first=True)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(count, obj.size, generator=gen, dtype=torch.float64).to(obj.theta0)
    for _ in range(iterations):
        w = vmap(lambda u, *row: hvp(obj.theta0, row, (u,)))(v, *picked).detach()
        v = w / torch.linalg.vector_norm(w, dim=1, keepdim=True)
    return torch.linalg.qr(v.T)[0]


def ladder(h, per_sample, cov, mean_grad, *, lr: float, steps: list[int], batch_size: int):
    """``½ tr(H (M_t − M₀_t))`` at each of ``steps``: the loss the Hessian ladder adds."""
    k = h.shape[0]
    a = per_sample - per_sample.mean(0)
    q = np.einsum("iab,icd->acbd", a, a).reshape(k * k, k * k) / len(a)  # vec(E[A S A])
    kk = np.eye(k) - lr * h
    m, big, base, out = np.zeros(k), np.zeros((k, k)), np.zeros((k, k)), {}
    for t in range(1, max(steps) + 1):
        s = big + np.outer(m, m)
        big = kk @ big @ kk + lr**2 / batch_size * (cov + (q @ s.reshape(-1)).reshape(k, k))
        base = kk @ base @ kk + lr**2 / batch_size * cov
        m = kk @ m - lr * mean_grad
        if t in steps:
            out[t] = (0.5 * np.trace(h @ (big - base)), 0.5 * np.trace(h @ base))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pretrain", type=int, default=200)
    parser.add_argument("--lr", type=float, nargs="+", default=[0.05, 0.02])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 60, 100])
    parser.add_argument("--directions", type=int, default=32)
    args = parser.parse_args()

    data = load_population("digits", data_dir=None, population=256, seed=0)
    setup, _ = start_point(
        "smooth-convnet",
        data,
        seed=0,
        device="cpu",
        checkpoint=None,
        pretrain_steps=args.pretrain,
        pretrain_lr=1.0,
        progress=False,
    )
    obj = objective(setup.net, (setup.x, setup.y), None, dtype=torch.float64)
    grads = vmap(lambda *row: grad(lambda t: obj.single(t, *row))(obj.theta0))(*obj.rows)
    mean_grad, centred = grads.mean(0), grads - grads.mean(0)
    krylov = krylov_subspace(obj, None, rank=2 * args.directions, order=2).basis
    sharp = sharp_directions(obj, args.directions)
    bases = {
        f"Krylov {args.directions}": krylov[:, : args.directions],
        f"sharpest {args.directions} samples": sharp,
        "both": torch.linalg.qr(torch.cat([krylov[:, : args.directions], sharp], 1))[0],
    }
    print("| basis | η | " + " | ".join(f"t = {t}" for t in args.steps) + " |")
    print("|---|---|" + "---|" * len(args.steps))
    for name, u in bases.items():
        h, per_sample = (x.numpy() for x in per_sample_curvatures(obj, None, basis=u))
        zu = (centred @ u).numpy()
        cov, g = zu.T @ zu / obj.n, (mean_grad @ u).numpy()
        for lr in args.lr:
            got = ladder(h, per_sample, cov, g, lr=lr, steps=args.steps, batch_size=1)
            cells = " | ".join(f"+{got[t][0]:.5f} (of {got[t][1]:.4f})" for t in args.steps)
            print(f"| {name} | {lr:g} | {cells} |")


if __name__ == "__main__":
    main()
