"""Why three edges do not last longest: the re-summed series against SGD at fixed ηT.

A 2-2-1 tanh regression network (9 parameters, 3 rows, weight decay 0.3, positive
definite ``H``; the network of ``tests/numeric/test_resummed_convergence.py``), online SGD
with batch 1.  For each ``ηT`` and ``η`` the script prints the errors of the re-summed
predictions with two and three edges (``perturb.predict``, materialized statistics at
``θ_0``) against the mean of many hand-written SGD runs, and the quadratic model's RMS
displacement over ``ρ = ‖H‖/‖J‖`` (the validity estimate's rule).  Then, on the
deterministic part (GD on the population mean, exact), it splits the 3-edge correction:
the quadratic model's path ``δ₀``, its first correction in ``J``,
``δ₁ ← (I − ηH)δ₁ − ½ηJ[δ₀, δ₀]``, the 3-edge terms ``G·δ₁ + J[δ₀, δ₀, δ₀]/6`` and the
4-edge term ``δ₀ᵀHδ₁`` that would cancel ``G·δ₁`` as the path converges.

Run: ``python examples/long_times.py`` (docs/validation.md, "Why three edges do not
last longest": ``--runs 200000``).
"""

from __future__ import annotations

import argparse

import torch
from torch.func import grad, hessian, jacfwd

import perturb
from perturb.numeric.krylov import krylov_subspace
from perturb.numeric.validity import curvature_radius, rms_displacement

ROWS = torch.tensor([[0.8, -0.4, 0.5], [-0.3, 0.9, -0.7], [0.5, 0.6, 0.2]], dtype=torch.float64)
THETA0 = torch.tensor([0.6, -0.5, 0.3, 0.8, 0.1, -0.2, 0.9, -0.7, 0.15], dtype=torch.float64)
DECAY = 0.3


def batched_loss(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-run loss of ``p`` (``(R, 9)``) on one row each (``(R, 3)``: x1, x2, target)."""
    w1, b1, w2, b2 = p[:, :4].reshape(-1, 2, 2), p[:, 4:6], p[:, 6:8], p[:, 8]
    out = (w2 * torch.tanh(torch.einsum("rij,rj->ri", w1, rows[:, :2]) + b1)).sum(1) + b2
    return 0.5 * (out - rows[:, 2]) ** 2 + 0.5 * DECAY * (p * p).sum(1)


def loss_fn(p: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """The same loss for one parameter vector and one row."""
    return batched_loss(p[None], row[None])[0]


def test_loss(p: torch.Tensor) -> torch.Tensor:
    """Mean loss over the three rows, per run."""
    return sum(batched_loss(p, row.expand(p.shape[0], -1)) for row in ROWS) / len(ROWS)


def simulate(lr: float, steps: int, runs: int, seed: int) -> tuple[float, float]:
    """Mean and standard error of the test loss after ``steps`` of online SGD."""
    gen = torch.Generator().manual_seed(seed)
    p = THETA0.expand(runs, -1).clone()
    for _ in range(steps):
        p.requires_grad_(True)
        rows = ROWS[torch.randint(0, len(ROWS), (runs,), generator=gen)]
        (g,) = torch.autograd.grad(batched_loss(p, rows).sum(), p)
        p = (p - lr * g).detach()
    loss = test_loss(p)
    return float(loss.mean()), float(loss.std()) / runs**0.5


def deterministic_split(lr: float, steps: int) -> dict[str, float]:
    """Errors of the quadratic model and its corrections in ``J`` against exact GD."""

    def mean_loss(p: torch.Tensor) -> torch.Tensor:
        return test_loss(p[None])[0]

    g, h, j = (
        grad(mean_loss)(THETA0),
        hessian(mean_loss)(THETA0),
        jacfwd(hessian(mean_loss))(THETA0),
    )
    p = THETA0.clone()
    d0, d1 = torch.zeros_like(THETA0), torch.zeros_like(THETA0)
    for _ in range(steps):
        p = p - lr * grad(mean_loss)(p)
        d1 = d1 - lr * (h @ d1 + 0.5 * torch.einsum("abc,b,c->a", j, d0, d0))
        d0 = d0 - lr * (g + h @ d0)
    truth = float(mean_loss(p))
    quad = float(mean_loss(THETA0) + g @ d0 + 0.5 * d0 @ h @ d0)
    three = float(g @ d1 + torch.einsum("abc,a,b,c->", j, d0, d0, d0) / 6)
    four = float(d0 @ h @ d1)
    return {
        "quadratic": quad - truth,
        "3 edges": quad + three - truth,
        "G·δ₁": float(g @ d1),
        "δ₀ᵀHδ₁": four,
        "with δ₀ᵀHδ₁": quad + three + four - truth,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eta-ts", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--etas", type=float, nargs="+", default=[0.2, 0.1, 0.05])
    parser.add_argument("--runs", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    population = perturb.Population(loss_fn, ROWS)
    derivs = population.derivatives(THETA0, 2)
    hess, mean_grad = derivs[2].mean(0), derivs[1].mean(0)
    cov = (derivs[1] - mean_grad).T @ (derivs[1] - mean_grad) / len(ROWS)
    rho = curvature_radius(krylov_subspace(population, None, THETA0, rank=9, order=3))
    print(f"ρ = ‖H‖/‖J‖ = {rho:.3f}\n")
    print(
        "| ηT | η | SGD mean ± s.e. | resummed 2 − SGD | resummed 3 − SGD | RMS displacement / ρ |"
    )
    print("|---|---|---|---|---|---|")
    for eta_t in args.eta_ts:
        for lr in args.etas:
            steps = max(1, round(eta_t / lr))
            schedule = perturb.Online(steps=steps, batch_size=1)
            mean, se = simulate(lr, steps, args.runs, args.seed)
            r2, r3 = (
                perturb.predict(population, THETA0, schedule, lr=lr, order=d, resummed=True).total
                for d in (2, 3)
            )
            moved = rms_displacement(hess, mean_grad, cov, lr=[lr], schedule=schedule)[0]
            print(
                f"| {eta_t:g} | {lr:g} | {mean:.6f} ± {se:.1e} | {r2 - mean:+.4f} "
                f"| {r3 - mean:+.4f} | {moved / rho:.2f} |"
            )
    print("\nDeterministic part (GD on the population mean), errors against exact GD:\n")
    print("| ηT | η | quadratic | 3 edges | G·δ₁ | δ₀ᵀHδ₁ | 3 edges + δ₀ᵀHδ₁ |")
    print("|---|---|---|---|---|---|---|")
    for eta_t in args.eta_ts:
        lr = args.etas[-1]
        split = deterministic_split(lr, max(1, round(eta_t / lr)))
        print(f"| {eta_t:g} | {lr:g} | " + " | ".join(f"{v:+.4f}" for v in split.values()) + " |")


if __name__ == "__main__":
    main()
