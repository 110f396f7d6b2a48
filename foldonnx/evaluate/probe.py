"""Linear probe on frozen features: multinomial logistic regression, standardised features.

The probe is the usual frozen-backbone accuracy measure: fit a linear classifier on the features
of a training split, report its accuracy on a test split. For a compressed candidate we report
both

* ``transfer`` -- the probe fitted on the **reference** model's features (its scaler included),
  applied unchanged to the candidate's test features: does the candidate still speak the
  reference's feature language?
* ``refit`` -- a probe fitted on the candidate's own training features: how much linearly
  decodable information is left?

Features of token outputs [N, T, D] are ``concat(CLS token, mean of patch tokens)`` (the DINOv2
linear-evaluation recipe); dense outputs [N, C, H, W] are average-pooled over space.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np

from foldonnx.errors import DataError

__all__ = [
    "PROBE_C",
    "LinearProbe",
    "ProbeResult",
    "probe_features",
    "fit_probe",
    "evaluate_probe",
    "stratified_split",
]

logger = logging.getLogger(__name__)

PROBE_C = 1.0  # inverse L2 regularisation strength, fixed so runs are comparable
PROBE_MAX_ITER = 2000


def probe_features(output: np.ndarray) -> np.ndarray:
    """Turn one model output into [N, F] probe features (see module docstring)."""
    x = np.asarray(output, dtype=np.float32)
    if x.ndim == 2:
        return x
    if x.ndim == 3:  # tokens
        if x.shape[1] == 1:
            return x[:, 0]
        return np.concatenate([x[:, 0], x[:, 1:].mean(axis=1)], axis=1)
    if x.ndim == 4:  # dense NCHW
        return x.mean(axis=(2, 3))
    return x.reshape(len(x), -1)


@dataclass
class LinearProbe:
    """A fitted probe: standardisation (mean/scale) followed by a logistic regression."""

    mean: np.ndarray
    scale: np.ndarray
    model: object  # sklearn.linear_model.LogisticRegression

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return self.model.predict(z)  # type: ignore[attr-defined]

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        return float(np.mean(self.predict(features) == np.asarray(labels)))


def fit_probe(features: np.ndarray, labels: np.ndarray, *, c: float = PROBE_C, seed: int = 0) -> LinearProbe:
    """Fit a standardised multinomial logistic regression (fixed C, seeded)."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(features, np.float64)
    y = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise DataError(f"probe needs [N, F] features and N labels, got {x.shape} and {len(y)}")
    if len(np.unique(y)) < 2:
        raise DataError("probe training labels hold a single class")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale < 1e-12, 1.0, scale)
    clf = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER, random_state=seed)
    clf.fit((x - mean) / scale, y)
    return LinearProbe(mean=mean, scale=scale, model=clf)


@dataclass
class ProbeResult:
    """Probe accuracies of one candidate (fractions in [0, 1])."""

    transfer: float  # reference-fitted probe on the candidate's features
    refit: float  # probe refitted on the candidate's own features
    n_train: int
    n_test: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_probe(
    reference_probe: LinearProbe,
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    seed: int = 0,
) -> ProbeResult:
    """Both probe accuracies of a candidate whose train/test features are given."""
    transfer = reference_probe.accuracy(test_features, test_labels)
    refit = fit_probe(train_features, train_labels, seed=seed).accuracy(test_features, test_labels)
    return ProbeResult(transfer=transfer, refit=refit, n_train=len(train_labels), n_test=len(test_labels))


def stratified_split(
    labels: np.ndarray, test_fraction: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test index split (every class with ≥2 samples lands in both)."""
    y = np.asarray(labels).reshape(-1)
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    if not train or not test:
        raise DataError(f"cannot split {len(y)} labelled samples into probe train and test sets")
    return np.sort(np.asarray(train)), np.sort(np.asarray(test))
