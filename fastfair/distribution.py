"""Output-distribution metrics of a bias audit, and stratified bootstrap confidence intervals.

A prompt's *frequencies* ``f`` are the fractions of its images that the attribute classifier puts in
each class (argmax; images the classifier abstained on are left out). Every metric takes ``f`` with
the classes on the last axis, so a batch of prompts or of bootstrap resamples is one call.

* ``dft_bias(f)``: DFT's bias (Shen et al., "Finetuning Text-to-Image Diffusion Models for
  Fairness", ICLR 2024): the mean over class pairs i < j of |f_i - f_j|. 0 is perfectly balanced;
  for K classes the maximum, one class only, is 2/K.
* ``delta(f)``: TIME / UCE's gender measure, |p - 0.5| / 0.5 for a binary attribute (p the
  frequency of either class; the value is the same).
* ``kl_to_uniform(f)``: ITI-GEN's KL divergence KL(f || uniform) = sum_k f_k log(K f_k), in nats,
  with 0 log 0 = 0.
* ``target_gap(f, t)``: the mean over classes of |f_k - t_k|, how DFT scores age against its 75% young
  / 25% old target ((|f_young - 0.75| + |f_old - 0.25|) / 2).
* ``risk_difference(f, a, b)``: f_a - f_b, signed (positive: skewed towards class a).

``bootstrap_ci`` resamples images *within* each prompt (stratified), with a fixed seed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _freq(f) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    if f.ndim == 0 or f.shape[-1] < 2:
        raise ValueError(f"frequencies need at least 2 classes on the last axis; got shape {f.shape}")
    ok = np.isfinite(f).all(-1)
    if (f[ok] < -1e-12).any() or (np.abs(f[ok].sum(-1) - 1.0) > 1e-6).any():
        raise ValueError("frequencies must be non-negative and sum to 1 over the classes (last axis)")
    return f


def counts(codes, n_classes: int) -> np.ndarray:
    """Class counts of integer class codes; codes < 0 (abstained / missing) are not counted.
    ``codes`` (..., n) -> (..., n_classes)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and codes.max(initial=-1) >= n_classes:
        raise ValueError(f"class code {int(codes.max())} out of range for {n_classes} classes")
    lead = codes.shape[:-1]
    # explicit row count: reshape(-1, 0) of a profession without any image yet (an interrupted audit) fails
    rows = codes.reshape(int(np.prod(lead, dtype=np.int64)), codes.shape[-1]) if codes.ndim else codes.reshape(1, 1)
    ok = rows >= 0
    flat = (np.arange(rows.shape[0])[:, None] * n_classes + rows)[ok]
    return np.bincount(flat, minlength=rows.shape[0] * n_classes).reshape(*lead, n_classes)


def frequencies(codes, n_classes: int) -> np.ndarray:
    """Class frequencies of integer class codes (codes < 0 left out). NaN where nothing is left."""
    c = counts(codes, n_classes).astype(np.float64)
    n = c.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, c / np.where(n > 0, n, 1), np.nan)


def encode(labels: Sequence, classes: Sequence[str]) -> np.ndarray:
    """Labels -> integer codes in ``classes``; None / NaN -> -1. Unknown labels raise."""
    index = {c: i for i, c in enumerate(classes)}
    out = np.full(len(labels), -1, dtype=np.int64)
    for i, lab in enumerate(labels):
        if lab is None or (isinstance(lab, float) and np.isnan(lab)):
            continue
        if lab not in index:
            raise ValueError(f"label {lab!r} is not one of the classes {list(classes)}")
        out[i] = index[lab]
    return out


def dft_bias(f) -> np.ndarray:
    """DFT's bias: mean over class pairs i < j of |f_i - f_j|."""
    f = _freq(f)
    K = f.shape[-1]
    i, j = np.triu_indices(K, 1)
    return np.abs(f[..., i] - f[..., j]).mean(-1)


def delta(f) -> np.ndarray:
    """TIME / UCE's Delta = |p - 0.5| / 0.5 for a binary attribute."""
    f = _freq(f)
    if f.shape[-1] != 2:
        raise ValueError(f"delta is defined for binary attributes; got {f.shape[-1]} classes (use dft_bias)")
    return np.abs(f[..., 0] - 0.5) / 0.5


def kl_to_uniform(f) -> np.ndarray:
    """KL(f || uniform) in nats (ITI-GEN), with 0 log 0 = 0."""
    f = _freq(f)
    K = f.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(f > 0, f * np.log(np.where(f > 0, f * K, 1.0)), 0.0)
    out = terms.sum(-1)
    return np.where(np.isfinite(f).all(-1), out, np.nan)


def target_gap(f, target) -> np.ndarray:
    """Mean over classes of |f_k - t_k| (DFT's age gap against a 75/25 target)."""
    f = _freq(f)
    t = _freq(target)
    if t.ndim != 1 or t.shape[0] != f.shape[-1]:
        raise ValueError(f"target must have one entry per class ({f.shape[-1]}); got shape {t.shape}")
    return np.abs(f - t).mean(-1)


def risk_difference(f, a: int = 0, b: int = 1) -> np.ndarray:
    """Signed risk difference f_a - f_b between two classes."""
    f = _freq(f)
    K = f.shape[-1]
    if not (0 <= a < K and 0 <= b < K) or a == b:
        raise ValueError(f"classes a={a}, b={b} must be two different classes in 0..{K - 1}")
    return f[..., a] - f[..., b]


def bootstrap_ci(groups: Sequence, statistic: Callable[[np.ndarray], np.ndarray],
                 combine: Callable[[np.ndarray], np.ndarray] | None = None, *, n_boot: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Stratified percentile bootstrap.

    ``groups`` is a list of 1-D arrays (one per prompt: per-image values or class codes).
    ``statistic(x)`` maps (B, n) resamples of one group to (B,) values; ``combine`` maps the
    (G, B) per-group values to (B,) (default: NaN-ignoring mean over groups, i.e. a macro average;
    with one group, that group's value). Each group is resampled with replacement within itself,
    with ``numpy.random.default_rng(seed)``, so the interval is reproducible.
    Returns (estimate on the original data, lower, upper).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1; got {n_boot}")
    combine = combine or (lambda v: np.nanmean(v, axis=0))
    groups = [np.asarray(g) for g in groups]
    groups = [g for g in groups if g.size]
    if not groups:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nanmean():
        point = float(np.asarray(combine(np.stack([np.asarray(statistic(g[None]), dtype=np.float64)
                                                   for g in groups])))[0])
        boots = np.stack([np.asarray(statistic(g[rng.integers(0, g.size, size=(n_boot, g.size))]), dtype=np.float64)
                          for g in groups])
        dist = np.asarray(combine(boots), dtype=np.float64)
    dist = dist[np.isfinite(dist)]
    if not dist.size:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(dist, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return point, float(lo), float(hi)


class _quiet_nanmean:
    """Silence numpy's 'Mean of empty slice' for all-NaN columns (they give NaN, as intended)."""

    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        return self

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def mean_statistic(x: np.ndarray) -> np.ndarray:
    """Per-resample mean ignoring NaN (the mIoU statistic)."""
    with _quiet_nanmean():
        return np.nanmean(x, axis=-1)


def frequency_statistic(n_classes: int,
                        metric: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """A ``bootstrap_ci`` statistic: class codes (B, n) -> frequencies (B, K) -> ``metric`` (B,)."""

    def stat(codes: np.ndarray) -> np.ndarray:
        f = frequencies(codes, n_classes)
        ok = np.isfinite(f).all(-1)
        out = np.full(f.shape[:-1], np.nan)
        if ok.any():
            out[ok] = metric(f[ok])
        return out

    return stat
