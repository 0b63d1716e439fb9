"""The work of ``perturb predict``: measure at a checkpoint, predict, print.

Kept apart from :mod:`perturb.cli` (which holds the command's options) so that the
command line module stays an index of commands; imports torch only when called.
"""

from __future__ import annotations

import json
import warnings

import click

__all__ = ["estimator_lines", "run_predict"]


def _estimation(exact, estimator, target_se, budget, lrs) -> dict:
    """The estimator options of ``measure`` (none with ``--exact``)."""
    if exact:
        if target_se is not None or budget is not None or estimator != "auto":
            raise click.BadParameter(
                "--exact averages over every point; --estimator, --target-se and --budget "
                "apply to estimates",
                param_hint="'--exact'",
            )
        return {}
    if (target_se is not None or budget is not None) and estimator != "auto":
        raise click.BadParameter(
            f"--target-se and --budget plan the auto estimator, got --estimator {estimator}",
            param_hint="'--estimator'",
        )
    if target_se is not None and budget is not None:
        raise click.BadParameter("pass --target-se or --budget, not both")
    planned = {"lr": list(lrs)} if estimator == "auto" else {}
    return {"estimator": estimator, "target_se": target_se, "budget": budget, **planned}


def estimator_lines(meta: dict) -> list[str]:
    """What ``--verbose`` prints: the estimator per statistic and the plan.

    Example:
        >>> estimator_lines({"estimator": "tuples"})
        ['estimator: tuples']
        >>> plan = {"pilot_rows": 64, "rows": 448, "replicates": 1, "predicted_se": 0.01,
        ...         "contractions": {"k": {"text": "G·G", "estimator": "sketch",
        ...         "sketch": {"variance": 1e-4, "work": 1.5},
        ...         "tuples": {"variance": 9e-4, "work": 1.0}}}}
        >>> for line in estimator_lines({"estimator": "auto", "plan": plan}):
        ...     print(line)
        estimator: auto (pilot on 64 points)
          measured on 448 points, 1 replicate, predicted s.e. 0.01
          G·G: sketch (pilot variance × evaluations per row: sketch 0.00015, tuples 0.0009)
    """
    kind = meta.get("estimator", "exact")
    plan = meta.get("plan")
    if not plan or "contractions" not in plan:
        note = f" ({plan['note']})" if plan and "note" in plan else ""
        return [f"estimator: {kind}{note}"]
    plural = "s" if plan["replicates"] != 1 else ""
    second = f"  measured on {plan['rows']} points, {plan['replicates']} replicate{plural}"
    if "predicted_se" in plan:
        second += f", predicted s.e. {plan['predicted_se']:.3g}"
    lines = [f"estimator: {kind} (pilot on {plan['pilot_rows']} points)", second]
    for entry in plan["contractions"].values():
        wnv = {e: entry[e]["variance"] * entry[e]["work"] for e in ("sketch", "tuples")}
        lines.append(
            f"  {entry['text']}: {entry['estimator']} (pilot variance × evaluations per row: "
            f"sketch {wnv['sketch']:.3g}, tuples {wnv['tuples']:.3g})"
        )
    return lines


def run_predict(
    *,
    dataset: str,
    data_dir: str | None,
    model_spec: str,
    checkpoint: str | None,
    lrs: tuple[float, ...],
    steps: int,
    batch_size: int,
    order: int,
    quantity: str,
    samples: int | None,
    exact: bool,
    resummed: bool,
    krylov_rank: int,
    krylov_higher_rank: int,
    estimator: str,
    target_se: float | None,
    budget: float | None,
    verbose: bool,
    seed: int,
    device: str,
    fmt: str,
) -> None:
    """Measure the statistics of ``model_spec`` on ``dataset``, predict and print them.

    The options are those of ``perturb predict`` (see ``perturb predict --help``); the
    table or JSON goes to standard output, notes and warnings to standard error.

    With ``--exact`` or ``--resummed`` the statistics are measured through
    ``max(order, TRUST_ORDER)`` so that the error estimate reads the η³ (3-edge) terms as
    :func:`perturb.predict`, ``validate`` and ``compare`` do; the sampled estimators
    measure through ``order`` only (their pilot plans the rows for what the series asks;
    the η³ statistics, tuples of four rows, would need a pilot on more rows than
    ``--order 2`` users have; ``--order 3``, the default, measures them anyway).

    Example:
        >>> from click.testing import CliRunner
        >>> from perturb.cli import cli
        >>> out = CliRunner().invoke(cli, ["predict", "--model", "mlp", "--lr", "0.01",
        ...                                "--steps", "3", "--samples", "8", "--exact",
        ...                                "--order", "1"]).stdout
        >>> [line for line in out.splitlines() if line.split()[:1] == ["lr"]][0].split()[-4:]
        ['trusted', 'trusted', 'up', 'to']
    """
    import torch

    from perturb.experiments.data import load_dataset
    from perturb.experiments.models import build_model, load_checkpoint
    from perturb.experiments.pipeline import is_unstable, json_ready
    from perturb.numeric.measuring import measure
    from perturb.numeric.prediction import TRUST_ORDER
    from perturb.numeric.stability import per_sample_top_curvatures
    from perturb.numeric.statistics import check_schedule_sizes
    from perturb.numeric.trust import BLOW_UP
    from perturb.symbolic.schedules import Online

    check_schedule_sizes(Online(steps=steps, batch_size=batch_size))  # before any work
    data = load_dataset(dataset, data_dir=data_dir, split="train")
    if samples is not None and samples > len(data):
        raise click.BadParameter(
            f"{samples} is more than the {len(data)} points of {dataset!r}",
            param_hint="'--samples'",
        )
    model = build_model(model_spec, data.input_shape, data.num_classes, seed=seed)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    if exact and samples is not None and samples < len(data):
        data, samples = data.subset(samples, seed=seed), None
    model = model.to(device)
    if resummed and order > 3:
        raise click.BadParameter(
            f"re-summed predictions have at most 3 edges, got --order {order}",
            param_hint="'--order'",
        )
    schedule = Online(steps=steps, batch_size=batch_size)
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    krylov = {}
    if resummed:
        rank = min(krylov_rank, parameters)
        krylov = {"resummed": True, "rank": rank, "higher_rank": min(krylov_higher_rank, rank)}
    stats = measure(
        model,
        (data.x.to(device), data.y.to(device)),
        order=max(order, TRUST_ORDER) if exact or resummed else order,  # see the docstring
        schedules=[schedule],
        quantities=(quantity,),
        exact=exact,
        samples=samples,
        seed=seed,
        dtype=torch.float32,
        **krylov,
        **_estimation(exact, estimator, target_se, budget, lrs),
    )
    if verbose:
        for line in estimator_lines(stats.meta):
            click.echo(line, err=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = stats.predict(
            schedule, lr=list(lrs), quantity=quantity, order=order, resummed=resummed
        )
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    curvatures = None  # one-step overshoot of single samples, as validate checks it
    if resummed:
        _, curvatures = per_sample_top_curvatures(
            model, (data.x.to(device), data.y.to(device)), progress=True
        )
    trust = stats.trust(
        schedule, lr=list(lrs), quantity=quantity, order=order, resummed=resummed,
        sample_curvatures=curvatures,
    )  # fmt: skip
    estimate, ladder = trust.error_estimate, trust.checks["hessian_ladder"]
    asked = len(data) if samples is None else samples
    if stats.rows != asked:
        size = stats.meta.get("tuple_size")
        held = stats.meta.get("plan", {}).get("pilot_rows", 0)
        why = f"disjoint tuples of {size} rows" if size else "the estimator's groups"
        if held:
            why = f"{held} held out for the pilot; the rest in {stats.groups} groups"
        click.echo(f"note: {stats.rows} of the {asked} points are used ({why})", err=True)
    start_loss = _mean_loss(model, data.x.to(device), data.y.to(device))
    unstable = [is_unstable(float(v), start_loss) for v in pred.total]  # validate's rule
    if any(unstable):
        bad = ", ".join(f"{lr:g}" for lr, u in zip(lrs, unstable, strict=True) if u)
        click.echo(
            f"note: at lr {bad} the series leaves [−{BLOW_UP:g}·l(θ_0), "
            f"{10 + BLOW_UP:g}·l(θ_0)] (l(θ_0) = {start_loss:.4g}): unstable, no "
            "prediction; use a smaller --lr or --steps, or --resummed",
            err=True,
        )
    if fmt == "json":
        total = [None if u else float(v) for v, u in zip(pred.total, unstable, strict=True)]
        report = {
            "quantity": quantity,
            "steps": steps,
            "batch_size": batch_size,
            "exact": exact,
            "rows": stats.rows,
            "start_loss": start_loss,
            "lr": pred.lr.tolist(),
            "by_order": pred.by_order.tolist(),
            "total": total,
            "unstable": unstable,
            "se": pred.se.tolist(),
            "error_estimate": estimate.tolist(),
            "hessian_ladder": ladder.tolist(),
            "trusted": [bool(t) for t in trust.trusted],
            "trusted_steps": [int(t) for t in trust.trusted_steps],
            "trusted_eta_t": trust.trusted_eta_t.tolist(),
            "validity": {k: v.tolist() for k, v in trust.checks.items()},
            "resummed": resummed,
            **({"krylov_rank": pred.rank} if resummed else {}),
        }
        click.echo(json.dumps(json_ready(report), indent=2, allow_nan=False))  # NaN → null
        return
    label = "edges" if resummed else "η^"
    head = f"{'lr':>8} " + " ".join(
        f"{(f'{d} edges' if resummed else 'η^' + str(d)):>12}" for d in range(order + 1)
    )
    kind = f"re-summed, {order} {label}, Krylov rank {pred.rank}" if resummed else f"order {order}"
    click.echo(
        f"E[{quantity}] after {steps} steps of online SGD (batch {batch_size}), "
        f"{kind}, from {stats.rows} points ({'exact' if exact else 'estimated'}):"
    )
    click.echo(
        head + f" {'total':>12} {'± s.e.':>10} {'error est.':>10} {'trusted':>8}  trusted up to"
    )
    for i, lr in enumerate(pred.lr):
        cells = " ".join(f"{v:12.6f}" for v in pred.by_order[i])
        total = f"{'unstable':>12} {'–':>10}" if unstable[i] else f"{pred.total[i]:12.6f}"
        if not unstable[i]:
            total += f" {pred.se[i]:10.6f}"
        reach = int(trust.trusted_steps[i])
        upto = f"T = {reach} (ηT = {lr * reach:.3g})" if reach else "never"
        verdict = "yes" if trust.trusted[i] else "no"
        click.echo(f"{lr:8.4g} {cells} {total} {estimate[i]:10.3g} {verdict:>8}  {upto}")
    click.echo(
        "trusted: error estimate ≤ a tenth of the predicted change or ≤ one run's predicted "
        "spread, and no instability check fired (perturb.numeric.trust)"
        + ("" if resummed else "; --resummed adds the displacement, spread and stability"),
        err=True,
    )


def _mean_loss(model, x, y, chunk: int = 1024) -> float:
    """``l(θ_0)``: the model's mean cross-entropy over the points (the loss measured)."""
    import torch

    total = 0.0
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), x.dtype)
    x = x.to(dtype)  # a float64 model reads float64 inputs
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            rows = slice(start, start + chunk)
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows], reduction="sum")
            total += float(loss)
    return total / len(x)
