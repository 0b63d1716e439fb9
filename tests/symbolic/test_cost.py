"""Work estimates (perturb.symbolic.cost) against the actual diagram and labelling counts."""

from __future__ import annotations

import pytest

from perturb.symbolic import cost
from perturb.symbolic import diagrams as diagrams_module
from perturb.symbolic.cost import (
    EXACT_ORDERS,
    WORK_BUDGET_SECONDS,
    WorkEstimate,
    bell,
    check_work,
    estimate_work,
    labellings,
)
from perturb.symbolic.diagrams import (
    count_rooted_trees,
    diagrams,
    labelled_partitions,
    rooted_trees,
    set_partitions,
)
from perturb.symbolic.schedules import GD, Epochs, Online

SCHEDULES = [Online(), Epochs(), GD()]
IDS = ["online", "epochs", "gd"]


def _brute_labellings(order: int, quantity: str, path_condition: bool) -> int:
    root = "train" if quantity == "train" else "test"
    return sum(
        1
        for parents in rooted_trees(order + 1)
        if quantity != "displacement" or (order and parents.count(0) == 1)
        for _ in labelled_partitions(parents, quantity=root, path_condition=path_condition)
    )


def test_bell_numbers_count_set_partitions():
    assert [bell(m) for m in range(7)] == [len(list(set_partitions(range(m)))) for m in range(7)]


def test_rooted_tree_counts_need_no_enumeration(monkeypatch):
    """Counted work, not seconds: the recurrence enumerates no tree and makes fewer than
    30³ calls for the 354,426,847,597 trees of 30 nodes."""
    assert [count_rooted_trees(n) for n in range(1, 12)] == [
        len(rooted_trees(n)) for n in range(1, 12)
    ]
    cached = diagrams_module.count_rooted_trees
    calls = []

    def counted(nodes):
        calls.append(nodes)
        return cached(nodes)

    def refuse(nodes):
        raise AssertionError(f"enumerated the trees of {nodes} nodes")

    monkeypatch.setattr(diagrams_module, "count_rooted_trees", counted)  # the recursion's name
    monkeypatch.setattr(diagrams_module, "_canonical_trees", refuse)
    cached.cache_clear()
    assert counted(30) == 354426847597
    assert sorted(set(calls)) == list(range(1, 31)) and len(calls) < 30**3, len(calls)
    cached.cache_clear()  # the counts are right, but leave no cache filled under a patch


@pytest.mark.parametrize("quantity", ["test", "train", "displacement"])
@pytest.mark.parametrize("path_condition", [True, False])
def test_labellings_are_exact(quantity, path_condition):
    for order in range(6):
        assert labellings(order, quantity=quantity, path_condition=path_condition) == (
            _brute_labellings(order, quantity, path_condition)
        )


# GD's train loss (-m slow): the diagrams of train-epochs (no path condition either) and
# GD's bound of test-gd
@pytest.mark.parametrize(
    ("schedule", "quantity"),
    [
        pytest.param(s, q, id=f"{q}-{i}", marks=[pytest.mark.slow] * (q == "train" and i == "gd"))
        for s, i in zip(SCHEDULES, IDS, strict=True)
        for q in ("test", "train", "displacement")
    ],
)
def test_the_bound_holds_and_is_tight_at_low_order(schedule, quantity):
    """Labellings bound the diagrams up to isomorphism; at orders 1–5 the ratio is at most
    1.85 (online train, order 5) and 1 at order 1."""
    for order in range(1, 6):
        actual = len(diagrams(order, quantity=quantity, path_condition=schedule.single_epoch))
        bound = estimate_work(order, schedule, quantity=quantity).diagrams
        assert actual <= bound <= 1.9 * actual
        if order == 1:
            assert bound == actual


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_terms_bound_the_series(schedule):
    from perturb.symbolic.series import series

    for order in range(4):
        for quantity in ("test", "gap"):
            estimate = estimate_work(order, schedule, quantity=quantity)
            assert len(series(order, schedule, quantity).terms) <= estimate.terms
            assert estimate.terms == estimate.labellings


def _enumerated_by(order: int, monkeypatch) -> list[tuple[int, int]]:
    """``(nodes, trees)`` of every tree enumeration that estimating ``order`` runs, from
    empty caches, for every schedule, quantity and re-summation."""
    real = diagrams_module.rooted_trees
    seen: list[tuple[int, int]] = []

    def counted(nodes):
        trees = real(nodes)
        seen.append((nodes, len(trees)))
        return trees

    monkeypatch.setattr(cost, "rooted_trees", counted)
    cost.labellings.cache_clear()
    for s in SCHEDULES:
        for q in ("test", "gap"):
            for r in (False, True):
                estimate_work(order, s, quantity=q, resummed=r)
    cost.labellings.cache_clear()  # computed under the patch: leave no cache behind
    return seen


def test_order_20_answers_at_once_and_is_refused(monkeypatch):
    """Counted work, not seconds: above EXACT_ORDERS the labellings come from formulas,
    so order 20 enumerates exactly the trees order 10 does (those of at most 11 nodes,
    once per quantity: 2 × 3047), nothing that grows with the order."""
    seen = _enumerated_by(20, monkeypatch)
    assert seen == _enumerated_by(EXACT_ORDERS, monkeypatch)
    assert max(nodes for nodes, _ in seen) == EXACT_ORDERS + 1
    sizes = sum(count_rooted_trees(n) for n in range(1, EXACT_ORDERS + 2))
    assert sizes == 3047 and sum(k for _, k in seen) == 2 * sizes  # test and train
    estimates = [
        estimate_work(20, s, quantity=q, resummed=r)
        for s in SCHEDULES
        for q in ("test", "gap")
        for r in (False, True)
    ]
    for e in estimates:
        assert e.diagrams > 1e12 and e.seconds > 1e6 and e.memory_bytes > 1e12
        with pytest.raises(ValueError, match=r"order 20: about .* diagrams.*pass --force"):
            check_work(e, force=False)
        check_work(e, force=True)


def test_low_orders_are_within_budget():
    assert WORK_BUDGET_SECONDS == 60.0
    for schedule in SCHEDULES:
        check_work(estimate_work(3, schedule, quantity="gap"), force=False)
    check_work(estimate_work(2, Online(), resummed=True), force=False)
    # measured: online order 6 ≈ 11 s, order 7 several minutes; epochs order 5 ≈ 80 s
    assert estimate_work(6, Online()).seconds < WORK_BUDGET_SECONDS
    assert estimate_work(8, Online()).seconds > WORK_BUDGET_SECONDS
    assert estimate_work(6, Epochs()).seconds > WORK_BUDGET_SECONDS
    assert estimate_work(4, Online(), resummed=True).seconds > WORK_BUDGET_SECONDS


def test_describe_is_one_line():
    text = WorkEstimate(20, 3_100_000_000_000, 0, 0, 1e9, 400_000_000_000_000).describe()
    assert text == "order 20: about 3.1e12 diagrams, ~1e9 s, ~4e14 bytes"
    assert WorkEstimate(2, 11, 16, 16, 0.35, 150_320_000).describe() == (
        "order 2: about 11 diagrams, ~0.35 s, ~1.5e8 bytes"
    )
    assert "\n" not in estimate_work(5, GD()).describe()


def test_bad_arguments():
    with pytest.raises(ValueError, match="quantity must be one of"):
        estimate_work(2, Online(), quantity="loss")
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        estimate_work(2, "online")
    with pytest.raises(ValueError, match="order"):
        estimate_work(-1, Online())
