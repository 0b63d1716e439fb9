"""The noise carried along the path (perturb.numeric.path_noise): basis changes, truncation
and the nonlinearity ratio, against hand computations."""

from __future__ import annotations

import numpy as np
import torch

from perturb.numeric.path_noise import NoiseState, segment_from


def _segment(basis, third=None, top_third=0.0, seed=0):
    rng = np.random.default_rng(seed)
    k = basis.shape[1]
    h = rng.normal(size=(k, k))
    h = torch.tensor(h @ h.T + np.eye(k))
    grads = torch.tensor(rng.normal(size=(6, k)))
    hs = torch.tensor(rng.normal(size=(6, k, k)))
    hs = hs + hs.transpose(1, 2)
    return segment_from(torch.zeros(basis.shape[0]), basis, h, grads, hs, third, top_third)


def test_a_rotation_drops_nothing_and_a_smaller_basis_drops_exactly_what_it_misses():
    p = 3
    q1 = torch.eye(p, dtype=torch.float64)
    rot = torch.linalg.qr(
        torch.randn(p, p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    )[0]
    old = _segment(q1)
    state = NoiseState.start(old, lr=0.1, batch_sizes=[1, 2])
    for _ in range(5):
        state.step(old, np.zeros(p))
    cov = state.cov.copy()
    state.moved(old, _segment(rot))
    np.testing.assert_allclose(state.dropped, 0.0, atol=1e-14)
    np.testing.assert_allclose(state.cov, rot.T.numpy() @ cov @ rot.numpy(), atol=1e-14)
    # back to the first basis, then onto its first two vectors only
    state = NoiseState.start(old, lr=0.1, batch_sizes=[1, 2])
    state.cov = cov.copy()
    state.moved(old, _segment(q1[:, :2]))
    missed = cov.copy()
    missed[:, :2, :2] = 0.0
    expected = np.abs(0.5 * np.einsum("ab,nba->n", old.hess, missed))
    np.testing.assert_allclose(state.dropped, expected, rtol=1e-12)
    np.testing.assert_allclose(state.cov, cov[:, :2, :2], atol=1e-15)


def test_truncated_keeps_the_leading_blocks():
    seg = _segment(torch.eye(4, dtype=torch.float64))
    small = seg.truncated(3, 2)
    assert (small.rank, small.higher_rank) == (3, 2)
    np.testing.assert_array_equal(small.hess, seg.hess[:3, :3])
    np.testing.assert_array_equal(small.mixed, seg.mixed[:2, :2, :3])
    full = seg.kick.reshape(4, 4, 4, 4)
    np.testing.assert_array_equal(small.kick, full[:2, :2, :2, :2].reshape(4, 4))


def test_nonlinearity_by_hand():
    """``r = max((Σ J_abc J_abd M_cd)^{1/2}/‖H‖, J_u (uᵀMu)/(uᵀCu)^{1/2})``."""
    q = torch.eye(2, dtype=torch.float64)
    h = torch.diag(torch.tensor([2.0, 0.5], dtype=torch.float64))
    grads = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)  # C = diag(1, 0)
    j = torch.zeros(2, 2, 2, dtype=torch.float64)
    j[0, 0, 0] = 0.3
    cov = np.array([[[0.04, 0.0], [0.0, 1.0]]])
    flat = segment_from(torch.zeros(2), q, h, grads, None, None)
    assert flat.nonlinearity(cov).tolist() == [0.0]
    seg = segment_from(torch.zeros(2), q, h, grads, None, j[:1, :1, :1], top_third=5.0)
    mean = 0.3 * np.sqrt(0.04) / 2.0
    sample = 5.0 * 0.04 / 1.0
    np.testing.assert_allclose(seg.nonlinearity(cov), [max(mean, sample)], rtol=1e-12)
