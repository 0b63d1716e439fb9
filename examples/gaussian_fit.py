"""Section 3.4: SGD against SDE when fitting a Gaussian, where the noise is not Gaussian.

The landscape is :func:`perturb.experiments.landscapes.gaussian_fit`: fit ``N(0, σ²)`` with
``h = log σ²`` to data ``x`` (a population of ``--rows`` symmetric values of mean 0 and
variance 1, the normal quantiles), per-sample loss ``l_x(h) = ½(h + x² e^{−h})``, from
``h_0 = --h0``.  The gradient noise ``−½(x² − 1)e^{−h}`` is an affine image of ``x²``, a
chi-squared, so its third cumulant ``S`` is not zero.

Four processes run ``T = --steps`` steps at each learning rate, many chains at once
(torch, vectorized over chains, float64), test loss ``L(h) = mean_x l_x(h)``:

* **SGD**: online, batch 1, ``x`` drawn uniformly from the population;
* **Gaussian-noise SGD**: the same discrete steps with ``x²`` replaced by
  ``m + s·ξ``, ``ξ ~ N(0, 1)`` (``m``, ``s²`` the population mean and variance of
  ``x²``): the same mean, covariance and gradient–Hessian correlation as SGD, no
  cumulant of order three or more;
* **SDE**: ``dh = −∇L(h) dt + sqrt(η C(h)) dW`` for ``t ∈ [0, ηT]``, ``C(h)`` the
  gradient variance at ``h``, Euler–Maruyama with ``--substeps`` steps per SGD step;
* and the predictions from ``h_0``: perturb's series through ``η³``, its re-summed
  series (up to three edges), and the SDE with statistics frozen at ``h_0``
  (:func:`perturb.experiments.baselines.sde_test_loss`).

Because the loss is linear in ``x²``, every joint cumulant of the per-sample
derivatives is a cumulant of ``x²`` times a power of ``e^{−h}``; Gaussian-noise SGD
therefore has exactly SGD's series minus the terms with a part of three or more nodes
(:func:`perturb.experiments.corollaries.non_gaussian_part`, led by ``−(T/6)·J:S·η³``, Corollary 5).
The example compares the measured ``SGD − Gaussian-noise SGD`` with that prediction.

Run from the repository root:

    python examples/gaussian_fit.py --write   # table + docs/img/gaussian_fit.png + docs

``--write`` replaces the table in ``docs/validation.md`` (between the ``gaussian-fit``
markers) with the one printed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from _doc_section import replace_section

from perturb.experiments.baselines import QuadraticModel, sde_test_loss
from perturb.experiments.corollaries import non_gaussian_part
from perturb.experiments.landscapes import gaussian_fit
from perturb.numeric.prediction import predict
from perturb.numeric.resummation import resummed_values
from perturb.symbolic.resummed import resummed_terms
from perturb.symbolic.schedules import Online
from perturb.symbolic.series import series

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "validation.md"
PLOT = ROOT / "docs" / "img" / "gaussian_fit.png"


def test_loss(h: torch.Tensor, m: float) -> torch.Tensor:
    """``L(h) = ½(h + m e^{−h})`` with ``m = mean x²``."""
    return 0.5 * (h + m * torch.exp(-h))


def run_sgd(x2, h0, eta, steps, chains, gen):
    """Online SGD, batch 1: ``h ← h − η·½(1 − x² e^{−h})`` with ``x²`` from the population."""
    h = torch.full((chains,), h0, dtype=torch.float64)
    for _ in range(steps):
        u = x2[torch.randint(0, len(x2), (chains,), generator=gen)]
        h = h - eta * 0.5 * (1 - u * torch.exp(-h))
    return h


def run_gaussian_sgd(m, s, h0, eta, steps, chains, gen):
    """The same steps with ``x²`` replaced by ``m + s·ξ``, ``ξ ~ N(0, 1)``."""
    h = torch.full((chains,), h0, dtype=torch.float64)
    for _ in range(steps):
        u = m + s * torch.randn(chains, generator=gen, dtype=torch.float64)
        h = h - eta * 0.5 * (1 - u * torch.exp(-h))
    return h


def run_sde(m, s, h0, eta, steps, chains, gen, substeps):
    """Euler–Maruyama for ``dh = −½(1 − m e^{−h}) dt + sqrt(η)·½ s e^{−h} dW``, ``t ≤ ηT``."""
    h = torch.full((chains,), h0, dtype=torch.float64)
    dt = eta / substeps
    for _ in range(steps * substeps):
        xi = torch.randn(chains, generator=gen, dtype=torch.float64)
        h = (
            h
            - 0.5 * (1 - m * torch.exp(-h)) * dt
            + math.sqrt(eta * dt) * 0.5 * s * torch.exp(-h) * xi
        )
    return h


def mean_se(values: torch.Tensor) -> tuple[float, float, int]:
    """Mean and standard error over chains, and the number of chains that diverged.

    A process with any non-finite chain is reported as divergent (mean and s.e. NaN):
    averaging the survivors would bias the mean.
    """
    bad = int((~torch.isfinite(values)).sum())
    if bad:
        return math.nan, math.nan, bad
    return float(values.mean()), float(values.std() / math.sqrt(values.numel())), 0


def show(stat: tuple[float, float, int], chains: int, digits: int = 6) -> str:
    if stat[2]:
        return f"divergent {stat[2]}/{chains}"
    return f"{stat[0]:.{digits}f} ± {stat[1]:.1e}"


def predictions(pop, theta0, eta: float, steps: int) -> dict[str, float]:
    """perturb's predictions at one learning rate (all from the statistics at ``h_0``)."""
    sched = Online(steps=steps, batch_size=1)
    derivs = pop.derivatives(theta0, 4)
    out = {
        "order 2": predict(pop, theta0, sched, lr=eta, order=2).total,
        "order 3": predict(pop, theta0, sched, lr=eta, order=3).total,
        "resummed 3": predict(pop, theta0, sched, lr=eta, order=3, resummed=True).total,
    }
    quad = QuadraticModel.from_derivatives({0: derivs[0], 1: derivs[1]}, derivs[2].mean(0))
    out["SDE (frozen)"] = float(sde_test_loss(quad, lr=eta, steps=steps))
    out["non-Gaussian, η³+η⁴"] = float(
        sum(non_gaussian_part(series(4, sched)).evaluate(derivs, lr=eta))
    )
    skew = [t for t in resummed_terms(3, sched) if any(len(p) > 2 for p in t.diagram.parts)]
    out["non-Gaussian, re-summed"] = float(
        sum(resummed_values(skew, derivs, lr=eta, steps=steps, schedule=sched))
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--etas", default="0.05,0.1,0.15,0.2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--chains", type=int, default=1_000_000)
    parser.add_argument("--rows", type=int, default=1000, help="population size")
    parser.add_argument("--h0", type=float, default=0.5)
    parser.add_argument("--substeps", type=int, default=20, help="SDE steps per SGD step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help="update docs and the plot")
    args = parser.parse_args(argv)
    etas = [float(e) for e in args.etas.split(",")]
    pop, theta0 = gaussian_fit(rows=args.rows, h0=args.h0)
    x2 = pop.data[:, 0] ** 2
    m, s = float(x2.mean()), float(x2.var(unbiased=False).sqrt())
    gen = torch.Generator().manual_seed(args.seed)

    rows = []
    began = time.time()
    for eta in etas:
        sgd = mean_se(test_loss(run_sgd(x2, args.h0, eta, args.steps, args.chains, gen), m))
        gauss = mean_se(
            test_loss(run_gaussian_sgd(m, s, args.h0, eta, args.steps, args.chains, gen), m)
        )
        sde = mean_se(
            test_loss(run_sde(m, s, args.h0, eta, args.steps, args.chains, gen, args.substeps), m)
        )
        rows.append((eta, sgd, gauss, sde, predictions(pop, theta0, eta, args.steps)))
    elapsed = time.time() - began

    command = (
        f"python examples/gaussian_fit.py --etas {args.etas} --steps {args.steps} "
        f"--chains {args.chains} --rows {args.rows} --h0 {args.h0:g} "
        f"--substeps {args.substeps} --seed {args.seed}"
    )
    lines = [
        f"Command: `{command}` ({elapsed:.0f} s on a 2-core CPU).",
        "",
        "Test loss after T steps (mean ± s.e. over chains; predictions from h_0):",
        "",
        "| η | ηT | SGD | order 2 | order 3 | re-summed 3 | SDE (frozen, baselines) "
        "| SDE (simulated) | Gaussian-noise SGD |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for eta, sgd, gauss, sde, p in rows:
        lines.append(
            f"| {eta:g} | {eta * args.steps:g} | {show(sgd, args.chains)} "
            f"| {p['order 2']:.6f} | {p['order 3']:.6f} | {p['resummed 3']:.6f} "
            f"| {p['SDE (frozen)']:.6f} | {show(sde, args.chains)} "
            f"| {show(gauss, args.chains)} |"
        )
    lines += [
        "",
        "The effect of non-Gaussian noise: SGD − Gaussian-noise SGD (independent chains, "
        "± s.e.) against perturb's non-Gaussian terms, and SGD − SDE:",
        "",
        "| η | measured SGD − Gaussian SGD | predicted, η³ + η⁴ terms | predicted, re-summed "
        "(≤ 3 edges) | (measured − re-summed) / s.e. | SGD − SDE (simulated) |",
        "|---|---|---|---|---|---|",
    ]
    for eta, sgd, gauss, sde, p in rows:
        diff, err = sgd[0] - gauss[0], math.hypot(sgd[1], gauss[1])
        pred = p["non-Gaussian, re-summed"]
        ok = not (sgd[2] or gauss[2])
        lines.append(
            f"| {eta:g} | {f'{diff:.3e} ± {err:.1e}' if ok else 'divergent'} "
            f"| {p['non-Gaussian, η³+η⁴']:.3e} | {pred:.3e} "
            f"| {f'{(diff - pred) / err:+.1f}' if ok else 'n/a'} "
            f"| {sgd[0] - sde[0]:.3e} ± {math.hypot(sgd[1], sde[1]):.1e} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.write:
        _plot(rows, args.steps)
        replace_section(DOC, "gaussian-fit", table, root=ROOT)
    return 0


def _plot(rows, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    etas = [r[0] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.errorbar(etas, [r[1][0] for r in rows], yerr=[2 * r[1][1] for r in rows], fmt="ko",
                  capsize=3, label="SGD (±2 s.e.)")  # fmt: skip
    for key, style in (("order 3", "-"), ("resummed 3", "--"), ("SDE (frozen)", ":")):
        left.plot(etas, [r[4][key] for r in rows], style, marker=".", label=key)
    left.plot(etas, [r[3][0] for r in rows], "s", mfc="none", label="SDE (simulated)")
    left.set_xlabel("learning rate η")
    left.set_ylabel(f"test loss after T = {steps} steps")
    left.set_title("Gaussian fit, h = log σ²")
    left.legend(fontsize=8)
    diff = [r[1][0] - r[2][0] for r in rows]
    err = [2 * math.hypot(r[1][1], r[2][1]) for r in rows]
    right.errorbar(etas, diff, yerr=err, fmt="ko", capsize=3,
                   label="SGD − Gaussian-noise SGD (±2 s.e.)")  # fmt: skip
    right.plot(etas, [r[4]["non-Gaussian, re-summed"] for r in rows], "-",
               label="predicted: non-Gaussian diagrams, re-summed")  # fmt: skip
    right.plot(etas, [r[4]["non-Gaussian, η³+η⁴"] for r in rows], "--",
               label="predicted: η³ + η⁴ terms")  # fmt: skip
    right.axhline(0.0, color="gray", lw=0.8)
    right.set_xlabel("learning rate η")
    right.set_ylabel("test-loss difference")
    right.set_title("effect of non-Gaussian noise")
    right.legend(fontsize=8)
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)
    print(f"wrote {PLOT.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
