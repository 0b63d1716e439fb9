"""Embedding counts against explicit enumeration of every labelling."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import sympy as sp

from perturb.symbolic.diagrams import diagrams, set_partitions
from perturb.symbolic.schedules import GD, Epochs, Online


def _brute_count(diagram, *, batches, batch_size, epochs, shuffle, form, train_root):
    """Average over shuffles of the number of labellings, by plain enumeration."""
    n_points = batches * batch_size
    parents, parts = diagram.parents, diagram.parts
    nodes = range(1, len(parents))
    data_parts = [i for i, p in enumerate(parts) if train_root or 0 not in p]
    part_of = {v: i for i, p in enumerate(parts) for v in p}
    orders = (
        list(itertools.product(itertools.permutations(range(n_points)), repeat=epochs))
        if shuffle
        else [tuple(tuple(range(n_points)) for _ in range(epochs))]
    )
    total = 0
    for perms in orders:
        # position of point n in epoch e -> step
        step_of = [
            {n: e * batches + perm.index(n) // batch_size for n in range(n_points)}
            for e, perm in enumerate(perms)
        ]
        for points in itertools.product(range(n_points), repeat=len(data_parts)):
            if form == "moment" and len(set(points)) < len(points):
                continue
            point = dict(zip(data_parts, points, strict=True))
            for ep in itertools.product(range(epochs), repeat=len(parents) - 1):
                step = {v: step_of[ep[v - 1]][point[part_of[v]]] for v in nodes}
                if all(parents[v] == 0 or step[v] < step[parents[v]] for v in nodes):
                    total += 1
    return Fraction(total, len(orders))


SCHEDULES = [
    ("online T=3 B=1", Online(steps=3, batch_size=1), (3, 1, 1, False)),
    ("online T=2 B=2", Online(steps=2, batch_size=2), (2, 2, 1, False)),
    ("epochs N=2 B=1 E=2", Epochs(train_size=2, batch_size=1, epochs=2), (2, 1, 2, False)),
    (
        "epochs N=3 B=1 E=2 shuffled",
        Epochs(train_size=3, batch_size=1, epochs=2, shuffle=True),
        (3, 1, 2, True),
    ),
    (
        "epochs N=2 B=1 E=2 shuffled",
        Epochs(train_size=2, batch_size=1, epochs=2, shuffle=True),
        (2, 1, 2, True),
    ),
    ("gd N=2 T=3", GD(train_size=2, steps=3), (1, 2, 3, False)),
]


@pytest.mark.parametrize(("name", "schedule", "sizes"), SCHEDULES, ids=[s[0] for s in SCHEDULES])
@pytest.mark.parametrize("form", ["cumulant", "moment"])
@pytest.mark.parametrize("quantity", ["test", "train"])
def test_embeddings_match_enumeration(name, schedule, sizes, form, quantity):
    m, b, e, shuffle = sizes
    train = quantity == "train"
    for order in range(4):
        for d in diagrams(order, quantity=quantity, path_condition=False):
            ours = schedule.embeddings(d, form=form, train_root=train)
            brute = _brute_count(
                d, batches=m, batch_size=b, epochs=e, shuffle=shuffle, form=form, train_root=train
            )
            assert sp.Rational(ours) == sp.Rational(brute.numerator, brute.denominator), (name, d)


@pytest.mark.parametrize(
    "schedule",
    [Online(), Epochs(), Epochs(shuffle=True), GD()],
    ids=["online", "epochs", "epochs-shuffled", "gd"],
)
def test_cumulant_counts_are_zeta_transform_of_moment_counts(schedule):
    """cumulant(σ) = Σ_{π ≥ σ} moment(π): two different algorithms, symbolically."""
    from perturb.symbolic.diagrams import Diagram

    for order in range(4):
        for d in diagrams(order, quantity="train", path_condition=False):
            cumulant = schedule.embeddings(d, form="cumulant", train_root=True)
            total = 0
            for grouping in set_partitions(list(range(len(d.parts)))):
                merged = tuple(
                    sorted(tuple(sorted(v for i in g for v in d.parts[i])) for g in grouping)
                )
                coarse = Diagram(parents=d.parents, parts=merged)
                total += schedule.embeddings(coarse, form="moment", train_root=True)
            assert sp.simplify(cumulant - total) == 0, d


def test_symbolic_counts_specialise_to_numeric():
    t, b = sp.symbols("T B", positive=True, integer=True)
    n, e = sp.symbols("N E", positive=True, integer=True)
    for d in diagrams(3, quantity="test", path_condition=False):
        sym = Online().embeddings(d)
        assert sym.subs({t: 4, b: 3}) == Online(steps=4, batch_size=3).embeddings(d)
        for shuffle in (False, True):
            sym = Epochs(shuffle=shuffle).embeddings(d)
            num = Epochs(train_size=4, batch_size=2, epochs=3, shuffle=shuffle).embeddings(d)
            assert sp.simplify(sym.subs({n: 4, b: 2, e: 3}) - num) == 0


def test_one_epoch_is_online():
    for d in diagrams(3, quantity="train"):
        online = Online(steps=3, batch_size=2).embeddings(d, train_root=True)
        epochs = Epochs(train_size=6, batch_size=2, epochs=1).embeddings(d, train_root=True)
        assert online == epochs


def test_properties():
    s = Epochs(train_size=6, batch_size=2, epochs=3)
    assert (s.train_size, s.steps, s.batches, s.single_epoch) == (6, 9, 3, False)
    assert Online(steps=5).single_epoch
    assert not Online().is_numeric


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Epochs(train_size=5, batch_size=2), "batch_size must divide train_size"),
        (lambda: Online(steps=0), "steps must be a positive integer"),
        (lambda: Online(batch_size=1.5), "batch_size must be a positive integer"),
        (lambda: GD(train_size=-1), "train_size must be a positive integer"),
        (lambda: Epochs(epochs=True), "epochs must be a positive integer"),
    ],
)
def test_bad_schedules(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_embedding_arguments():
    d = diagrams(2, quantity="train")[-1]
    with pytest.raises(ValueError, match="form must be one of"):
        Online().embeddings(d, form="joint")
    tied_root = next(x for x in diagrams(1, quantity="train") if not x.root_alone)
    with pytest.raises(ValueError, match="a test-loss root must be alone"):
        Online().embeddings(tied_root)
