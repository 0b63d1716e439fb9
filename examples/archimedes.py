"""ARCHIMEDES: SGD drifts along a valley of global minima at η²/6 per step (Corollary 1).

Simulates online SGD with batch size 1 on :func:`perturb.experiments.landscapes.archimedes`
(``x ∈ {−1, +1}``, the same finite population the prediction uses), many independent
chains at once (numpy, vectorized), from ``θ = 0``.  For each learning rate it discards
``--burn`` relaxation times ``1/(η h_min) = 1/η`` and measures the mean ``z``-velocity
over the next ``--window`` relaxation times; the standard error is over chains (which
are independent).  The prediction is :func:`perturb.experiments.corollaries.drift_velocity` (the
re-summed order-3 displacement, computed by the engine).

Run from the repository root:

    python examples/archimedes.py --write   # table + docs/img/archimedes.png + docs

``--write`` replaces the table in ``docs/corollaries.md`` (between the
``archimedes`` markers) with the one printed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

from perturb.experiments.corollaries import drift_velocity
from perturb.experiments.landscapes import archimedes

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "corollaries.md"
PLOT = ROOT / "docs" / "img" / "archimedes.png"


def sgd_step(u, v, z, x, eta):
    """One SGD step on l_x = ½H + xS for arrays of chains; returns the mean z-force too."""
    c, s = np.cos(z), np.sin(z)
    proj = c * u + s * v
    cs, ss = np.cos(z - math.pi / 4), np.sin(z - math.pi / 4)
    gu = u + proj * c + x * cs
    gv = v + proj * s + x * ss
    gz = proj * (-s * u + c * v) + x * (-ss * u + cs * v)
    return u - eta * gu, v - eta * gv, z - eta * gz


def simulate(eta: float, *, chains: int, burn: int, window: int, seed: int):
    """Per-chain mean z-velocity over steps [burn, burn + window) of online SGD (B = 1)."""
    rng = np.random.default_rng(seed)
    xs = np.array([-1.0, 1.0])
    u = np.zeros(chains)
    v = np.zeros(chains)
    z = np.zeros(chains)
    start = None
    for t in range(burn + window):
        if t == burn:
            start = z.copy()
        u, v, z = sgd_step(u, v, z, xs[rng.integers(0, 2, chains)], eta)
    return (z - start) / window


def trajectory(eta: float, *, chains: int, steps: int, every: int, seed: int):
    """Mean and standard error of z over chains, every ``every`` steps."""
    rng = np.random.default_rng(seed)
    xs = np.array([-1.0, 1.0])
    u = np.zeros(chains)
    v = np.zeros(chains)
    z = np.zeros(chains)
    times, means, errs = [0], [0.0], [0.0]
    for t in range(1, steps + 1):
        u, v, z = sgd_step(u, v, z, xs[rng.integers(0, 2, chains)], eta)
        if t % every == 0:
            times.append(t)
            means.append(float(z.mean()))
            errs.append(float(z.std(ddof=1) / math.sqrt(chains)))
    return np.array(times), np.array(means), np.array(errs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--etas", default="0.01,0.02,0.05,0.1")
    parser.add_argument("--chains", type=int, default=4000)
    parser.add_argument("--burn", type=float, default=20.0, help="relaxation times 1/η")
    parser.add_argument("--window", type=float, default=400.0, help="relaxation times 1/η")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-steps", type=int, default=100_000)
    parser.add_argument("--write", action="store_true", help="update docs and the plot")
    args = parser.parse_args(argv)
    etas = [float(e) for e in args.etas.split(",")]
    pop, theta0 = archimedes()

    rows = []
    began = time.time()
    for i, eta in enumerate(etas):
        burn, window = round(args.burn / eta), round(args.window / eta)
        vel = simulate(eta, chains=args.chains, burn=burn, window=window, seed=args.seed + i)
        measured, err = float(vel.mean()), float(vel.std(ddof=1) / math.sqrt(args.chains))
        predicted = float(drift_velocity(pop, theta0, lr=eta)[2])
        rows.append((eta, measured, err, predicted, eta**2 / 6))
    elapsed = time.time() - began

    command = (
        f"python examples/archimedes.py --etas {args.etas} --chains {args.chains} "
        f"--burn {args.burn:g} --window {args.window:g} --seed {args.seed}"
    )
    lines = [
        f"Command: `{command}` (seeds {args.seed}…{args.seed + len(etas) - 1}, one per η; "
        f"{elapsed:.0f} s on CPU).",
        "",
        "| η | burn-in, window (steps) | measured v_z ± s.e. | predicted v_z (order-3 "
        "re-summed) | η²/6 | measured / predicted | measured / (η²/6) |",
        "|---|---|---|---|---|---|---|",
    ]
    for eta, measured, err, predicted, leading in rows:
        lines.append(
            f"| {eta:g} | {round(args.burn / eta)}, {round(args.window / eta)} "
            f"| {measured:.5e} ± {err:.1e} | {predicted:.5e} | {leading:.5e} "
            f"| {measured / predicted:.4f} ± {err / predicted:.4f} "
            f"| {measured / leading:.4f} ± {err / leading:.4f} |"
        )
    table = "\n".join(lines)
    print(table)

    if args.write:
        long_eta = max(etas)
        times, means, errs = trajectory(
            long_eta, chains=200, steps=args.long_steps, every=1000, seed=args.seed + 100
        )
        long_pred = float(drift_velocity(pop, theta0, lr=long_eta)[2])
        note = (
            f"\nLong run (plot, right): η = {long_eta:g}, 200 chains, {args.long_steps} steps, "
            f"seed {args.seed + 100}: mean z = {means[-1]:.2f} ± {errs[-1]:.2f} against "
            f"the predicted {long_pred * args.long_steps:.2f}, i.e. "
            f"{means[-1] / (2 * math.pi):.1f} periods 2π of the landscape."
        )
        print(note)
        _plot(rows, pop, theta0, times, means, errs, long_eta, long_pred)
        _write_doc("archimedes", table + "\n" + note)
    return 0


def _plot(rows, pop, theta0, times, means, errs, long_eta, long_pred) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    grid = np.geomspace(min(r[0] for r in rows) / 1.5, max(r[0] for r in rows) * 1.5, 40)
    curve = [float(drift_velocity(pop, theta0, lr=e)[2]) / (e**2 / 6) for e in grid]
    left.plot(grid, curve, "-", label="predicted (order-3 re-summed)")
    left.errorbar(
        [r[0] for r in rows],
        [r[1] / r[4] for r in rows],
        yerr=[2 * r[2] / r[4] for r in rows],
        fmt="o",
        capsize=3,
        label="SGD, ±2 s.e.",
    )
    left.axhline(1.0, color="gray", lw=0.8, ls="--", label="η²/6")
    left.set_xscale("log")
    left.set_xlabel("learning rate η")
    left.set_ylabel("z-velocity / (η²/6)")
    left.set_title("ARCHIMEDES: drift along the valley")
    left.legend()
    right.plot(times, means, label=f"SGD mean z (η = {long_eta:g})")
    right.fill_between(times, means - 2 * errs, means + 2 * errs, alpha=0.3)
    right.plot(times, long_pred * times, "--", label="predicted v·t")
    right.axhline(2 * math.pi, color="gray", lw=0.8, ls=":", label="2π")
    right.set_xlabel("step t")
    right.set_ylabel("z")
    right.legend()
    fig.tight_layout()
    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(PLOT, dpi=120)
    print(f"wrote {PLOT.relative_to(ROOT)}")


def _write_doc(name: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = DOC.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise SystemExit(f"{DOC} lacks the markers {begin} … {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    DOC.write_text(f"{head}{begin}\n{body}\n{end}{tail}", encoding="utf-8")
    print(f"updated {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
