"""pass@k and its statistics: the unbiased estimator, the bootstrap CI over problems, and the
paired statistics across methods evaluated on the same problems (`dail compare`).

pass@k of one method comes with a bootstrap CI over problems (`bootstrap_ci`). To
say whether method A beats B, their CIs are the wrong tool: both are evaluated on the same
problems, and problem difficulty dominates the variance. The paired bootstrap resamples
*problems* once, shares the resampled index sets across every method of a split, and reports
the percentile CI of the difference of means:

    idx_r ~ Uniform{0..P-1}^P  (r = 1..R, the same for all methods)
    Δ_r   = mean(a[idx_r]) − mean(b[idx_r]),   CI = percentiles (2.5, 97.5) of Δ_r

`a` and `b` are per-problem unbiased pass@k values from the same n samples per problem.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["pass_at_k", "bootstrap_ci", "ks_for", "resample_indices", "paired_difference", "per_problem_pass",
           "transitions"]

BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_CONFIDENCE = 0.95


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    (Expand C(n-c,k)/C(n,k) = prod_{j=0}^{k-1} (n-c-j)/(n-j) and cancel: what remains is the
    product over the c largest denominators.) Worked case: n=16, c=4, k=4 gives
    1 - (12/16)(11/15)(10/14)(9/13) = 1 - 11880/43680 = 265/364.
    """
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def bootstrap_ci(values: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                 confidence: float = BOOTSTRAP_CONFIDENCE, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of the mean over problems.

    values: (P,) or (P, K) per-problem scores. Resamples problems with replacement (the same
    draws for every column, so curves stay consistent). Returns (low, high), each (K,) or scalar.
    """
    v = np.asarray(values, dtype=np.float64)
    squeeze = v.ndim == 1
    v = v.reshape(len(v), -1)                                     # (P, K)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(resamples, len(v)))       # (R, P)
    means = v[idx].mean(axis=1)                                   # (R, K)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha], axis=0)
    return (lo[0], hi[0]) if squeeze else (lo, hi)


def ks_for(n: int, ks: list[int]) -> list[int]:
    """The requested ks plus every power of two up to n and n itself (for pass@k curves)."""
    return sorted({int(k) for k in ks} | {2 ** i for i in range(int(math.log2(n)) + 1)} | {n})


# ----------------------------------------------------------------------------- paired, across methods


def resample_indices(n_problems: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(R, P) problem indices drawn with replacement; pass the same array for every method."""
    return np.random.default_rng(seed).integers(0, n_problems, size=(resamples, n_problems))


def paired_difference(a: np.ndarray, b: np.ndarray, idx: np.ndarray,
                      confidence: float = BOOTSTRAP_CONFIDENCE) -> dict[str, float]:
    """Mean of a − b over problems, with the paired percentile CI over the resampled `idx`."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_difference: per-problem values must be two equal 1-d arrays, got {a.shape}, {b.shape}")
    d = a - b
    boot = d[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return {"mean": float(d.mean()), "ci_low": float(np.quantile(boot, alpha)),
            "ci_high": float(np.quantile(boot, 1 - alpha))}


def per_problem_pass(counts: list[int], n: int, k: int) -> np.ndarray:
    """Unbiased pass@k for each problem from its correct count out of n samples."""
    return np.array([pass_at_k(n, c, k) for c in counts])


def transitions(before: list[int], after: list[int]) -> dict[str, int]:
    """Problems that went from unsolved (no correct sample) to solved, and back."""
    gained = sum(b == 0 < a for b, a in zip(before, after))
    lost = sum(a == 0 < b for b, a in zip(before, after))
    return {"unsolved_to_solved": int(gained), "solved_to_unsolved": int(lost)}
