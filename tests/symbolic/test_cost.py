"""Work estimates (perturb.symbolic.cost) against the actual diagram and labelling counts."""

from __future__ import annotations

import time

import pytest

from perturb.symbolic.cost import (
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


def test_rooted_tree_counts_need_no_enumeration():
    assert [count_rooted_trees(n) for n in range(1, 12)] == [
        len(rooted_trees(n)) for n in range(1, 12)
    ]
    start = time.perf_counter()
    assert count_rooted_trees(30) == 354426847597
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("quantity", ["test", "train", "displacement"])
@pytest.mark.parametrize("path_condition", [True, False])
def test_labellings_are_exact(quantity, path_condition):
    for order in range(6):
        assert labellings(order, quantity=quantity, path_condition=path_condition) == (
            _brute_labellings(order, quantity, path_condition)
        )


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
@pytest.mark.parametrize("quantity", ["test", "train", "displacement"])
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


def test_order_20_answers_at_once_and_is_refused():
    start = time.perf_counter()
    estimates = [
        estimate_work(20, s, quantity=q, resummed=r)
        for s in SCHEDULES
        for q in ("test", "gap")
        for r in (False, True)
    ]
    assert time.perf_counter() - start < 1.0
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
