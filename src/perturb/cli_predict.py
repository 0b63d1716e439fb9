"""The work of ``perturb predict``: measure at a checkpoint, predict, print.

Kept apart from :mod:`perturb.cli` (which holds the command's options) so that the
command line module stays an index of commands; imports torch only when called.
"""

from __future__ import annotations

import json
import warnings

import click

__all__ = ["run_predict"]


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
    from perturb.numeric.validity import truncation_estimates
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
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pred = stats.predict(
            schedule, lr=list(lrs), quantity=quantity, order=order, resummed=resummed
        )
    for warning in caught:
        click.echo(f"warning: {warning.message}", err=True)
    extra = pred.cumulative_error if resummed else None
    estimate = truncation_estimates(pred.by_order, extra=extra)[:, -1]
    asked = len(data) if samples is None else samples
    if stats.rows != asked:
        size = stats.meta.get("tuple_size")
        why = f"disjoint tuples of {size} rows" if size else "the estimator's layout"
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
