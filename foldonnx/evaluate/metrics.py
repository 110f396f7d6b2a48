"""Fidelity and accuracy metrics: pure numpy functions on model outputs.

Every function takes arrays with the sample axis first and returns a Python ``float`` (the mean
over samples); none of them knows about graphs or sessions.

Conventions
-----------
* ``reference`` is the uncompressed model's output, ``candidate`` the compressed one's.
* KL divergence is ``KL(softmax(reference) || softmax(candidate))`` in nats, averaged over samples.
* Cosine similarity is computed per sample on the flattened output and then averaged; a pair of
  all-zero vectors counts as identical (1.0), one zero vector against a non-zero one as 0.0.
* Mask IoU thresholds both outputs at the same per-sample threshold: 0.5 when the reference
  looks like probabilities (all values in [0, 1], e.g. after a Sigmoid), otherwise the median of
  the reference sample. Two empty masks count as IoU 1.0.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "softmax",
    "top1_agreement",
    "kl_divergence",
    "cosine_similarity",
    "cls_token_cosine",
    "patch_token_cosine",
    "mask_threshold",
    "mask_iou",
    "top1_accuracy",
]


def _pair(reference: np.ndarray, candidate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {cand.shape}")
    if ref.ndim == 0 or ref.shape[0] == 0:
        raise ValueError("metrics need at least one sample (sample axis first)")
    return ref, cand


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Fraction of samples whose arg-max class is the same in both [N, C] outputs."""
    ref, cand = _pair(reference, candidate)
    ref, cand = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
    return float(np.mean(ref.argmax(axis=1) == cand.argmax(axis=1)))


def kl_divergence(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean KL(softmax(reference) || softmax(candidate)) over samples, in nats ([N, C] logits)."""
    ref, cand = _pair(reference, candidate)
    ref, cand = ref.reshape(len(ref), -1), cand.reshape(len(cand), -1)
    log_p = ref - ref.max(axis=1, keepdims=True)
    log_p = log_p - np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    log_q = cand - cand.max(axis=1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    return float(np.mean(np.maximum(kl, 0.0)))


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    dot = (a * b).sum(axis=-1)
    both_zero = (na == 0) & (nb == 0)
    denom = np.where(na * nb == 0, 1.0, na * nb)
    cos = np.where(na * nb == 0, 0.0, dot / denom)
    return np.where(both_zero, 1.0, cos)


def cosine_similarity(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Per-sample cosine similarity of the flattened outputs, averaged over samples."""
    ref, cand = _pair(reference, candidate)
    return float(np.mean(_rowwise_cosine(ref.reshape(len(ref), -1), cand.reshape(len(cand), -1))))


def cls_token_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Cosine of the first token (CLS) of [N, T, D] token outputs, averaged over samples."""
    ref, cand = _pair(reference, candidate)
    if ref.ndim != 3:
        raise ValueError(f"token metrics need [N, T, D] outputs, got shape {ref.shape}")
    return float(np.mean(_rowwise_cosine(ref[:, 0], cand[:, 0])))


def patch_token_cosine(reference: np.ndarray, candidate: np.ndarray, first_patch: int = 1) -> float:
    """Cosine of every patch token (tokens ``first_patch:``) of [N, T, D] outputs, averaged over
    tokens and samples."""
    ref, cand = _pair(reference, candidate)
    if ref.ndim != 3 or ref.shape[1] <= first_patch:
        raise ValueError(f"patch-token cosine needs [N, T>{first_patch}, D] outputs, got {ref.shape}")
    return float(np.mean(_rowwise_cosine(ref[:, first_patch:], cand[:, first_patch:])))


def mask_threshold(reference_sample: np.ndarray) -> float:
    """Threshold for one dense sample: 0.5 for probabilities (all in [0, 1]), else the median."""
    ref = np.asarray(reference_sample, dtype=np.float64)
    if ref.size and ref.min() >= 0.0 and ref.max() <= 1.0:
        return 0.5
    return float(np.median(ref))


def mask_iou(reference: np.ndarray, candidate: np.ndarray) -> float:
    """IoU of the masks ``output > threshold`` (see :func:`mask_threshold`, taken from the
    reference sample and applied to both), averaged over samples."""
    ref, cand = _pair(reference, candidate)
    ious = []
    for r, c in zip(ref, cand, strict=True):
        t = mask_threshold(r)
        a, b = r > t, c > t
        union = np.logical_or(a, b).sum()
        ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
    return float(np.mean(ious))


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose arg-max equals the integer label."""
    x = np.asarray(logits)
    y = np.asarray(labels).reshape(-1)
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"{len(x)} outputs vs {len(y)} labels")
    return float(np.mean(x.reshape(len(x), -1).argmax(axis=1) == y))
