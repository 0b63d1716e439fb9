"""The planning options of ``measure`` (estimator "auto"/"sketch") and perturb.numeric.allocation.

* every ValueError of the planning options, the pilot and the sketch layout, with its
  message;
* ``prediction_weights`` against the series coefficients worked out by hand;
* ``measure(estimator="auto")``: the pilot's plan recorded in ``meta["plan"]`` (rows,
  replicates, predicted standard error, an estimator per contraction), fewer rows for a
  looser ``target_se``, a ``budget`` respected, and the fallbacks with too few rows.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from measure_models import F64, _one_thread, poly_loss  # noqa: F401

from perturb import Epochs, Online, series
from perturb.numeric import allocation
from perturb.numeric.adapters import objective
from perturb.numeric.allocation import ESTIMATORS, Plan, pilot_plan, prediction_weights
from perturb.numeric.measuring import ESTIMATOR_NAMES, measure, requested_contractions

THETA = torch.tensor([0.3, -0.2, 0.4], dtype=F64)
ONLINE = Online(steps=3, batch_size=2)


def _rows(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, generator=gen, dtype=F64) * 2 - 1


ROWS = _rows(256)


def _measure(rows=ROWS, **kw):
    kw.setdefault("order", 2)
    kw.setdefault("schedules", (ONLINE,))
    kw.setdefault("progress", False)
    return measure(poly_loss, rows, THETA, **kw)


# --------------------------------------------------------------------- error paths
def test_estimator_name_lists_the_options():
    assert ESTIMATOR_NAMES == ("auto", "sketch", "tuples", "groups")
    with pytest.raises(ValueError) as err:
        _measure(estimator="sketches")
    message = str(err.value)
    assert "estimator must be one of" in message and "'sketches'" in message
    for name in ESTIMATOR_NAMES:
        assert repr(name) in message


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_replicates_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="replicates must be an integer ≥ 1"):
        _measure(estimator="sketch", replicates=bad)


@pytest.mark.parametrize("estimator", ["auto", "tuples", "groups"])
def test_replicates_apply_to_the_sketch_only(estimator):
    with pytest.raises(ValueError, match="replicates=2 applies to estimator='sketch'"):
        _measure(estimator=estimator, replicates=2)


@pytest.mark.parametrize("estimator", ["sketch", "tuples", "groups"])
def test_planning_options_apply_to_auto_only(estimator):
    with pytest.raises(ValueError, match=f"lr apply to estimator='auto', got '{estimator}'"):
        _measure(estimator=estimator, lr=0.1)
    with pytest.raises(ValueError, match="lr, target_se apply to estimator='auto'"):
        _measure(estimator=estimator, lr=0.1, target_se=0.01)
    with pytest.raises(ValueError, match=r"^budget apply to estimator='auto'"):
        _measure(estimator=estimator, budget=10)


def test_target_se_and_budget_exclude_each_other():
    with pytest.raises(ValueError, match="pass target_se or budget, not both"):
        _measure(lr=0.1, target_se=0.01, budget=10.0)


@pytest.mark.parametrize("name", ["target_se", "budget"])
@pytest.mark.parametrize("bad", [0, -0.5, math.nan, math.inf, "1", [1.0], True])
def test_target_se_and_budget_must_be_positive_numbers(name, bad):
    with pytest.raises(ValueError, match=f"{name} must be a positive number, got"):
        _measure(lr=0.1, **{name: bad})


@pytest.mark.parametrize("bad", [-0.1, [0.1, math.nan], [0.1, math.inf], []])
def test_lr_must_be_non_negative_numbers(bad):
    with pytest.raises(ValueError, match="lr must be non-negative numbers, got"):
        _measure(lr=bad)


@pytest.mark.parametrize("name", ["target_se", "budget"])
def test_target_se_and_budget_need_lr(name):
    with pytest.raises(ValueError, match="target_se and budget plan for predictions: pass lr"):
        _measure(**{name: 1.0})


def test_lr_needs_a_numeric_schedule():
    with pytest.raises(ValueError, match="lr plans for predictions of numeric schedules"):
        _measure(lr=0.1, schedules=(Online(), Epochs()))
    # one numeric schedule among symbolic ones is enough
    st = _measure(lr=0.1, schedules=(Online(), ONLINE), groups=4, pilot=0)
    assert st.meta["estimator"] == "auto"


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_pilot_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="pilot must be an integer ≥ 0"):
        _measure(groups=4, pilot=bad)


@pytest.mark.parametrize(
    "kw",
    [
        {"estimator": "sketch", "groups": 4},
        {"estimator": "tuples"},
        {"estimator": "auto", "groups": 16, "rows": ROWS[:64]},  # falls back to tuples
    ],
)
def test_invalid_pilot_is_never_ignored(kw):
    with pytest.raises(ValueError, match="pilot"):
        _measure(pilot=-3, **kw)


def test_pilot_too_small_to_fill_its_groups():
    # order 2: m = 3 distinct rows (tr(C H)), so a pilot needs 2·3·4 = 24 rows in 4 groups
    with pytest.raises(
        ValueError, match=r"pilot=23 rows cannot fill 4 groups of 6 rows .* at least 24"
    ):
        _measure(groups=4, pilot=23)
    st = _measure(groups=4, pilot=24)  # the least pilot
    assert st.meta["plan"]["pilot_rows"] == 24


def test_pilot_leaving_too_few_rows():
    # 64 rows, 4 groups of at least m = 3: the pilot may take at most 64 − 12 = 52
    with pytest.raises(ValueError, match="pilot=53 leaves fewer than 12 of the 64 rows to measure"):
        _measure(rows=ROWS[:64], groups=4, pilot=53)
    st = _measure(rows=ROWS[:64], groups=4, pilot=52)
    assert st.rows == 12 and st.meta["plan"]["pilot_rows"] == 52


def test_sketch_layout_needs_m_rows_per_group():
    # order 3: m = 4; 30 rows make 8 groups of 3 only
    with pytest.raises(
        ValueError, match="30 rows cannot be split into 8 groups of at least 4 rows"
    ):
        _measure(rows=ROWS[:30], order=3, estimator="sketch", groups=8)
    st = _measure(rows=ROWS[:32], order=3, estimator="sketch", groups=8)
    assert st.groups == 8 and st.rows == 32
    with pytest.raises(ValueError, match="groups must be an integer ≥ 2, got 1"):
        _measure(estimator="sketch", groups=1)


def test_sketch_layout_with_samples():
    with pytest.raises(ValueError, match="20 rows cannot be split into 8 groups of at least 3"):
        _measure(estimator="sketch", groups=8, samples=20)


# --------------------------------------------------------------------- prediction weights
def test_prediction_weights_order_one_by_hand():
    # online SGD, B = 1: E l(θ_T) = l − T η G·G + O(η²)
    cs = requested_contractions(1, (Online(),), ("test",))
    assert [c.text for c in cs.values()] == ["l", "G·G"]
    w = prediction_weights(cs, [(Online(steps=10, batch_size=1), "test")], [0.1, 0.25, 0.0])
    np.testing.assert_allclose(w, [[1.0, -1.0], [1.0, -2.5], [1.0, 0.0]], rtol=1e-15)


def test_prediction_weights_order_two_by_hand():
    # Δ = θ_T − θ_0 = −η Σ_t ḡ_t(θ_t), ḡ_t(θ) ≈ ḡ_t + H̄_t (θ − θ_0); to η²
    #   G·E[Δ] = −ηT G·G + η² T(T−1)/2 G·H·G,
    #   ½ E[Δᵀ H Δ] = ½ η² (T(T−1) G·H·G + T (G·H·G + tr(C H)/B)),
    # so G·H·G has (2T² − T)/2 η² and tr(C H) has T/(2B) η².
    t, b = 10, 2
    cs = requested_contractions(2, (Online(),), ("test",))
    keys = {c.text: i for i, c in enumerate(cs.values())}
    assert set(keys) == {"l", "G·G", "G·H·G", "tr(C H)"}
    schedule = Online(steps=t, batch_size=b)
    lrs = [0.1, 0.03]
    w = prediction_weights(cs, [(schedule, "test"), (schedule, "displacement")], lrs)
    assert w.shape == (2, 4)  # displacement predictions are left out
    for row, eta in zip(w, lrs, strict=True):
        assert row[keys["l"]] == 1.0
        assert abs(row[keys["G·G"]] + t * eta) < 1e-15
        assert abs(row[keys["G·H·G"]] - (2 * t * t - t) / 2 * eta**2) < 1e-13
        assert abs(row[keys["tr(C H)"]] - t / (2 * b) * eta**2) < 1e-15
    # a series is used to the highest order whose every term was measured
    partial = {k: c for k, c in cs.items() if c.text != "tr(C H)"}
    w1 = prediction_weights(partial, [(schedule, "test")], [0.1])
    texts = [c.text for c in partial.values()]
    assert w1[0, texts.index("G·H·G")] == 0.0 and w1[0, texts.index("G·G")] == -1.0
    # the train loss of epochs: the same as the series' own coefficients
    ep = Epochs(train_size=4, batch_size=2, epochs=2)
    cs2 = requested_contractions(2, (ep,), ("train",))
    w2 = prediction_weights(cs2, [(ep, "train")], [0.2])
    want = np.zeros(len(cs2))
    for term in series(2, ep, "train").terms:
        want[list(cs2).index(term.contraction.key)] += float(term.coefficient) * 0.2**term.power
    np.testing.assert_allclose(w2[0], want, rtol=1e-14)


# --------------------------------------------------------------------- plans
@pytest.fixture
def erratic_clock(monkeypatch):
    """A clock whose intervals jump between 1 µs and 1000 s: a plan that read it would
    change with it (the pilot records seconds for information only)."""
    steps = itertools.accumulate(1e3 if t % 3 == 0 else 1e-6 for t in itertools.count())
    monkeypatch.setattr(allocation.time, "perf_counter", lambda: next(steps))


def test_auto_records_its_plan(erratic_clock):
    rows = _rows(512, seed=1)
    st = _measure(rows=rows, groups=8, lr=[0.1, 0.3], target_se=0.05, seed=2)
    plan = st.meta["plan"]
    assert st.meta["estimator"] == "auto"
    # the default pilot: at most n/8 rows, at least 2m rows in each of the K groups
    assert 2 * 3 * 8 <= plan["pilot_rows"] <= 512 // 8 and plan["pilot_groups"] == 8
    available = 512 - plan["pilot_rows"]
    assert isinstance(plan["rows"], int) and 8 <= plan["rows"] <= available
    assert isinstance(plan["replicates"], int) and 1 <= plan["replicates"] <= 64
    assert st.meta["replicates"] == plan["replicates"]
    assert plan["predicted_se"] > 0 and math.isfinite(plan["predicted_se"])
    assert not plan.get("target_unreachable") and plan["predicted_se"] <= 0.05 * (1 + 1e-9)
    assert set(plan["contractions"]) == set(st.contractions)
    for key, entry in plan["contractions"].items():
        assert entry["text"] == st.contractions[key].text
        assert entry["estimator"] in ESTIMATORS
        for e in ESTIMATORS:
            assert entry[e]["variance"] >= 0 and entry[e]["work"] > 0
            assert entry[e]["seconds"] > 0  # information only
    # the measurement used the planned rows (each group at least the m = 3 rows)
    each = max(plan["rows"] // 8, 3)
    assert st.rows == 8 * each and st.groups == 8


def test_a_looser_target_uses_fewer_rows():
    rows = _rows(2048, seed=3)
    kw = dict(rows=rows, groups=8, lr=[0.05], seed=4)
    plans = {t: _measure(target_se=t, **kw).meta["plan"] for t in (0.005, 0.01, 0.02)}
    for t, plan in plans.items():
        assert not plan.get("target_unreachable"), plan
        assert plan["predicted_se"] <= t * (1 + 1e-9)
    # the modelled variance falls as 1/n: about 1/target² the rows, never fewer than
    # the pilot's (the model is conservative only above them)
    counts = [plans[t]["rows"] for t in (0.005, 0.01, 0.02)]
    pilot = plans[0.005]["pilot_rows"]
    assert counts[0] > counts[1] >= counts[2] >= pilot, counts
    assert counts[0] > 2 * pilot, counts
    # a target no rows reach: every row, and the flag
    hopeless = _measure(target_se=1e-5, **kw).meta["plan"]
    assert hopeless["target_unreachable"] and hopeless["rows"] == 2048 - hopeless["pilot_rows"]
    assert hopeless["predicted_se"] > 1e-5


def test_budget_plans_within_budget():
    rows = _rows(1024, seed=5)
    plans = {
        b: _measure(rows=rows, groups=8, lr=[0.2], budget=b, seed=6).meta["plan"]
        for b in (5.0, 50.0)
    }
    for budget, plan in plans.items():
        assert not plan.get("budget_too_small")
        assert 8 <= plan["rows"] <= 1024 - plan["pilot_rows"]
        # the plan's counted evaluations within the budget of full-batch gradients (one
        # evaluation per row each)
        assert plan["full_batch_gradient_evaluations"] == 1024 - plan["pilot_rows"]
        per_row = plan["evaluations_per_row"]
        cost = plan["rows"] * (per_row["tuples"] + plan["replicates"] * per_row["sketch"])
        assert plan["predicted_evaluations"] == cost
        assert cost <= budget * plan["full_batch_gradient_evaluations"] * (1 + 1e-9)
    assert plans[5.0]["predicted_se"] >= plans[50.0]["predicted_se"]  # less budget, more error
    tiny = _measure(rows=rows, groups=8, lr=[0.2], budget=1e-9, seed=6).meta["plan"]
    assert tiny["budget_too_small"] and tiny["rows"] == tiny["pilot_rows"]  # the floor


def test_auto_depends_on_the_seed_only(erratic_clock):
    # the choice is by counted work × variance: two runs (one on a clock gone wild) give
    # the same plan and the same values bit for bit
    rows = _rows(2048, seed=3)
    runs = [_measure(rows=rows, groups=8, lr=[0.2], target_se=0.01, seed=4) for _ in range(2)]
    plans = [dict(r.meta["plan"]) for r in runs]
    for plan in plans:
        for entry in plan["contractions"].values():
            for e in ESTIMATORS:
                del entry[e]["seconds"]  # recorded, never used
    assert plans[0] == plans[1]
    for key in runs[0].contractions:
        assert np.array_equal(runs[0].group_values[key], runs[1].group_values[key])
    for entry in plans[0]["contractions"].values():  # the smaller variance × work
        wnv = {e: entry[e]["variance"] * entry[e]["work"] for e in ESTIMATORS}
        assert entry["estimator"] == min(ESTIMATORS, key=lambda e: (wnv[e], e != "sketch"))


def test_a_recorded_choice_replays_deterministically():
    # passing the recorded choice back gives the same values on every run
    rows = _rows(2048, seed=3)
    first = _measure(rows=rows, groups=8, lr=[0.2], seed=4)
    choice = {k: e["estimator"] for k, e in first.meta["plan"]["contractions"].items()}
    runs = [_measure(rows=rows, groups=8, estimator=choice, seed=4) for _ in range(2)]
    for key in first.contractions:
        assert np.array_equal(runs[0].group_values[key], runs[1].group_values[key])
    assert runs[0].meta["estimator"] == "sketch" and runs[0].rows == 2048
    by_name = {first.contractions[k].text: e for k, e in choice.items()}
    again = _measure(rows=rows, groups=8, estimator=by_name, seed=4)
    assert all(np.array_equal(again.group_values[k], runs[0].group_values[k]) for k in choice)
    with pytest.raises(ValueError, match="lacks"):
        _measure(rows=rows, groups=8, estimator={"l": "sketch"}, seed=4)
    with pytest.raises(ValueError, match="must be one of"):
        _measure(rows=rows, groups=8, estimator={**by_name, "l": "best"}, seed=4)


def test_target_se_plans_meet_their_target():
    rows = _rows(2048, seed=3)
    st = _measure(rows=rows, groups=8, lr=[0.2], target_se=0.005, seed=4)
    plan = st.meta["plan"]
    assert not plan.get("target_unreachable")
    assert plan["rows"] >= 3 * 8  # the rows a measurement of 8 groups needs at least
    assert plan["rows"] == st.rows
    # the reported standard error (an estimate from 8 groups, relative sd about 0.27)
    se = st.predict(ONLINE, lr=[0.2]).se[0]
    assert se < 2 * plan["predicted_se"], (se, plan["predicted_se"])


def test_auto_with_too_few_rows_falls_back_to_tuples():
    # order 2 (m = 3), 16 groups: auto needs 2·3·16 = 96 rows for its sketch groups
    st = _measure(rows=ROWS[:95], groups=16)
    assert st.meta["estimator"] == "tuples" and "plan" in st.meta
    assert "too few" in st.meta["plan"]["note"]
    assert st.meta["tuple_size"] == 3 and st.groups == 95 // 3
    st = _measure(rows=ROWS[:40], groups=1)  # groups < 2: tuples too
    assert st.meta["estimator"] == "tuples"


def test_a_target_without_room_for_a_pilot_is_an_error():
    with pytest.raises(ValueError, match="leave no room for one"):
        _measure(rows=_rows(200, seed=7), groups=16, lr=[0.1], target_se=0.01)


def test_auto_without_room_for_a_pilot_sketches_everything():
    # 96 ≤ n but n/8 = 12 < 2·m·K = 96: no pilot, every contraction sketched
    rows = _rows(200, seed=7)
    st = _measure(rows=rows, groups=16)
    assert st.meta["estimator"] == "auto" and st.meta["plan"]["pilot_rows"] == 0
    assert st.groups == 16 and st.rows == 16 * (200 // 16)
    st0 = _measure(rows=_rows(2048, seed=8), groups=4, pilot=0)  # explicitly none
    assert st0.meta["plan"]["pilot_rows"] == 0 and st0.rows == 2048


def test_pilot_plan_directly():
    rows = _rows(96, seed=9)
    obj = objective(poly_loss, rows, THETA)
    cs = requested_contractions(1, (ONLINE,), ("test",))
    gen = torch.Generator().manual_seed(0)
    layout = torch.arange(32).reshape(4, 8)
    plan = pilot_plan(obj, cs, layout, gen, available=64)
    assert isinstance(plan, Plan)
    assert plan.rows == 64 and plan.replicates == 1  # no lr: every row, r = 1
    assert set(plan.estimators) == set(cs) and set(plan.estimators.values()) <= set(ESTIMATORS)
    assert plan.report["pilot_rows"] == 32 and "predicted_se" not in plan.report
    planned = pilot_plan(
        obj, cs, layout, gen, available=64, predictions=[(ONLINE, "test")], lr=[0.1],
        target_se=1e9,
    )  # fmt: skip
    assert planned.rows == 32  # a target any rows reach: the least rows, the pilot's
    assert planned.report["predicted_se"] <= 1e9


def test_bench_estimators_runs_on_cpu(capsys):
    """The benchmark script, tiny: its table has the tuples row and the target row."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "benchmarks" / "bench_estimators.py"
    spec = importlib.util.spec_from_file_location("bench_estimators", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # one thread: the bench's default 2 oversubscribe a busy machine (and an xdist worker)
    args = ["--width", "1", "--rows", "1040", "--steps", "5", "--seeds", "1", "--target"]
    bench.main([*args, "--threads", "1"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ")]
    rows = [r for r in rows if r[0].strip() not in ("method", "contraction")][:5]
    methods = [r[0].strip() for r in rows]
    assert methods[:4] == ["tuples", "auto", "auto, lr", "sketch"]
    assert methods[4].startswith("auto, target")
    assert rows[0][-2].strip() == "1.0×"  # the tuples against themselves
    target = float(methods[4].split()[-1])
    assert float(rows[4][6]) <= 2 * target  # the plan's se, at most twice its target


UNSHARED = {"l", "G·G", "G·H·G", "G_a J_abc G_b G_c", "G·H·H·G"}


@pytest.mark.parametrize(
    "networks",
    ["order 2 and the unshared", pytest.param("every order 3", marks=pytest.mark.slow)],
)
def test_estimator_work_counts_what_the_estimators_evaluate(networks):
    # the model against the sketcher's own counter (rows through nodes), each estimator
    # on a fresh sketcher: equal for networks that share no message, never below it.
    # The default run takes every network of order ≤ 2 and the unshared ones of order 3
    # (-m slow: every order-3 network, the ∇³l and four-part ones included)
    from perturb.numeric.allocation import estimator_work
    from perturb.numeric.sketches import Sketcher

    obj = objective(poly_loss, _rows(48), THETA)
    layout = torch.arange(48).reshape(4, 12)
    cs = requested_contractions(3, (ONLINE,), ("test", "train"))
    if networks != "every order 3":
        low = requested_contractions(2, (ONLINE,), ("test", "train"))
        cs = {k: c for k, c in cs.items() if k in low or c.text in UNSHARED}
        assert sum(c.text not in UNSHARED for c in cs.values()) == 4  # tr(C H), tr(C), ...
    for c in cs.values():
        for probed in (1, 3):
            work = estimator_work(c, 12, parts=4, probed=probed)
            counted = {}
            for e in ESTIMATORS:
                sk = Sketcher(obj, layout, torch.Generator().manual_seed(0), parts=4, probed=probed)
                sk.tuple_values(c) if e == "tuples" else sk.values(c, replicates=1)
                counted[e] = sk.evaluations / 48
            for e in ESTIMATORS:
                if c.text in UNSHARED:
                    assert work[e] == counted[e] == 1.0, (c.text, e)
                assert work[e] >= counted[e], (c.text, e, probed)


def test_pilot_progress_bar_and_the_same_plan(capsys):
    """``progress=True``: a "pilot" bar over the contractions on standard error, nothing
    on standard output; ``progress=False``: nothing; the same plan and values either way.
    Through ``measure``: its flag reaches the pilot."""
    rows = _rows(96, seed=9)
    obj = objective(poly_loss, rows, THETA)
    cs = requested_contractions(1, (ONLINE,), ("test",))
    layout = torch.arange(32).reshape(4, 8)
    plans = []
    for progress in (False, True):
        gen = torch.Generator().manual_seed(0)
        plans.append(pilot_plan(obj, cs, layout, gen, available=64, progress=progress))
        out, err = capsys.readouterr()
        assert out == ""
        assert ("pilot: 100%" in err and f"{len(cs)}/{len(cs)}" in err) if progress else err == ""
    assert plans[0].estimators == plans[1].estimators
    assert (plans[0].rows, plans[0].replicates) == (plans[1].rows, plans[1].replicates)
    for key in cs:
        for e in ESTIMATORS:
            assert (
                plans[0].report["contractions"][key][e]["variance"]
                == (plans[1].report["contractions"][key][e]["variance"])
            )
    quiet = _measure(estimator="auto", groups=4, pilot=24)
    assert capsys.readouterr() == ("", "")
    loud = _measure(estimator="auto", groups=4, pilot=24, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "pilot" in err and "measure" in err
    assert quiet.meta["plan"]["pilot_rows"] == loud.meta["plan"]["pilot_rows"] == 24
    for key, value in quiet.group_values.items():
        np.testing.assert_array_equal(value, loud.group_values[key])
