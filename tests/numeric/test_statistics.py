"""Statistics (perturb.numeric.statistics).

* lookups by printed name, by Contraction, by full key; unknown and ambiguous names;
* predictions from measured statistics (``Statistics.predict``) equal ``perturb.predict``
  and, on a polynomial landscape with rational data, the brute-force rational oracle;
  sampled predictions carry the spread of per-group predictions as their error;
* save/load and the errors of predict and lookups.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch
from measure_models import (
    F64,
    POLY_DATA,
    POLY_ROWS,
    POLY_TH,
    POLY_THETA0,
    SCHEDULES,
    U,
    V,
    W,
    _assert_close,
    _exact,
    _one_thread,  # noqa: F401
    _poly,
    poly_loss,
)

from perturb import GD, QUANTITIES, Epochs, Online, Population, predict, series
from perturb.numeric.measuring import measure
from perturb.numeric.statistics import Statistics
from perturb.reference import oracle_series
from perturb.symbolic.contractions import Contraction

GG = Contraction(parents=(-1, 0), parts=((0,), (1,)))  # G·G
TRCH = Contraction(parents=(-1, 0, 0), parts=((0,), (1, 2)))  # tr(C H)
GHG = Contraction(parents=(-1, 0, 1), parts=((0,), (1,), (2,)))  # G·H·G


def _loss(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((p - x) ** 2).sum() / 2 + (p[0] * x[1]) ** 3 / 6


@pytest.fixture(scope="module")
def stats() -> Statistics:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 2, dtype=torch.float64, generator=gen)
    return measure(
        _loss, x, torch.tensor([0.3, -0.2], dtype=torch.float64), order=2, progress=False
    )


def test_names_of_the_contractions():
    assert (GG.text, TRCH.text, GHG.text) == ("G·G", "tr(C H)", "G·H·G")


def test_lookup_by_name_contraction_and_key_agree(stats):
    for c in (GG, TRCH, GHG):
        want = stats.group_values[c.key].mean(axis=0)
        for item in (c.text, c, c.key):
            assert item in stats
            assert stats.key(item) == c.key
            np.testing.assert_array_equal(stats[item], want)
            np.testing.assert_array_equal(stats.value(item), want)
            np.testing.assert_array_equal(stats.se(item), stats.se(c.key))
    assert float(stats.se("tr(C H)")) > 0


def test_lookup_by_an_isomorphic_contraction(stats):
    relabelled = Contraction(parents=(-1, 0, 0), parts=((0,), (2, 1)))  # tr(C H) spelt anew
    assert relabelled in stats
    assert stats.key(relabelled) == TRCH.key


def test_unknown_names_raise_key_error_listing_the_measured_names(stats):
    assert "tr(C)" not in stats and 3 not in stats
    with pytest.raises(KeyError, match=r"no statistic for 'tr\(C\)'") as err:
        stats["tr(C)"]
    assert "G·H·G" in str(err.value) and "tr(C H)" in str(err.value)
    with pytest.raises(KeyError, match=r"measured: .*'G·G'"):
        stats.value("G·G|not-a-hash")
    with pytest.raises(KeyError, match=r"no statistic for 'tr\(C\)'"):
        stats.se(Contraction(parents=(-1, 0), parts=((0, 1),)))
    with pytest.raises(TypeError, match="by name or Contraction"):
        stats.value(3)


def test_an_ambiguous_name_raises_key_error():
    # two statistics printed alike (e.g. saved by another version of the printer)
    values = {"G·G|aaa": np.zeros(2), "G·G|bbb": np.ones(2)}
    st = Statistics(
        order=1,
        exact=False,
        rows=4,
        groups=2,
        parameters=1,
        contractions={key: GG for key in values},
        group_values=values,
    )
    assert "G·G" in st
    with pytest.raises(KeyError, match="'G·G' matches 2 measured statistics") as err:
        st["G·G"]
    assert "pass the full key" in str(err.value) and "measured: ['G·G', 'G·G']" in str(err.value)
    assert float(st["G·G|bbb"]) == 1.0  # the full key still picks one


@pytest.mark.parametrize(
    ("name", "quantities"),
    [
        ("mlp", QUANTITIES),
        # the convnet (-m slow): the twin of the mlp, which runs every quantity
        pytest.param("convnet", ("gap", "displacement"), marks=pytest.mark.slow),
    ],
)
def test_predictions_match_predict(name, quantities):
    stats, _, per_row, rows, theta0 = _exact(name)
    population = Population(per_row, rows)
    lrs = [0.0, 0.05, 0.3]
    for schedule in SCHEDULES:
        for quantity in quantities:
            want = predict(population, theta0, schedule, lr=1.0, order=3, quantity=quantity)
            got = stats.predict(schedule, lr=lrs, quantity=quantity)
            for d in range(4):
                _assert_close(got.coefficients[d], want.coefficients[d], 1e-10, f"{quantity} η^{d}")
            for i, lr in enumerate(lrs):
                _assert_close(got.total[i], want.at(lr).total, 1e-10, f"{quantity} at {lr}")
            assert np.all(got.se == 0)


ORACLE_SCHEDULES = [
    (Online(steps=3, batch_size=2), {"kind": "online", "steps": 3, "batch_size": 2}),
    (
        Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True),
        {"kind": "epochs", "train_size": 2, "batch_size": 1, "epochs": 2, "shuffle": True},
    ),
    (
        Epochs(train_size=2, batch_size=1, epochs=2),
        {"kind": "epochs", "train_size": 2, "batch_size": 1, "epochs": 2},
    ),
    (GD(train_size=2, steps=2), {"kind": "epochs", "train_size": 2, "batch_size": 2, "epochs": 2}),
]


def test_predictions_match_rational_oracle():
    losses = [_poly(a, b, c, U, V, W) for a, b, c in POLY_ROWS]
    stats = measure(
        poly_loss,
        POLY_DATA,
        POLY_TH,
        order=3,
        schedules=[s for s, _ in ORACLE_SCHEDULES],
        quantities=QUANTITIES,
        exact=True,
        progress=False,
    )
    for schedule, kw in ORACLE_SCHEDULES:
        oracle = {}
        for quantity in QUANTITIES:
            if quantity == "gap":  # test − train: the same rationals as the oracle's gap
                pairs = zip(oracle["test"], oracle["train"], strict=True)
                oracle[quantity] = [a - b for a, b in pairs]
            else:
                oracle[quantity] = oracle_series(
                    losses, [U, V, W], POLY_THETA0, order=3, quantity=quantity, **kw
                )
            want = np.array(oracle[quantity], dtype=float)
            if quantity == "displacement":
                want = want.T  # (order + 1, P)
            got = stats.predict(schedule, lr=0.1, quantity=quantity).coefficients
            _assert_close(got, want, 1e-10, f"{schedule.name} {quantity}")


def test_sampled_predictions_carry_group_errors():
    gen = torch.Generator().manual_seed(3)
    draws = torch.rand(64, 3, generator=gen, dtype=F64)
    stats = measure(
        poly_loss,
        draws,
        POLY_TH,
        order=2,
        samples=48,
        groups=8,
        seed=1,
        progress=False,
        estimator="groups",
    )
    assert stats.rows == 48 and stats.groups == 8 and not stats.exact
    pred = stats.predict(Online(steps=4, batch_size=1), lr=[0.0, 0.1, 0.2])
    assert pred.total.shape == (3,) and pred.se.shape == (3,)
    assert np.all(pred.se > 0)
    # the prediction is linear in the values: its SE is the spread of per-group predictions
    s = series(2, Online(steps=4, batch_size=1))
    per_group = sum(
        float(t.coefficient) * 0.2**t.power * stats.group_values[t.contraction.key] for t in s.terms
    )
    assert abs(pred.se[2] - per_group.std(ddof=1) / math.sqrt(8)) < 1e-12
    assert abs(pred.total[2] - per_group.mean()) < 1e-12


def test_save_load_round_trip(tmp_path):
    stats = measure(
        poly_loss,
        torch.rand(40, 3, dtype=F64),
        POLY_TH,
        order=2,
        quantities=("test", "displacement"),
        groups=4,
        progress=False,
    )
    path = tmp_path / "stats.npz"
    stats.save(path)
    back = Statistics.load(path)
    assert back.contractions.keys() == stats.contractions.keys()
    for key in stats.contractions:
        np.testing.assert_array_equal(back.group_values[key], stats.group_values[key])
    assert (back.order, back.exact, back.rows, back.groups, back.parameters, back.meta) == (
        stats.order,
        stats.exact,
        stats.rows,
        stats.groups,
        stats.parameters,
        stats.meta,
    )
    schedule = Online(steps=5, batch_size=2)
    for q in ("test", "displacement"):
        a, b = (
            stats.predict(schedule, lr=[0.1], quantity=q),
            back.predict(schedule, lr=[0.1], quantity=q),
        )
        np.testing.assert_array_equal(a.total, b.total)
        np.testing.assert_array_equal(a.se, b.se)
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a perturb statistics file"):
        Statistics.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Statistics.load(tmp_path / "missing.npz")


def test_errors_predict():
    stats = measure(poly_loss, POLY_DATA, POLY_TH, order=2, exact=True, progress=False)
    with pytest.raises(ValueError, match="numeric schedule sizes"):
        stats.predict(Online(), lr=0.1)
    with pytest.raises(KeyError, match="lack"):
        stats.predict(Online(steps=2, batch_size=1), lr=0.1, quantity="displacement")
    with pytest.raises(ValueError, match="quantity must be one of"):
        stats.predict(Online(steps=2, batch_size=1), lr=0.1, quantity="loss")
    with pytest.raises(ValueError, match=r"order must be an integer in 0\.\.2"):
        stats.predict(Online(steps=2, batch_size=1), lr=0.1, order=3)
    with pytest.raises(ValueError, match="finite"):
        stats.predict(Online(steps=2, batch_size=1), lr=float("nan"))
    with pytest.raises(KeyError, match="no statistic"):
        stats.value("nothing")
    assert Contraction((-1, 0), ((0,), (1,))) in stats


# ---------------------------------------------------------------- files and learning rates checked
def _saved(tmp_path) -> tuple:
    """A saved estimate (4 groups; a closed and an open-root statistic): path, header, arrays."""
    stats = measure(
        poly_loss,
        torch.rand(40, 3, dtype=F64, generator=torch.Generator().manual_seed(5)),
        POLY_TH,
        order=2,
        quantities=("test", "displacement"),
        groups=4,
        progress=False,
    )
    path = tmp_path / "good.npz"
    stats.save(path)
    with np.load(path) as z:
        header = json.loads(str(z["header"]))
        arrays = {k: np.array(z[k]) for k in z.files if k != "header"}
    return path, header, arrays


def _open_index(header: dict) -> int:
    return next(i for i, e in enumerate(header["entries"]) if e["open_root"])


def _edit_nan(h, a):
    a["values_0"][1] = np.nan


def _edit_shape(h, a):
    a["values_0"] = a["values_0"][:, None]


def _edit_parameters(h, a):
    i = _open_index(h)
    a[f"values_{i}"] = np.concatenate([a[f"values_{i}"], a[f"values_{i}"][:, :1]], axis=1)


def _edit_count(h, a):
    a["values_0"] = a["values_0"][:-1]


def _set(**fields):
    def edit(h, a):
        h.update(fields)

    return edit


CORRUPT_HEADERS = [  # (how the stored header or arrays are changed, a fragment of the message)
    pytest.param(_edit_nan, "not all finite", id="nan-values"),
    pytest.param(_edit_shape, "expected (K,)", id="closed-shape"),
    pytest.param(_edit_parameters, "expected (K, 3)", id="open-root-shape"),
    pytest.param(_edit_count, "holds 3 group values, the header says 4", id="group-count"),
    pytest.param(_set(exact=True), "exact statistics hold one group", id="exact-flipped"),
    pytest.param(_set(exact=1), "exact must be true or false", id="exact-not-bool"),
    pytest.param(_set(groups=-3), "groups must be an integer ≥ 1, got -3", id="groups<0"),
    pytest.param(_set(groups=41), "groups = 41 is more than rows = 40", id="groups>rows"),
    pytest.param(_set(rows="40"), "rows must be an integer ≥ 1, got '40'", id="rows-string"),
    pytest.param(_set(order=9), "order 9, but the diagrams stored have at most 2", id="order-9"),
    pytest.param(_set(version=2), "version 2, expected 1", id="version"),
    pytest.param(_set(entries={}), "entries a list", id="entries-dict"),
    pytest.param(lambda h, a: a.pop("values_1"), "no numeric values", id="values-missing"),
    pytest.param(lambda h, a: h["entries"][0].pop("parents"), "entry 0: KeyError", id="parents"),
    pytest.param(lambda h, a: h["entries"][1].update(key=h["entries"][0]["key"]), "repeat", id="2"),
]


@pytest.mark.parametrize(("edit", "fragment"), CORRUPT_HEADERS)
def test_load_refuses_inconsistent_statistics(tmp_path, edit, fragment):
    """Each inconsistency of a saved file is one StatisticsFileError naming the file."""
    from perturb.errors import PerturbError, StatisticsFileError

    _, header, arrays = _saved(tmp_path)
    edit(header, arrays)
    path = tmp_path / "edited.npz"
    np.savez(path, header=np.array(json.dumps(header)), **arrays)
    with pytest.raises(StatisticsFileError) as err:
        Statistics.load(path)
    message = str(err.value)
    assert isinstance(err.value, PerturbError) and "\n" not in message
    assert message.startswith(f"{str(path)!r} is not a perturb statistics file (")
    assert fragment in message


def _bytes_random(good):
    return np.random.default_rng(3).integers(0, 256, 2048, dtype=np.uint8).tobytes()


def _bytes_npy(good):
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros(3))
    return buf.getvalue()


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


CORRUPT_FILES = [  # (the file's bytes from the good file's, what numpy or json raised)
    pytest.param(_bytes_random, "ValueError", id="random-bytes"),
    pytest.param(lambda good: good[: len(good) // 2], "BadZipFile", id="truncated"),
    pytest.param(lambda good: good[:-30], "BadZipFile", id="cut-end"),
    pytest.param(lambda good: b"", "EOFError", id="empty"),
    pytest.param(_bytes_npy, "a single array", id="npy"),
    pytest.param(lambda good: _npz_bytes(x=np.zeros(2)), "no header", id="no-header"),
    pytest.param(lambda good: _npz_bytes(header=np.array("{oops")), "JSONDecodeError", id="json"),
    pytest.param(lambda good: _npz_bytes(header=np.array("[]")), "perturb.Statistics", id="list"),
]


@pytest.mark.parametrize(("corrupt", "fragment"), CORRUPT_FILES)
def test_load_refuses_corrupt_files(tmp_path, corrupt, fragment):
    """A file numpy cannot read as the archive ``save`` writes is one StatisticsFileError
    (never BadZipFile, EOFError, KeyError or AttributeError)."""
    from perturb.errors import StatisticsFileError

    good, _, _ = _saved(tmp_path)
    path = tmp_path / "corrupt.npz"
    path.write_bytes(corrupt(good.read_bytes()))
    with pytest.raises(StatisticsFileError) as err:
        Statistics.load(path)
    message = str(err.value)
    assert "\n" not in message and f"{str(path)!r} is not a perturb statistics file" in message
    assert fragment in message


BAD_LRS = [-0.5, "0.01", True, [], [[0.1]], math.nan, math.inf, None, [0.1, -1.0]]
BAD_LRS += [np.array([-0.5]), np.array([[0.1]]), {"lr": 0.1}]


@functools.cache
def _small_statistics(resummed: bool) -> Statistics:
    x = torch.randn(12, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    krylov = {"resummed": True, "rank": 2} if resummed else {}
    theta0 = torch.tensor([0.3, -0.2], dtype=F64)
    return measure(_loss, x, theta0, order=2, exact=True, progress=False, **krylov)


@pytest.mark.parametrize("lr", BAD_LRS, ids=repr)
@pytest.mark.parametrize("resummed", [False, True])
def test_predict_checks_learning_rates_like_perturb_predict(lr, resummed):
    """Statistics.predict refuses what perturb.predict refuses (perturb.checks): negative,
    strings, booleans, empty or nested grids, non-finite values; 0 only un-resummed."""
    kind = "positive" if resummed else "non-negative"
    with pytest.raises(ValueError, match=f"^lr must be {kind} finite numbers, got "):
        _small_statistics(resummed).predict(Online(steps=3, batch_size=1), lr=lr, resummed=resummed)
    if not isinstance(lr, list | np.ndarray | dict):  # perturb.predict takes one number
        pop, theta0 = Population(_loss, torch.randn(4, 2, dtype=F64)), torch.zeros(2, dtype=F64)
        with pytest.raises(ValueError, match=r"^lr must be a positive finite number, got "):
            predict(pop, theta0, Online(steps=3, batch_size=1), lr=lr, order=1)


def test_predict_takes_zero_numpy_grids_and_refuses_huge_schedules(stats):
    """η = 0 is the loss at θ_0 (un-resummed); NumPy grids and scalars are grids and
    numbers; a schedule past 2^53 steps is refused, not evaluated to NaN."""
    sched = Online(steps=4, batch_size=1)
    pred = stats.predict(sched, lr=[0.0, np.float32(0.25)])
    assert pred.total[0] == pytest.approx(float(stats["l"]), rel=1e-15)
    grid = stats.predict(sched, lr=np.array([0.0, 0.25]))
    np.testing.assert_array_equal(grid.total, pred.total)
    assert stats.predict(sched, lr=np.float64(0.25)).total.tolist() == [pred.total[1]]
    with pytest.raises(ValueError, match=r"^steps must be at most 2\^53 .* a 401-digit number$"):
        stats.predict(Online(steps=10**400, batch_size=1), lr=0.1)
    with pytest.raises(ValueError, match=r"^batch_size must be at most 2\^53 .* 9007199254740993$"):
        stats.predict(Online(steps=1, batch_size=2**53 + 1), lr=0.1)
