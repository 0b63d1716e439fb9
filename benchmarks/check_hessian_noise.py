"""How much test loss the per-sample Hessian fluctuations add that no 3-edge diagram holds.

The quadratic model with noise ("resummed 2", the SDE) drives the deviation's second
moment with the gradient covariance only, ``M ← K M K + (η²/B) C``.  With per-sample
Hessians ``H_i = H + A_i`` a step multiplies the deviation by ``I − ηH_i``, which adds
``(η²/B) E_i[A_i S A_i]`` (``S = M + m mᵀ``, ``m`` the mean path): a ladder of Hessian
cumulants with four edges and more, absent from every predictor perturb prints.  The
validity estimate adds it (:func:`perturb.numeric.validity.ladder_loss`) on the first
32 Krylov vectors; this script evaluates it on larger bases of a digits convnet
checkpoint (the Krylov vectors, the sharpest samples' top eigenvectors, both), to show
how much of it those 32 directions hold.

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
from perturb.numeric.validity import ladder_loss


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
    mean_grad = grads.mean(0)
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
        h, per_sample = per_sample_curvatures(obj, None, basis=u)
        g = mean_grad @ u
        for lr in args.lr:
            got = ladder_loss(h, per_sample, g, grads @ u, lr=[lr], steps=args.steps)[0]
            cells = " | ".join(f"{v:+.5f}" for v in got)
            print(f"| {name} | {lr:g} | {cells} |")


if __name__ == "__main__":
    main()
