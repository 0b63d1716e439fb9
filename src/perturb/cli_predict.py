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
        ...         "sketch": {"variance": 1e-4, "seconds": 0.1},
        ...         "tuples": {"variance": 9e-4, "seconds": 0.2}}}}
        >>> for line in estimator_lines({"estimator": "auto", "plan": plan}):
        ...     print(line)
        estimator: auto (pilot on 64 points)
          measured on 448 points, 1 replicate, predicted s.e. 0.01
          G·G: sketch (pilot variance × seconds: sketch 1e-05, tuples 0.00018)
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
        wnv = {e: entry[e]["variance"] * entry[e]["seconds"] for e in ("sketch", "tuples")}
        lines.append(
            f"  {entry['text']}: {entry['estimator']} (pilot variance × seconds: "
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

    Example:
        >>> from click.testing import CliRunner
        >>> from perturb.cli import cli
        >>> out = CliRunner().invoke(cli, ["predict", "--model", "mlp", "--lr", "0.01",
        ...                                "--steps", "3", "--samples", "8", "--exact",
        ...                                "--order", "1"]).stdout
        >>> [line for line in out.splitlines() if line.split()[:1] == ["lr"]][0].split()[-3:]
        ['s.e.', 'error', 'est.']
    """
    import numpy as np
    import torch

    from perturb.experiments.data import load_dataset
    from perturb.experiments.models import build_model, load_checkpoint
    from perturb.numeric.measuring import measure
    from perturb.numeric.validity import hessian_ladder, truncation_estimates, with_ladder
    from perturb.symbolic.schedules import Online

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
    parameters = sum(p.numel() for p in model.parameters())
    krylov = {}
    if resummed:
        rank = min(krylov_rank, parameters)
        krylov = {"resummed": True, "rank": rank, "higher_rank": min(krylov_higher_rank, rank)}
    stats = measure(
        model,
        (data.x.to(device), data.y.to(device)),
        order=order,
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
    extra = pred.cumulative_error if resummed else None
    estimate = truncation_estimates(pred.by_order, extra=extra)[:, -1]
    ladder = np.full(len(lrs), np.nan)  # the test loss the per-sample Hessians add
    if resummed and quantity == "test":
        ladder = hessian_ladder(stats.subspace, lr=lrs, steps=steps, batch_size=batch_size)
        estimate = with_ladder(estimate, ladder)
    asked = len(data) if samples is None else samples
    if stats.rows != asked:
        size = stats.meta.get("tuple_size")
        held = stats.meta.get("plan", {}).get("pilot_rows", 0)
        why = f"disjoint tuples of {size} rows" if size else "the estimator's groups"
        if held:
            why = f"{held} held out for the pilot; the rest in {stats.groups} groups"
        click.echo(f"note: {stats.rows} of the {asked} points are used ({why})", err=True)
    if fmt == "json":
        click.echo(
            json.dumps(
                {
                    "quantity": quantity,
                    "steps": steps,
                    "batch_size": batch_size,
                    "exact": exact,
                    "rows": stats.rows,
                    "lr": pred.lr.tolist(),
                    "by_order": pred.by_order.tolist(),
                    "total": pred.total.tolist(),
                    "se": pred.se.tolist(),
                    "error_estimate": [float(e) if np.isfinite(e) else None for e in estimate],
                    "hessian_ladder": [float(e) if np.isfinite(e) else None for e in ladder],
                    "resummed": resummed,
                    **({"krylov_rank": pred.rank} if resummed else {}),
                },
                indent=2,
            )
        )
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
    click.echo(head + f" {'total':>12} {'± s.e.':>10} {'error est.':>10}")
    for i, lr in enumerate(pred.lr):
        cells = " ".join(f"{v:12.6f}" for v in pred.by_order[i])
        click.echo(
            f"{lr:8.4g} {cells} {pred.total[i]:12.6f} {pred.se[i]:10.6f} {estimate[i]:10.3g}"
        )
