"""Logit comparisons, bundle against reference: per step (verify) and per position (quality)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log softmax over the last axis, in float64."""
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def position_kl(log_reference: np.ndarray, log_other: np.ndarray) -> np.ndarray:
    """KL(reference || other) per position, from log-probabilities [N, V], nats."""
    return np.sum(np.exp(log_reference) * (log_reference - log_other), axis=-1)


def position_cosine(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Cosine of the logit vectors per position [N, V]."""
    num = (a.astype(np.float64) * r).sum(-1)
    return num / (np.linalg.norm(a, axis=-1) * np.linalg.norm(r, axis=-1))


@dataclass(frozen=True)
class StepMetrics:
    """One step's logits, bundle against reference."""

    max_abs_error: float
    max_rel_error: float  # max |a - r| / max |r|
    cosine: float
    kl: float  # KL(reference || bundle), nats
    top1_agree: bool
    topk_overlap: float
    reference_top2_margin: float
    ambiguous: bool  # a top-1 disagreement where the reference's own top-2 margin is a near-tie
    reference_entropy: float  # of softmax(r), over log(V): 1 is a uniform (flat) distribution


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def step_metrics(a: np.ndarray, r: np.ndarray, k: int, near_tie: float) -> StepMetrics:
    """Bundle logits `a` against reference logits `r` (both [V])."""
    a64, r64 = a.astype(np.float64), r.astype(np.float64)
    max_abs = float(np.abs(a64 - r64).max())
    scale = float(np.abs(r64).max()) or 1.0
    p, q = _softmax(r64), _softmax(a64)
    step_kl = float(np.sum(p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-300)))))
    top_r, top_a = np.argsort(-r64)[:k], np.argsort(-a64)[:k]
    sorted_r = np.sort(r64)[::-1]
    margin = float(sorted_r[0] - sorted_r[1]) if len(sorted_r) > 1 else math.inf
    agree = bool(top_r[0] == top_a[0])
    return StepMetrics(
        max_abs_error=max_abs,
        max_rel_error=max_abs / scale,
        cosine=float(a64 @ r64 / (np.linalg.norm(a64) * np.linalg.norm(r64) or 1.0)),
        kl=max(step_kl, 0.0),
        top1_agree=agree,
        topk_overlap=len(set(top_r.tolist()) & set(top_a.tolist())) / k,
        reference_top2_margin=margin,
        ambiguous=(not agree) and margin < near_tie,
        reference_entropy=float(-(p * np.log(np.maximum(p, 1e-300))).sum() / np.log(len(p)))
        if len(p) > 1
        else 0.0,
    )
