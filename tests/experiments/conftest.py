"""Fixtures shared by the experiments' tests."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """16 points of 2×2 "images" in 3 classes, as an ``npz:`` dataset (the built-in mlp on
    it has 259 parameters)."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.npz"
    np.savez(
        path,
        x=(1.5 * rng.normal(size=(16, 2, 2))).astype(np.float32),
        y=rng.integers(0, 3, 16),
    )
    return f"npz:{path}"
