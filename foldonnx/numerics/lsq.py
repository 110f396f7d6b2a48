"""Streaming least squares with ridge, the regulariser chosen on held-out rows (pure numpy).

Every closed-form fit of fold-onnx goes through here: fold's consumer refit (fc2 / out-proj
refit on the folded model's own activations), the block approximation's linear map and the
low-rank pass's second term. Rows are never held in memory: :class:`LsqStats` accumulates the
sufficient statistics ``[H 1]ᵀ[H 1]``, ``[H 1]ᵀY`` and ``ΣY²`` batch by batch, and every error,
bias correction and ridge solution is computed from them alone.

The ridge pulls toward a prior ``W₀`` rather than toward zero: the merged weights for a refit,
the identity for a block map (a residual block is close to the identity), so "no change" is
always among the candidates and a fit can never be worse than the prior on held-out rows.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LsqStats",
    "lsq_error",
    "bias_correction",
    "ridge_refit",
    "ridge_solve",
    "choose_refit",
    "ALPHAS",
    "REFIT_MODES",
]


class LsqStats:
    """Sufficient statistics of ``Y ≈ H·W + δ``: ``[H 1]ᵀ[H 1]``, ``[H 1]ᵀY``, ``ΣY²``."""

    def __init__(self) -> None:
        self.gram: np.ndarray | None = None
        self.cross: np.ndarray | None = None
        self.yy = 0.0

    def add(self, h: np.ndarray, y: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add rows (optionally weighted: a weight counts as that many copies of the row)."""
        h = np.asarray(h, np.float64).reshape(-1, np.shape(h)[-1])
        y = np.asarray(y, np.float64).reshape(-1, np.shape(y)[-1])
        ha = np.concatenate([h, np.ones((len(h), 1))], axis=1)
        if weights is not None:
            wt = np.asarray(weights, np.float64).reshape(-1, 1)
            g, c = (ha * wt).T @ ha, (ha * wt).T @ y
            self.yy += float((wt * y * y).sum())
        else:
            g, c = ha.T @ ha, ha.T @ y
            self.yy += float((y * y).sum())
        if self.gram is None:
            self.gram, self.cross = g, c
        else:
            self.gram += g
            self.cross += c

    def __iadd__(self, other: LsqStats) -> LsqStats:
        if other.gram is not None:
            if self.gram is None:
                self.gram, self.cross = other.gram.copy(), other.cross.copy()
            else:
                self.gram += other.gram
                self.cross += other.cross
        self.yy += other.yy
        return self

    @property
    def rows(self) -> float:
        """Number of rows (sum of weights)."""
        return 0.0 if self.gram is None else float(self.gram[-1, -1])


def lsq_error(stats: LsqStats, w: np.ndarray, delta: np.ndarray) -> float:
    """Mean squared error per row of ``H·W + δ`` against ``Y`` (from the statistics alone)."""
    wa = np.vstack([w, delta[None, :]]).astype(np.float64)
    sse = float(np.sum(wa * (stats.gram @ wa))) - 2.0 * float(np.sum(wa * stats.cross)) + stats.yy
    return max(sse, 0.0) / max(stats.rows, 1e-12)


def bias_correction(stats: LsqStats, w: np.ndarray) -> np.ndarray:
    """``δ = mean(Y) − mean(H)·W``: the output mean matched per channel, weights unchanged."""
    n = max(stats.gram[-1, -1], 1e-12)
    mu_h, mu_y = stats.gram[-1, :-1] / n, stats.cross[-1] / n
    return mu_y - mu_h @ np.asarray(w, np.float64)


def ridge_refit(stats: LsqStats, w0: np.ndarray, alphas: list[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per α: ``W = argmin ‖H_c·W − Y_c‖² + λ‖W − W₀‖²`` on centred rows, ``δ`` the intercept.

    ``λ = α · mean diag(H_cᵀH_c)`` (scale-free α). With λ > 0 the training error is never
    above the one of ``(W₀, bias_correction)``; α → ∞ gives exactly that.
    """
    n = max(stats.gram[-1, -1], 1e-12)
    mu_h, mu_y = stats.gram[-1, :-1] / n, stats.cross[-1] / n
    gc = stats.gram[:-1, :-1] - n * np.outer(mu_h, mu_h)
    cc = stats.cross[:-1] - n * np.outer(mu_h, mu_y)
    evals, evecs = np.linalg.eigh((gc + gc.T) / 2)
    evals = np.maximum(evals, 0.0)
    scale = float(np.mean(np.diag(gc))) + 1e-12
    w0 = np.asarray(w0, np.float64)
    out = []
    for a in alphas:
        lam = a * scale
        rhs = evecs.T @ (cc + lam * w0)
        w = evecs @ (rhs / (evals + lam)[:, None])
        out.append((w, mu_y - mu_h @ w))
    return out


#: ridge strengths tried (relative to the mean diagonal of the centred H'ᵀH'), chosen per
#: consumer on the held-out part of the calibration set
ALPHAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
REFIT_MODES = ("none", "bias", "ridge")


def choose_refit(
    train: LsqStats, val: LsqStats | None, w0: np.ndarray, mode: str, alphas: tuple[float, ...] = ALPHAS
) -> tuple[np.ndarray, np.ndarray, str, dict[str, float]]:
    """Pick the variant with the lowest held-out error (the merged weights are a candidate),
    then refit it on train+val. Returns ``(W, δ, label, held-out errors)``."""
    w0 = np.asarray(w0, np.float64)
    zero = np.zeros(w0.shape[1])
    full = LsqStats()
    full += train
    if val is not None:
        full += val
    judge = val if val is not None and val.rows else train
    cands: dict[str, tuple[np.ndarray, np.ndarray]] = {"none": (w0, zero)}
    if mode in ("bias", "ridge"):
        cands["bias"] = (w0, bias_correction(train, w0))
    if mode == "ridge":
        for a, (w, d) in zip(alphas, ridge_refit(train, w0, list(alphas)), strict=True):
            cands[f"ridge{a:g}"] = (w, d)
    errs = {k: lsq_error(judge, w, d) for k, (w, d) in cands.items()}
    best = min(errs, key=errs.__getitem__)
    if best == "none":
        return w0, zero, best, errs
    if best == "bias":
        return w0, bias_correction(full, w0), best, errs
    a = float(best[len("ridge") :])
    w, d = ridge_solve(full, w0, a)
    return w, d, best, errs


def ridge_solve(stats: LsqStats, w0: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """One α of :func:`ridge_refit`, by a linear solve (no eigendecomposition)."""
    n = max(stats.gram[-1, -1], 1e-12)
    mu_h, mu_y = stats.gram[-1, :-1] / n, stats.cross[-1] / n
    gc = stats.gram[:-1, :-1] - n * np.outer(mu_h, mu_h)
    cc = stats.cross[:-1] - n * np.outer(mu_h, mu_y)
    lam = alpha * (float(np.mean(np.diag(gc))) + 1e-12)
    w = np.linalg.solve(gc + lam * np.eye(len(gc)), cc + lam * np.asarray(w0, np.float64))
    return w, mu_y - mu_h @ w
