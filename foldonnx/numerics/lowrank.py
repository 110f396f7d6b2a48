"""Activation-aware low rank for linear layers: whitening, reduced-rank fits, rank ladders
(pure numpy; the graph side is :mod:`foldonnx.passes.lowrank`).

A linear layer ``y = x·W + b`` (``W`` stored ``[in, out]``) is replaced by ``x·A·B + δ`` with
``A`` ``[in, k]`` and ``B`` ``[k, out]``, chosen to keep the layer's *outputs* on calibration
activations, not its weights (SVD-LLM; Azizi et al., arXiv 2402.06004):

* :class:`LayerStats` streams the second moments of the layer's input rows ``x̃`` (the
  compressed model's, in a sequential fit) and, for the error compensation, the cross moments
  with the original model's rows ``x`` at the same positions: ``Σx̃x̃ᵀ``, ``Σx̃xᵀ``, ``Σxxᵀ``,
  the sums and the row count. In a one-shot fit ``x̃ = x`` and only one Gram is kept.
* :func:`whiten` — ``G = S·Sᵀ`` by Cholesky of ``G + λI`` (λ relative to the mean diagonal;
  raised ×100 up to three times when the factorisation fails, then an eigendecomposition with
  clipped eigenvalues): the LayerNorm outputs a ViT feeds its layers have a singular centred
  covariance (they sum to a constant), so the ridge is needed, not cosmetic.
* :func:`reduced_rank_fit` — the best rank-k ``Ŵ`` for ``‖x̃·Ŵ + δ − T‖²`` over the rows
  (reduced-rank regression) with the target ``T = x̃·W`` (SVD-LLM's whitened SVD: ``M = SᵀW``)
  or, for the error compensation, ``T = x·W`` (``M = S⁻¹·C·W``, ``C = Σx̃xᵀ/N``) or a mix of
  the two; ``M = UΣVᵀ``; ``Ŵ_k = S⁻ᵀU_kΣ_kV_kᵀ``, split as ``A = S⁻ᵀU_kΣ_k^½``,
  ``B = Σ_k^½V_kᵀ``. The output error at every rank comes from the singular values alone:
  ``loss(k) = loss(∞) + Σ_{i>k} σᵢ²``. With an intercept the fit is on centred moments and
  the bias absorbs the mean error. A weight of exact rank r comes back exactly at rank r.
* :func:`columns_fit` — the second term "low rank + whole rows": a few input channels keep
  their full weight row (``x[:, J]·R``) and the low-rank part is fitted to the rest (partial
  reduced-rank regression: the rows J are projected out first, then ``R`` is the exact least
  squares given ``Ŵ``). :func:`split_fit` — the second term "two low-rank terms": W₁ fitted to
  the layer as it computes on its inputs, W₂ to what W₁ misses against the original outputs
  (the error compensation as a term of its own), alternated a few times.
* :func:`quadratic_loss` — the output error of any ``(Ŵ, δ)`` on a :class:`LayerStats` (e.g.
  held-out rows), from the moments alone.
* :func:`factor_params`, :func:`break_even_rank`, :func:`hull_ladder` — the parameter ledger
  of a factored layer (it saves parameters only once ``k·(in+out) < in·out``) and the lower
  convex hull of a layer's (parameters saved, cost) curve, the ladder the greedy allocator
  (:func:`foldonnx.numerics.allocate.greedy_allocate`) walks: a layer's first useful step
  costs a whole truncation, so without the hull a myopic greedy never enters it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg as sla

__all__ = [
    "LayerStats",
    "Whitener",
    "whiten",
    "ReducedRankFit",
    "reduced_rank_fit",
    "plain_svd_fit",
    "thin_svd",
    "columns_fit",
    "split_fit",
    "pick_columns",
    "quadratic_loss",
    "factor_params",
    "break_even_rank",
    "hull_ladder",
    "round_rank",
    "WHITEN_EPS",
]

logger = logging.getLogger(__name__)

#: ridge added to the Gram before the Cholesky, relative to its mean diagonal
WHITEN_EPS = 1e-6


class LayerStats:
    """Streaming moments of a layer's input rows (see module docstring).

    ``add(xt)`` (one-shot: the rows seen are also the original's) or ``add(xt, x)`` (the
    compressed model's rows and the original's, row-aligned; optional row weights). Products
    are summed in place in float32 by BLAS (``syrk``: half a general product's work) and moved
    into float64 every ``FLUSH_ROWS`` rows: per-batch float64 sums of 3072x3072 matrices cost
    ViT-B/16 more than the products themselves."""

    FLUSH_ROWS = 32768

    def __init__(self, dim: int, paired: bool = False) -> None:
        self.dim = int(dim)
        self.paired = bool(paired)
        # float64 totals (upper triangles for tt / xx), made at the first flush
        self.tt: np.ndarray | None = None
        self.tx: np.ndarray | None = None
        self.xx: np.ndarray | None = None
        self.st = np.zeros(dim)
        self.sx = np.zeros(dim) if paired else None
        self.n = 0.0
        self._acc: dict[str, np.ndarray] = {}
        self._pending = 0
        self._moments: dict[bool, tuple[np.ndarray, ...]] = {}
        self._products: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def add(self, xt: np.ndarray, x: np.ndarray | None = None, weights: np.ndarray | None = None) -> None:
        xt = np.asarray(xt, np.float32).reshape(-1, self.dim)
        if not len(xt):
            return
        self._moments, self._products = {}, None
        wt = None if weights is None else np.asarray(weights, np.float32).reshape(-1, 1)
        xw = xt if wt is None else xt * wt
        self._syrk("tt", xt if wt is None else xt * np.sqrt(wt))
        self.st += xw.sum(0, dtype=np.float64)
        self.n += float(len(xt)) if wt is None else float(wt.sum())
        if self.paired:
            if x is None:
                raise ValueError("paired stats need the original rows too")
            x = np.asarray(x, np.float32).reshape(-1, self.dim)
            self._gemm("tx", xw, x)
            self._syrk("xx", x if wt is None else x * np.sqrt(wt))
            self.sx += (x if wt is None else x * wt).sum(0, dtype=np.float64)
        self._pending += len(xt)
        if self._pending >= self.FLUSH_ROWS:
            self.flush()

    def _buffer(self, key: str) -> np.ndarray:
        if key not in self._acc:
            self._acc[key] = np.zeros((self.dim, self.dim), np.float32, order="F")
        return self._acc[key]

    def _syrk(self, key: str, rows: np.ndarray) -> None:
        from scipy.linalg.blas import ssyrk

        c = self._buffer(key)
        a = np.ascontiguousarray(rows).T
        self._acc[key] = ssyrk(1.0, a, beta=1.0, c=c, trans=0, lower=0, overwrite_c=1)

    def _gemm(self, key: str, a: np.ndarray, b: np.ndarray) -> None:
        from scipy.linalg.blas import sgemm

        c = self._buffer(key)
        self._acc[key] = sgemm(1.0, np.ascontiguousarray(a).T, np.ascontiguousarray(b).T, beta=1.0, c=c,
                               trans_b=1, overwrite_c=1)  # fmt: skip

    def flush(self) -> None:
        """Move the float32 sums into the float64 totals (and free them)."""
        keys = ("tt", "tx", "xx") if self.paired else ("tt",)
        for key in keys:
            acc = self._acc.pop(key, None)
            total = getattr(self, key)
            if total is None:
                total = np.zeros((self.dim, self.dim))
            if acc is not None:
                total += acc
            setattr(self, key, total)
        self._pending = 0

    def __iadd__(self, other: LayerStats) -> LayerStats:
        self.flush()
        other.flush()
        self._moments, self._products = {}, None
        self.tt += other.tt
        self.st += other.st
        self.n += other.n
        if self.paired and other.paired:
            self.tx += other.tx
            self.xx += other.xx
            self.sx += other.sx
        return self

    def moments(self, centre: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(G, C, X, μ̃, μ)`` per row: ``G = x̃ᵀx̃``, ``C = x̃ᵀx``, ``X = xᵀx`` (centred on
        ``μ̃`` / ``μ`` when *centre*; computed once, shared: do not modify them)."""
        if centre in self._moments:
            return self._moments[centre]  # type: ignore[return-value]
        self.flush()
        n = max(self.n, 1e-12)
        mt = self.st / n
        g = _symmetric(self.tt) / n
        if self.paired:
            mx = self.sx / n
            c, xx = self.tx / n, _symmetric(self.xx) / n
        else:
            mx, c, xx = mt, g, g
        if centre:
            g = g - np.outer(mt, mt)
            c = c - np.outer(mt, mx)
            xx = xx - np.outer(mx, mx)
        self._moments[centre] = (g, c, xx, mt, mx)
        return g, c, xx, mt, mx

    def products(self, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(C·W, X·W)`` of the uncentred moments, kept for the last *w* asked (every
        candidate fit of a layer is scored against the same W)."""
        if self._products is None or self._products[0] is not w:
            _, c, xx, _, _ = self.moments(centre=False)
            cw = c @ w
            self._products = (w, cw, cw if not self.paired else xx @ w)
        return self._products[1], self._products[2]


def _symmetric(upper: np.ndarray) -> np.ndarray:
    return np.triu(upper) + np.triu(upper, 1).T


@dataclass
class Whitener:
    """``G + λI = S·Sᵀ``; ``method`` is ``cholesky``, ``cholesky+ridge`` (λ raised) or ``eigh``."""

    root: np.ndarray
    lower: bool
    shift: float
    method: str
    scale: np.ndarray | None = None  # eigh: S = Q·diag(scale), root holds Q

    def inv(self, y: np.ndarray) -> np.ndarray:
        """``S⁻¹·y``."""
        if self.method == "eigh":
            return (self.root.T @ y) / self.scale[:, None]
        return sla.solve_triangular(self.root, y, lower=True, check_finite=False)

    def inv_t(self, y: np.ndarray) -> np.ndarray:
        """``S⁻ᵀ·y``."""
        if self.method == "eigh":
            return self.root @ (y / self.scale[:, None])
        return sla.solve_triangular(self.root, y, lower=True, trans="T", check_finite=False)

    def times_t(self, y: np.ndarray) -> np.ndarray:
        """``Sᵀ·y``."""
        if self.method == "eigh":
            return self.scale[:, None] * (self.root.T @ y)
        return self.root.T @ y


def whiten(gram: np.ndarray, eps: float = WHITEN_EPS) -> Whitener:
    """A square root of ``gram + λI`` (see module docstring)."""
    g = (np.asarray(gram, np.float64) + np.asarray(gram, np.float64).T) / 2
    scale = float(np.mean(np.diag(g))) if g.size else 0.0
    scale = scale if np.isfinite(scale) and scale > 0 else 1.0
    lam = eps * scale
    eye = np.eye(len(g))
    for attempt in range(4):
        try:
            root = np.linalg.cholesky(g + lam * eye)
            if np.all(np.isfinite(root)) and np.min(np.abs(np.diag(root))) > 0:
                return Whitener(root, True, lam, "cholesky" if attempt == 0 else "cholesky+ridge")
        except np.linalg.LinAlgError:
            pass
        lam *= 100.0
    evals, evecs = np.linalg.eigh(g)
    floor = max(eps * scale, 1e-12)
    return Whitener(evecs, False, floor, "eigh", np.sqrt(np.maximum(evals, floor)))


@dataclass
class ReducedRankFit:
    """The SVD of one layer's whitened target (see :func:`reduced_rank_fit`)."""

    whitener: Whitener | None  # None: plain SVD of W (data-free)
    u: np.ndarray  # [in, r]
    sigma: np.ndarray  # [r]
    vt: np.ndarray  # [r, out]
    base_loss: float  # output error per row at full rank (the fit's floor)
    energy: float  # mean squared norm of the original output rows (relative errors divide by it)
    intercept: bool
    w: np.ndarray
    b: np.ndarray | None
    mean_t: np.ndarray | None = None
    mean_x: np.ndarray | None = None

    @property
    def max_rank(self) -> int:
        return len(self.sigma)

    def loss(self, k: int) -> float:
        """Output error per row at rank *k* (training rows)."""
        return float(self.base_loss + np.sum(self.sigma[int(k) :] ** 2))

    def losses(self) -> np.ndarray:
        """``loss(k)`` for k = 0 … max_rank."""
        tail = np.concatenate([np.cumsum((self.sigma**2)[::-1])[::-1], [0.0]])
        return self.base_loss + tail

    def factors(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(A [in, k], B [k, out], δ)``; δ is the new bias (None when the layer has none)."""
        k = int(k)
        half = np.sqrt(self.sigma[:k])
        uk = self.u[:, :k] * half
        a = uk if self.whitener is None else self.whitener.inv_t(uk)
        b = half[:, None] * self.vt[:k]
        return a, b, self.bias_for(a @ b)

    def bias_for(self, w_hat: np.ndarray) -> np.ndarray | None:
        """The bias that goes with *w_hat*: the mean error absorbed with an intercept."""
        if not self.intercept:
            return self.b
        b0 = np.zeros(self.w.shape[1]) if self.b is None else self.b
        return b0 + self.mean_x @ self.w - self.mean_t @ w_hat


def reduced_rank_fit(
    stats: LayerStats,
    w: np.ndarray,
    b: np.ndarray | None = None,
    *,
    intercept: bool = False,
    mix: float = 1.0,
    eps: float = WHITEN_EPS,
    white: Whitener | None = None,
) -> ReducedRankFit:
    """The whitened reduced-rank fit of ``x·W + b`` on *stats* (see module docstring).

    *intercept*: fit on centred moments and let the bias absorb the mean error (only for a
    layer that has a bias to change). *mix* (paired stats): the target is
    ``(1 − mix)·x̃·W + mix·x·W`` — 0 whitens the layer as it computes on its compressed inputs
    (SVD-LLM's sequential fit), 1 is the full error compensation (a regression that needs many
    rows per input dimension: too few and it fits noise)."""
    w = np.asarray(w, np.float64)
    g, c, xx, mt, mx = stats.moments(centre=intercept)
    white = whiten(g, eps) if white is None else white  # *white*: of these moments, made earlier
    # M = SᵀW + mix·S⁻¹(C − G)W: with mix 0 (or one-shot, C = G) exactly SᵀW, so a weight of
    # rank r comes back exactly at rank r (S⁻¹·G·W would shrink it by the ridge)
    m = white.times_t(w)
    if stats.paired and mix:
        m = m + mix * white.inv((c - g) @ w)
    u, s, vt = thin_svd(m)
    if stats.paired:  # energy of the (centred) target rows x̃W + mix(x − x̃)W
        cm = mix * (c - g)
        target = float(np.sum(w * ((g + cm + cm.T + mix * mix * (xx - c - c.T + g)) @ w)))
    else:
        target = float(np.sum(m * m)) - white.shift * float(np.sum(w * w))  # ‖SᵀW‖² = WᵀGW + λ‖W‖²
    base = max(target - float(np.sum(s**2)), 0.0)
    energy = _output_energy(stats, w, b, None if stats.paired or intercept else target)
    return ReducedRankFit(white, u, s, vt, base, energy, intercept, w, b, mt, mx)


def thin_svd(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``U, σ, Vᵀ`` of *m* (descending σ). Above 256 on both sides through the eigenvectors of
    the smaller Gram ``MᵀM`` or ``MMᵀ`` (4x faster than LAPACK's SVD at 3072x768); directions
    with σ below 1e-7·σ_max, which that loses, come back as zero columns."""
    m = np.asarray(m, np.float64)
    if min(m.shape) < 256:
        return np.linalg.svd(m, full_matrices=False)
    tall = m.shape[0] >= m.shape[1]
    gram = m.T @ m if tall else m @ m.T
    evals, vecs = np.linalg.eigh((gram + gram.T) / 2)
    order = np.argsort(evals)[::-1]
    s = np.sqrt(np.maximum(evals[order], 0.0))
    vecs = vecs[:, order]
    keep = s > 1e-7 * (s[0] if len(s) else 0.0)
    inv = np.where(keep, 1.0 / np.where(keep, s, 1.0), 0.0)
    s = np.where(keep, s, 0.0)
    if tall:  # vecs = V
        return (m @ vecs) * inv, s, vecs.T
    return vecs, s, ((m.T @ vecs) * inv).T


def _output_energy(stats: LayerStats, w: np.ndarray, b: np.ndarray | None, wxw: float | None = None) -> float:
    """Mean squared norm of the original output rows ``x·W + b`` (*wxw*: ``WᵀXᵀXW/N`` if known)."""
    _, _, _, _, mx = stats.moments(centre=False)
    e = float(np.sum(w * stats.products(w)[1])) if wxw is None else wxw
    if b is not None:
        e += 2.0 * float(mx @ w @ b) + float(b @ b)
    return max(e, 1e-30)


def plain_svd_fit(w: np.ndarray, b: np.ndarray | None = None) -> ReducedRankFit:
    """Data-free: the SVD of W itself (errors in weight space, ``‖W − Ŵ‖²``)."""
    w = np.asarray(w, np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    return ReducedRankFit(None, u, s, vt, 0.0, max(float(np.sum(w * w)), 1e-30), False, w, b)


def quadratic_loss(
    stats: LayerStats, w: np.ndarray, b: np.ndarray | None, w_hat: np.ndarray, b_hat: np.ndarray | None
) -> float:
    """Mean squared error per row of ``x̃·Ŵ + δ̂`` against ``x·W + b`` on *stats*."""
    g, _, _, mt, mx = stats.moments(centre=False)
    w_hat = np.asarray(w_hat, np.float64)
    zero = np.zeros(w.shape[1])
    b = zero if b is None else np.asarray(b, np.float64)
    bh = zero if b_hat is None else np.asarray(b_hat, np.float64)
    d = bh - b
    if not stats.paired:  # x̃ = x: ‖x(Ŵ − W) + d‖², one product
        dw = w_hat - w
        return max(float(np.sum(dw * (g @ dw))) + 2.0 * float(d @ (mt @ dw)) + float(d @ d), 0.0)
    # ‖x̃Ŵ − xW + d‖² = ŴᵀGŴ − 2ŴᵀCW + WᵀXW + 2 dᵀ(μ̃Ŵ − μW) + dᵀd
    cw, xw = stats.products(w)
    val = (
        float(np.sum(w_hat * (g @ w_hat)))
        - 2.0 * float(np.sum(w_hat * cw))
        + float(np.sum(w * xw))
        + 2.0 * float(d @ (mt @ w_hat - mx @ w))
        + float(d @ d)
    )
    return max(val, 0.0)


def pick_columns(fit: ReducedRankFit, stats: LayerStats, k: int, m: int) -> np.ndarray:
    """The *m* input channels whose own weight row would remove the most output error left
    at rank *k* (exact gain of freeing one row: ``‖(C·W − G·Ŵ_k)_j‖² / G_jj``)."""
    g, c, _, _, _ = stats.moments(centre=fit.intercept)
    a, b, _ = fit.factors(k)
    resid = c @ fit.w - g @ (a @ b)
    gain = np.sum(resid**2, axis=1) / np.maximum(np.diag(g), 1e-30)
    return np.sort(np.argsort(-gain, kind="stable")[:m])


def columns_fit(
    stats: LayerStats,
    w: np.ndarray,
    b: np.ndarray | None,
    k: int,
    cols: Sequence[int],
    *,
    intercept: bool = False,
    mix: float = 1.0,
    eps: float = WHITEN_EPS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """``Ŵ = A·B + P_J·R``: rank *k* plus the full rows *cols* (see module docstring).
    Returns ``(A [in, k] with zero rows at cols, B [k, out], R [m, out], δ)``."""
    w = np.asarray(w, np.float64)
    g, c, _, mt, mx = stats.moments(centre=intercept)
    j = np.asarray(cols, np.int64)
    rest = np.setdiff1d(np.arange(len(g)), j)
    target = g @ w + mix * ((c - g) @ w)  # [in, out]: what the whitened regression matches
    gjj = g[np.ix_(j, j)] + eps * (float(np.mean(np.diag(g))) + 1e-30) * np.eye(len(j))
    solve_j = np.linalg.solve(gjj, np.concatenate([g[j][:, rest], target[j]], axis=1))
    proj_g, proj_t = solve_j[:, : len(rest)], solve_j[:, len(rest) :]
    g_r = g[np.ix_(rest, rest)] - g[np.ix_(rest, j)] @ proj_g
    t_r = target[rest] - g[np.ix_(rest, j)] @ proj_t
    white = whiten(g_r, eps)
    u, s, vt = np.linalg.svd(white.inv(t_r), full_matrices=False)
    half = np.sqrt(s[:k])
    a_r = white.inv_t(u[:, :k] * half)
    bk = half[:, None] * vt[:k]
    r = proj_t - proj_g @ (a_r @ bk)
    a = np.zeros((len(g), k))
    a[rest] = a_r
    w_hat = a @ bk
    w_hat[j] += r
    delta = b
    if intercept:
        delta = (np.zeros(w.shape[1]) if b is None else b) + mx @ w - mt @ w_hat
    return a, bk, r, delta


def split_fit(
    stats: LayerStats,
    w: np.ndarray,
    b: np.ndarray | None,
    k1: int,
    k2: int,
    *,
    intercept: bool = False,
    rounds: int = 3,
    mix: float = 1.0,
    eps: float = WHITEN_EPS,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray], np.ndarray | None]:
    """``Ŵ = A₁B₁ + A₂B₂``: W₁ (rank *k1*) the whitened fit of the layer as it computes on its
    own inputs (``x̃·W``), W₂ (rank *k2*) fitted to what W₁ misses against the original outputs
    (``x·W + b``); then *rounds* of alternating least squares, each term refitted to the target
    minus the other. Returns ``((A₁, B₁), (A₂, B₂), δ)``."""
    w = np.asarray(w, np.float64)
    g, c, _, mt, mx = stats.moments(centre=intercept)
    white = whiten(g, eps)
    full_target = g @ w + mix * ((c - g) @ w)

    def rank_fit(target: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        u, s, vt = np.linalg.svd(white.inv(target), full_matrices=False)
        half = np.sqrt(s[:k])
        return white.inv_t(u[:, :k] * half), half[:, None] * vt[:k]

    a1, b1 = rank_fit(g @ w, k1)  # the layer as it is, on its own inputs
    a2, b2 = rank_fit(full_target - g @ (a1 @ b1), k2)
    for _ in range(max(rounds - 1, 0)):
        a1, b1 = rank_fit(full_target - g @ (a2 @ b2), k1)
        a2, b2 = rank_fit(full_target - g @ (a1 @ b1), k2)
    w_hat = a1 @ b1 + a2 @ b2
    delta = b
    if intercept:
        delta = (np.zeros(w.shape[1]) if b is None else b) + mx @ w - mt @ w_hat
    return (a1, b1), (a2, b2), delta


def factor_params(k: int, n_in: int, n_out: int) -> int:
    """Parameters of the layer at rank *k*: ``k·(in+out)`` when that saves any, else dense."""
    dense = n_in * n_out
    return min(int(k) * (n_in + n_out), dense)


def break_even_rank(n_in: int, n_out: int) -> int:
    """The largest rank at which factoring saves parameters (``k·(in+out) < in·out``)."""
    return max((n_in * n_out - 1) // (n_in + n_out), 0)


def round_rank(k: float, multiple: int, lo: int = 1) -> int:
    """*k* rounded down to a multiple of *multiple* (at least *lo*)."""
    m = max(int(multiple), 1)
    return max(int(k) // m * m, lo)


def hull_ladder(saved: Sequence[float], costs: Sequence[float]) -> list[int]:
    """Indices of the points on the lower convex hull of ``(saved[i], costs[i])``, starting
    at point 0 (nothing saved, no cost) and moving to larger savings: each step's cost per
    parameter saved is at least the previous step's (the order a greedy allocator should take
    them in). Points must be sorted by ``saved``."""
    pts = [(float(s), float(c), i) for i, (s, c) in enumerate(zip(saved, costs, strict=True))]
    hull: list[tuple[float, float, int]] = []
    for p in pts:
        if hull and p[0] <= hull[-1][0]:
            if p[1] < hull[-1][1] and len(hull) > 1:
                hull[-1] = p
            continue
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            # drop the middle point when it lies on or above the segment from x1 to p
            if (y2 - y1) * (p[0] - x1) >= (p[1] - y1) * (x2 - x1):
                hull.pop()
            else:
                break
        hull.append(p)
    return [h[2] for h in hull]
