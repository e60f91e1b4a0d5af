"""Paired statistics across methods evaluated on the same problems (`dail compare`).

pass@k of one method comes with a bootstrap CI over problems (`evaluation.bootstrap_ci`). To
say whether method A beats B, their CIs are the wrong tool: both are evaluated on the same
problems, and problem difficulty dominates the variance. The paired bootstrap resamples
*problems* once, shares the resampled index sets across every method of a split, and reports
the percentile CI of the difference of means:

    idx_r ~ Uniform{0..P-1}^P  (r = 1..R, the same for all methods)
    Δ_r   = mean(a[idx_r]) − mean(b[idx_r]),   CI = percentiles (2.5, 97.5) of Δ_r

`a` and `b` are per-problem unbiased pass@k values from the same n samples per problem.
"""

from __future__ import annotations

import numpy as np

from dail.evaluation import BOOTSTRAP_CONFIDENCE, BOOTSTRAP_RESAMPLES, pass_at_k

__all__ = ["resample_indices", "paired_difference", "per_problem_pass", "transitions"]


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
