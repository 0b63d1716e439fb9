"""The η/B collapse (seed 000/001) and its breakdown, predicted by the diagrams and measured.

The SDE picture says that online SGD runs with the same temperature ``n = η/B`` reach
the same expected test loss at the same time ``τ = ηT``.  The diagram series says how
far they differ: writing ``T = τ/η`` and ``B = η/n`` in the online-SGD series,

``E l(θ_T) = l − τ G·G + τ² G·H·G + (τn/2) tr(C H) − (ητ/2) G·H·G + O(η³)``,

every coefficient is a function of ``τ`` and ``n`` only, except for terms with a leftover
power of ``η``: at ``η²`` the discretization term ``−(ητ/2) G·H·G`` (the same as for
gradient descent, independent of the noise), and at ``η³`` ``ητ² G·H·H·G + (ητ²/4)
G_a J_abc G_b G_c`` and the noise terms ``(ητn/2)(tr(C H H) + G_a⟨∇l,∇∇l⟩_(c,ab) H_bc) +
(ητn/4) C_(a,b) J_abc G_c`` (``J:S`` collapses).  So two runs with ``η₁/B₁ = η₂/B₂``
and ``η₁T₁ = η₂T₂`` differ by ``−(τ/2)(η₁ − η₂) G·H·G`` at leading order.

This example measures the statistics at ``θ_0`` exactly over a population of digits
(:func:`perturb.measure`, softmax regression), predicts each run at orders 1–3
(:meth:`perturb.Statistics.predict`) and with the exact discrete recursion of the
quadratic model (:func:`perturb.baselines.lyapunov_test_loss`, all orders in ``η`` on the
quadratic model), and runs ``--trials`` vectorized online-SGD trials per setting
(:func:`perturb.simulate`).  It prints the differences from the smallest-``η`` run, the
measured difference with its standard error, and each prediction's error in SE units.

Run from the repository root (2-core CPU: about a minute with the defaults):

    python examples/eta_over_b.py
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from perturb.experiments.baselines import (
    QuadraticModel,
    lyapunov_test_loss,
    mean_hessian,
    per_sample_derivatives,
)
from perturb.experiments.data import load_dataset
from perturb.experiments.models import mlp
from perturb.experiments.simulation import model_loss, simulate
from perturb.numeric.measuring import measure
from perturb.symbolic.schedules import Online


def run(*, temperature, time_, batch_sizes, trials, population, seed):
    """Predicted and measured test losses of runs with ``η = nB``, ``T = τ/η``."""
    data = load_dataset("digits").subset(population, seed=seed)
    x, y = data.x, data.y
    net = mlp(data.input_shape, data.num_classes, hidden=(), seed=seed)
    loss_fn, theta0 = model_loss(net)
    runs = []
    for b in batch_sizes:
        lr = temperature * b
        steps = round(time_ / lr)
        if not math.isclose(steps * lr, time_, rel_tol=1e-9):
            raise ValueError(f"τ/η = {time_}/{lr} is not an integer number of steps")
        runs.append((lr, b, steps))
    schedules = [Online(steps=s, batch_size=b) for _, b, s in runs]
    stats = measure(
        net, (x, y), order=3, schedules=schedules, exact=True, dtype=torch.float64, progress=False
    )
    theta64, x64 = theta0.to(torch.float64), x.to(torch.float64)
    derivs = per_sample_derivatives(loss_fn, theta64, x64, y)
    hess = mean_hessian(loss_fn, theta64, x64, y).to(torch.float64)
    quad = QuadraticModel.from_derivatives(derivs, hess)
    ghg = float(quad.grad @ quad.hess @ quad.grad)
    h = quad.eig[0]
    gg = float(quad.grad @ quad.grad)
    print(f"H eigenvalues in [{float(h.min()):.3g}, {float(h.max()):.3g}], G·G = {gg:.4f}")
    rows = []
    for i, ((lr, b, steps), sched) in enumerate(zip(runs, schedules, strict=True)):
        orders = np.cumsum(stats.predict(sched, lr=lr, order=3).by_order[0])
        sim = simulate(
            loss_fn,
            theta0,
            (x, y),
            sched,
            lr=lr,
            trials=trials,
            seed=seed + 1 + i,
            dtype=torch.float64,
        )
        rows.append(
            {
                "lr": lr,
                "batch_size": b,
                "steps": steps,
                "mean": float(sim.mean[0]),
                "se": float(sim.sem[0]),
                "divergent": int(sim.divergent[0]),
                "order": [float(v) for v in orders],
                "lyapunov": float(lyapunov_test_loss(quad, lr=lr, steps=steps, batch_size=b)),
            }
        )
    return rows, ghg, int(theta0.numel())


def table(rows, ghg, *, temperature, time_) -> str:
    """Markdown: each run's difference from the first, measured vs predicted (SE units)."""
    base = rows[0]
    out = [
        f"n = η/B = {temperature}, τ = ηT = {time_}, G·H·G = {ghg:.5f}",
        "",
        "| η | B | T | SGD mean ± SE | Δ measured ± SE | Δ leading −(τ/2)Δη·GHG | "
        "Δ order 2 | Δ order 3 | Δ Lyapunov | z(order 3) | z(Lyapunov) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        d = r["mean"] - base["mean"]
        se = math.hypot(r["se"], base["se"]) if r is not base else float("nan")
        lead = -(time_ / 2) * (r["lr"] - base["lr"]) * ghg
        o2 = r["order"][2] - base["order"][2]
        o3 = r["order"][3] - base["order"][3]
        ly = r["lyapunov"] - base["lyapunov"]
        out.append(
            f"| {r['lr']:g} | {r['batch_size']} | {r['steps']} | {r['mean']:.5f} ± {r['se']:.5f} "
            f"| {d:+.5f} ± {se:.5f} | {lead:+.5f} | {o2:+.5f} | {o3:+.5f} | {ly:+.5f} "
            f"| {(o3 - d) / se:+.1f} | {(ly - d) / se:+.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--temperature", type=float, default=0.01, help="n = η/B")
    parser.add_argument("--time", type=float, default=0.64, help="τ = ηT")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--trials", type=int, default=4000)
    parser.add_argument("--population", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.process_time()
    rows, ghg, params = run(
        temperature=args.temperature,
        time_=args.time,
        batch_sizes=args.batch_sizes,
        trials=args.trials,
        population=args.population,
        seed=args.seed,
    )
    print(
        f"softmax regression on {args.population} digits, {params} parameters, "
        f"{args.trials} trials per run"
    )
    print(table(rows, ghg, temperature=args.temperature, time_=args.time))
    print(f"\nCPU time {time.process_time() - start:.1f} s")


if __name__ == "__main__":
    main()
