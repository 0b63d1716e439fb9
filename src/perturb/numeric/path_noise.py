r"""SGD's noise carried along the noiseless path: the moments of ``θ_t − θ̄_t`` in a subspace.

Online SGD with ``B`` iid draws a step, ``θ_{t+1} = θ_t − η g_b(θ_t)``, around the noiseless
path ``θ̄_{t+1} = θ̄_t − η∇l(θ̄_t)`` (GD on the population).  Near a point ``θ̄_s`` of the
path, project on an orthonormal basis ``Q`` (``k`` columns, a Krylov subspace of ``H``
there) and write ``H``, ``ζ_i`` (centred per-sample gradients), ``A_i = H_i − H``
(centred per-sample Hessians, on the first ``k_3`` columns) and ``J`` (the mean third
derivative, on ``k_3``) for the projected tensors at ``θ̄_s``.  Let ``m_t = Qᵀ(θ̄_t − θ̄_s)``
be the path's own displacement since ``θ̄_s``, ``δ_t = E θ_t − θ̄_t`` and ``M_t`` the
covariance of ``θ_t``.  The deviation ``x = θ − θ̄`` moves by
``x ← x − η(g_b(θ̄ + x) − ∇l(θ̄))``; the batch is drawn independently of ``x``, so with
``μ = m + δ`` (the mean displacement since ``θ̄_s``), ``H_t = H + J[m_t]`` and
``K_t = I − ηH_t``, ::

    δ ← K_t δ − (η/2) J[M + δδᵀ],
    M ← K_t M K_t + (η²/B) (C + E_i[A_i μ ζ_iᵀ + ζ_i μᵀ A_i] + E_i[A_i (M + μμᵀ) A_i]),

and the expected loss is ``l(θ̄_t) + g_t·δ + ½ tr(H_t (M + δδᵀ))`` with ``g_t = Qᵀ∇l(θ̄_t)``
(exact, from the path).  On a quadratic population (``J = 0``, ``δ = 0``) this is SGD's
exact second moment and expected loss at every step, whatever the correlation of ``A_i``
and ``ζ_i`` (the same recursion as :func:`perturb.numeric.validity.ladder_loss`, started
from a non-zero ``M``): nothing is truncated but the subspace.  On other landscapes the
terms it leaves out are the third and higher cumulants of ``x`` against ``J`` and the
change of ``A_i``, ``ζ_i`` beyond linear order in ``m``.

The noise the subspace does not span (``C − ΠCΠ``, ``Π = QQᵀ``) is carried apart,
between the bounds on its loss over every curvature spectrum with the measured trace and
mean curvature (:class:`OutsideNoise`).

When the path reaches the next point ``θ̄_{s'}`` the state moves to its basis ``Q'``:
``δ ← Rδ``, ``M ← RMRᵀ``, ``R = Q'ᵀQ``; what ``Q'`` does not span is dropped and counted
(:attr:`NoiseState.dropped`).

The *path-following SDE* (:class:`SdeState`) is the first-order stochastic modified
equation ``dθ = −∇l dτ + \sqrt{(η/B) C(θ)} dW`` (``τ = ηt``) linearized about its own
gradient-flow path: ``dM/dτ = −H M − M H + (η/B) C(θ̄(τ))``, each step ``Δτ = η``
integrated exactly with the segment's ``H``; no per-sample Hessian, mixed-cumulant or
mean-shift terms.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["NoiseState", "OutsideNoise", "SdeState", "Segment", "segment_from"]


@dataclass(frozen=True, eq=False)
class Segment:
    """The projected statistics at one point ``θ̄_s`` of the path.

    Attributes:
        theta: ``θ̄_s`` (the device and dtype of the computation).
        basis: ``Q``, ``(P, k)`` orthonormal.
        hess: ``QᵀHQ``, ``(k, k)``.
        cov: ``C = E ζζᵀ``, ``(k, k)``.
        mixed: ``r_{abc} = E[A_ab ζ_c]``, ``(k_3, k_3, k)``.
        kick: ``q`` with ``vec(E[A S A]) = q vec(S)`` on the ``k_3`` block, ``(k_3², k_3²)``.
        third: ``J``, ``(k_3, k_3, k_3)`` (zeros when not measured).
        top: ``u``, the top Ritz vector of ``QᵀHQ`` (``(k,)``, unit).
        curvature: ``‖H‖``, its Ritz value's magnitude.
        top_third: ``(E_i J_i[u,u,u]²)^{1/2}``, the per-sample third derivatives along ``u``
            (``0``: not measured).
        outside_trace: ``a = tr C − tr(QᵀCQ)``, the gradient noise ``Q`` does not span
            (``0``: not measured; :class:`OutsideNoise`).
        outside_curvature: ``b = tr(H (C − ΠCΠ))``, ``Π = QQᵀ``: the curvature that noise
            feels, cross terms with ``Q`` included.
        outside_error: the standard error of the estimate of ``b``.
    """

    theta: torch.Tensor
    basis: torch.Tensor
    hess: np.ndarray
    cov: np.ndarray
    mixed: np.ndarray
    kick: np.ndarray
    third: np.ndarray
    top: np.ndarray
    curvature: float
    top_third: float
    outside_trace: float = 0.0
    outside_curvature: float = 0.0
    outside_error: float = 0.0

    @property
    def rank(self) -> int:
        """``k``."""
        return int(self.hess.shape[0])

    @property
    def higher_rank(self) -> int:
        """``k_3``."""
        return int(self.third.shape[0])

    def truncated(self, rank: int, higher_rank: int) -> Segment:
        """The same statistics on the first ``rank`` (``higher_rank``) basis vectors."""
        k3 = min(higher_rank, rank)
        r = self.mixed[:k3, :k3, :rank]
        kick = self.kick.reshape((self.higher_rank,) * 4)[:k3, :k3, :k3, :k3]
        kick = kick.reshape(k3 * k3, k3 * k3)
        return Segment(
            theta=self.theta,
            basis=self.basis[:, :rank],
            hess=self.hess[:rank, :rank],
            cov=self.cov[:rank, :rank],
            mixed=r,
            kick=kick,
            third=self.third[:k3, :k3, :k3],
            top=self.top[:rank],
            curvature=self.curvature,
            top_third=self.top_third,
        )

    def project(self, vector: torch.Tensor) -> np.ndarray:
        """``Qᵀv`` as float64 numbers."""
        return (self.basis.T @ vector).detach().to("cpu", torch.float64).numpy()

    def nonlinearity(self, cov: np.ndarray) -> np.ndarray:
        r"""``r``: the relative size of what a Gaussian, linearly moving noise leaves out,
        at the spread ``M`` (``(…, k, k)``).  The larger of

        * the mean third derivative across the spread against the curvature,
          ``(Σ J_abc J_abd M_cd)^{1/2} / ‖H‖`` (the Hessian the deviations feel changes);
        * the per-sample third derivatives against the gradient noise, along the top
          direction ``u``: ``(E_i J_i[u,u,u]²)^{1/2} (uᵀMu) / (uᵀCu)^{1/2}`` (a sample's
          gradient at ``θ̄ + x`` moves by ``½J_i[x,x]``; ``C`` is its spread at ``θ̄``).

        The recursion is the first term in ``r``."""
        k3 = self.higher_rank
        scale = self.curvature
        noise = float(self.top @ self.cov @ self.top)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            mean = np.einsum("abc,abd,...cd->...", self.third, self.third, cov[..., :k3, :k3])
            mean = np.sqrt(np.maximum(mean, 0.0)) / scale if scale > 0 else np.inf * mean
            along = np.maximum(np.einsum("a,...ab,b->...", self.top, cov, self.top), 0.0)
            sample = self.top_third * along / np.sqrt(noise) if noise > 0 else np.inf * along
            return np.nan_to_num(np.maximum(mean, sample), nan=0.0)

    def hessian_at(self, m: np.ndarray) -> np.ndarray:
        """``H + J[m]``: the Hessian at displacement ``m`` to first order."""
        k3 = self.higher_rank
        h = self.hess.copy()
        h[:k3, :k3] += np.einsum("abc,c->ab", self.third, m[:k3])
        return h


def segment_from(
    theta: torch.Tensor,
    basis: torch.Tensor,
    hess: torch.Tensor,
    per_sample_gradients: torch.Tensor,
    per_sample_hessians: torch.Tensor | None,
    third: torch.Tensor | None,
    top_third: float = 0.0,
) -> Segment:
    """A :class:`Segment` from projected tensors (centred here).

    Args:
        theta: the point.
        basis: ``Q``, ``(P, k)``.
        hess: ``QᵀHQ``, ``(k, k)``.
        per_sample_gradients: ``Qᵀ∇l_i``, ``(n, k)``.
        per_sample_hessians: ``Q_3ᵀ H_i Q_3``, ``(n, k_3, k_3)``, or ``None`` (``A_i = 0``).
        third: ``J`` on ``Q_3``, ``(k_3, k_3, k_3)``, or ``None`` (zero).
        top_third: the per-sample third derivatives along the top Ritz vector, rms.

    Example:
        >>> import torch
        >>> q = torch.eye(2, dtype=torch.float64)
        >>> gs = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
        >>> seg = segment_from(torch.zeros(2), q, q, gs, None, None)
        >>> seg.cov.tolist(), seg.higher_rank
        ([[1.0, 0.0], [0.0, 0.0]], 1)
    """
    g = per_sample_gradients.detach().to("cpu", torch.float64).numpy()
    zeta = g - g.mean(axis=0)
    n = len(zeta)
    if per_sample_hessians is None:
        a = np.zeros((n, 1, 1))
    else:
        hs = per_sample_hessians.detach().to("cpu", torch.float64).numpy()
        a = hs - hs.mean(axis=0)
    k3 = a.shape[1]
    j = np.zeros((k3, k3, k3)) if third is None else third.detach().cpu().double().numpy()
    h = hess.detach().to("cpu", torch.float64).numpy().copy()
    lam, vec = np.linalg.eigh((h + h.T) / 2)
    return Segment(
        theta=theta.detach().clone(),
        basis=basis.detach(),
        hess=h,
        cov=zeta.T @ zeta / n,
        mixed=np.einsum("iab,ic->abc", a, zeta) / n,
        kick=np.einsum("iab,icd->acbd", a, a).reshape(k3 * k3, k3 * k3) / n,
        third=j,
        top=vec[:, int(np.argmax(np.abs(lam)))],
        curvature=float(np.abs(lam).max()),
        top_third=float(top_third),
    )


def _kicked(seg: Segment, second: np.ndarray) -> np.ndarray:
    """``E_i[A_i S A_i]`` embedded in ``(…, k, k)``."""
    k3 = seg.higher_rank
    out = np.zeros_like(second)
    block = second[..., :k3, :k3].reshape(*second.shape[:-2], k3 * k3)
    out[..., :k3, :k3] = (block @ seg.kick.T).reshape(*second.shape[:-2], k3, k3)
    return out


def _mixed(seg: Segment, mu: np.ndarray) -> np.ndarray:
    """``E[A μ ζᵀ] + E[ζ μᵀ A]`` embedded in ``(…, k, k)``."""
    k3 = seg.higher_rank
    out = np.zeros((*mu.shape[:-1], seg.rank, seg.rank))
    out[..., :k3, :] = np.einsum("abc,...b->...ac", seg.mixed, mu[..., :k3])
    return out + np.swapaxes(out, -1, -2)


def _outer(v: np.ndarray) -> np.ndarray:
    return v[..., :, None] * v[..., None, :]


@dataclass
class NoiseState:
    """``δ`` and ``M`` of online SGD at one ``η`` and several ``B``, in the current
    segment's basis.

    Attributes:
        lr: ``η``.
        batch_sizes: the ``B``s, ``(N_B,)``.
        delta: ``δ = E θ − θ̄``, ``(N_B, k)``.
        cov: ``M``, ``(N_B, k, k)``.
        dropped: the loss ``½ tr(H (M − ΠMΠ))`` the basis changes dropped, summed, ``(N_B,)``.

    Example:
        >>> import torch
        >>> q = torch.eye(1, dtype=torch.float64)
        >>> gs = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        >>> seg = segment_from(torch.zeros(1), q, q, gs, None, None)
        >>> s = NoiseState.start(seg, lr=0.5, batch_sizes=[1, 2])
        >>> s.step(seg, np.zeros(1)); s.cov.ravel().tolist()   # η² C / B
        [0.25, 0.125]
    """

    lr: float
    batch_sizes: np.ndarray
    delta: np.ndarray
    cov: np.ndarray
    dropped: np.ndarray

    @classmethod
    def start(cls, seg: Segment, *, lr: float, batch_sizes: Sequence[int]) -> NoiseState:
        """No spread at the start of the path."""
        b, k = len(batch_sizes), seg.rank
        sizes = np.asarray(batch_sizes, dtype=float)
        return cls(lr, sizes, np.zeros((b, k)), np.zeros((b, k, k)), np.zeros(b))

    def step(self, seg: Segment, m: np.ndarray) -> None:
        """One SGD step at path displacement ``m`` (``Qᵀ(θ̄_t − θ̄_s)``)."""
        eta, k3 = self.lr, seg.higher_rank
        kk = np.eye(seg.rank) - eta * seg.hessian_at(m)
        mu = m[None] + self.delta
        noise = seg.cov + _mixed(seg, mu) + _kicked(seg, self.cov + _outer(mu))
        second = self.cov[:, :k3, :k3] + _outer(self.delta[:, :k3])
        with np.errstate(over="ignore", invalid="ignore"):
            shift = np.einsum("abc,nbc->na", seg.third, second)
            self.delta = self.delta @ kk.T
            self.delta[:, :k3] -= 0.5 * eta * shift
            scale = (eta**2 / self.batch_sizes)[:, None, None]
            self.cov = kk @ self.cov @ kk + scale * noise

    def moved(self, old: Segment, new: Segment) -> None:
        """Re-express the state in ``new``'s basis; count what it drops."""
        r = (new.basis.T @ old.basis).detach().to("cpu", torch.float64).numpy()
        proj = r.T @ r
        kept = proj @ self.cov @ proj
        with np.errstate(over="ignore", invalid="ignore"):
            lost = 0.5 * np.einsum("ab,nba->n", old.hess, self.cov - kept)
            self.dropped = self.dropped + np.abs(lost)
        self.delta = self.delta @ r.T
        self.cov = r @ self.cov @ r.T

    def loss(self, seg: Segment, m: np.ndarray, grad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(g·δ + ½ tr(H_t (M + δδᵀ)), σ)`` per ``B``: the noise's share of the expected
        loss, and the standard deviation of the loss across runs,
        ``σ² = bᵀMb + ½ tr((H_t M)²)``, ``b = g + H_t δ`` (Gaussian ``x``)."""
        h = seg.hessian_at(m)
        with np.errstate(over="ignore", invalid="ignore"):
            second = self.cov + _outer(self.delta)
            value = self.delta @ grad + 0.5 * np.einsum("ab,nba->n", h, second)
            b = grad[None] + self.delta @ h.T
            hm = h @ self.cov
            var = np.einsum("na,nab,nb->n", b, self.cov, b) + 0.5 * np.einsum("nab,nba->n", hm, hm)
            sigma = np.where(np.isfinite(var), np.sqrt(np.maximum(var, 0.0)), np.inf)
        return value, sigma


@dataclass
class OutsideNoise:
    r"""The noise the subspace leaves out, between the bounds its trace and mean curvature
    allow, at one ``η`` and several ``B``.

    The recursion of :class:`NoiseState` injects ``(η²/B) QᵀCQ`` a step; the rest,
    ``C − ΠCΠ`` (``Π = QQᵀ``), also spreads the weights and raises the loss by
    ``½ tr(H M_out)``, ``M_out ← K M_out K + (η²/B)(C − ΠCΠ)``.  Two numbers of it are
    measured at each checkpoint (:attr:`Segment.outside_trace` ``a`` and
    :attr:`Segment.outside_curvature` ``b``, from random centred combinations of the
    per-sample gradients with ``Π`` taken out), not its spectrum.  A mode of curvature
    ``h`` and unit weight adds ``φ_t(h) = ½ h v_t(h)``, ``v ← (1 − ηh)² v + η² a/B``; over
    every spectrum in ``[0, ‖H‖]`` with weight ``a`` and mean ``h̄ = b/a`` the loss lies
    between ``a`` times the convex and the concave envelope of ``φ_t`` at ``h̄`` (a mean
    of ``φ`` under a law of given mean is extreme on two points).  ``φ_t`` is carried on
    :attr:`GRID` points of ``[0, ‖H‖]``; after one step it is linear and both bounds are
    ``(η²/2B) b``.  The prediction is the bounds' midpoint, the estimate their
    half-difference plus the midpoint's share of ``b``'s standard error.  The bounds are
    exact (up to the grid) for frozen statistics, ``Q`` invariant under ``H`` and no
    per-sample Hessians outside ``Q``.

    Attributes:
        lr: ``η``.
        batch_sizes: the ``B``s, ``(N_B,)``.
        modes: ``v_t`` at the grid's curvatures (fractions of the segment's ``‖H‖``),
            ``(N_B, GRID)``.

    Example:
        >>> import dataclasses, torch
        >>> q = torch.eye(1, dtype=torch.float64)
        >>> gs = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        >>> seg = segment_from(torch.zeros(1), q, q, gs, None, None)
        >>> seg = dataclasses.replace(seg, outside_trace=2.0, outside_curvature=1.0)
        >>> s = OutsideNoise.start(lr=0.5, batch_sizes=[1])
        >>> s.step(seg); [round(float(v[0]), 9) for v in s.loss(seg)]  # both bounds (η²/2B) b
        [0.125, 0.0]
    """

    GRID = 129

    lr: float
    batch_sizes: np.ndarray
    modes: np.ndarray

    @classmethod
    def start(cls, *, lr: float, batch_sizes: Sequence[int]) -> OutsideNoise:
        """No spread at the start."""
        return cls(lr, np.asarray(batch_sizes, dtype=float), np.zeros((len(batch_sizes), cls.GRID)))

    def _curvatures(self, seg: Segment) -> np.ndarray:
        return np.linspace(0.0, seg.curvature, self.GRID)

    def step(self, seg: Segment) -> None:
        """One SGD step with the segment's ``a`` and ``‖H‖``."""
        decay = (1 - self.lr * self._curvatures(seg)) ** 2
        with np.errstate(over="ignore", invalid="ignore"):
            kick = self.lr**2 * seg.outside_trace / self.batch_sizes
            self.modes = decay * self.modes + kick[:, None]

    def bounds(self, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` per ``B``: ``a`` times the convex and concave envelopes of the
        per-unit-weight losses ``φ_t`` at ``h̄`` (both ``0`` with nothing outside)."""
        a, top = seg.outside_trace, seg.curvature
        zero = np.zeros(len(self.batch_sizes))
        if a <= 0 or top <= 0:
            return zero, zero
        mean = float(np.clip(seg.outside_curvature / a, 0.0, top))
        x = self._curvatures(seg)
        with np.errstate(over="ignore", invalid="ignore"):
            y = 0.5 * x * self.modes  # a·φ_t: the modes carry the weight a
            left, right = x <= mean, x >= mean
            xl, xr = x[left][:, None], x[right][None, :]
            width = xr - xl
            share = np.where(width > 0, (mean - xl) / np.where(width > 0, width, 1), 0.0)
            yl, yr = y[:, left][:, :, None], y[:, right][:, None, :]
            line = yl + share * (yr - yl)  # (N_B, left, right): every chord through h̄
        return line.min(axis=(1, 2)), line.max(axis=(1, 2))

    def loss(self, seg: Segment) -> tuple[np.ndarray, np.ndarray]:
        """``(value, estimate)`` per ``B``: the midpoint of :meth:`bounds` and their
        half-difference plus ``|value|`` times ``b``'s relative standard error."""
        low, high = self.bounds(seg)
        b = abs(seg.outside_curvature)
        relative = seg.outside_error / b if b > 0 else 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            value = 0.5 * (low + high)
            return value, 0.5 * (high - low) + np.abs(value) * relative


@dataclass
class SdeState:
    """The path-following SDE's covariance at one ``η`` and several ``B`` (module notes).

    Example:
        >>> import torch
        >>> q = torch.eye(1, dtype=torch.float64)
        >>> gs = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        >>> seg = segment_from(torch.zeros(1), 0 * q, 0 * q, gs, None, None)
        >>> s = SdeState.start(seg, lr=0.5, batch_sizes=[1])
        >>> s.step(seg, np.zeros(1)); s.cov.ravel().tolist()   # H = 0: (η/B) C Δτ = 0.25
        [0.25]
    """

    lr: float
    batch_sizes: np.ndarray
    cov: np.ndarray
    _eig: tuple = field(default=(), repr=False)

    @classmethod
    def start(cls, seg: Segment, *, lr: float, batch_sizes: Sequence[int]) -> SdeState:
        """No spread at the start."""
        k = seg.rank
        return cls(lr, np.asarray(batch_sizes, dtype=float), np.zeros((len(batch_sizes), k, k)))

    def _factors(self, seg: Segment) -> tuple:
        if not self._eig or self._eig[0] is not seg:
            lam, vec = np.linalg.eigh((seg.hess + seg.hess.T) / 2)
            s = lam[:, None] + lam[None, :]
            with np.errstate(over="ignore", invalid="ignore"):
                small = np.abs(self.lr * s) < 1e-12
                w = np.where(small, self.lr, -np.expm1(-self.lr * s) / np.where(small, 1, s))
            self._eig = (seg, vec, np.exp(-self.lr * lam), w)
        return self._eig[1:]

    def step(self, seg: Segment, m: np.ndarray) -> None:
        """One step ``Δτ = η``, ``C`` at the path displacement ``m``."""
        vec, e, w = self._factors(seg)
        c = seg.cov + _mixed(seg, m) + _kicked(seg, _outer(m))
        with np.errstate(over="ignore", invalid="ignore"):
            ce = vec.T @ c @ vec
            me = vec.T @ self.cov @ vec
            scale = (self.lr / self.batch_sizes)[:, None, None]
            me = e[:, None] * me * e[None, :] + scale * ce * w
            self.cov = vec @ me @ vec.T

    def moved(self, old: Segment, new: Segment) -> None:
        """Re-express the covariance in ``new``'s basis."""
        r = (new.basis.T @ old.basis).detach().to("cpu", torch.float64).numpy()
        self.cov = r @ self.cov @ r.T

    def loss(self, seg: Segment, m: np.ndarray) -> np.ndarray:
        """``½ tr(H_t M)`` per ``B``, ``H_t = H + J[m]``."""
        with np.errstate(over="ignore", invalid="ignore"):
            return 0.5 * np.einsum("ab,nba->n", seg.hessian_at(m), self.cov)
