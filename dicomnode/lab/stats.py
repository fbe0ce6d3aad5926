"""Paired statistics for comparing fusion methods on the same image pairs.

Scores are given per method as 1-D arrays aligned by pair (element i of every method is the same
pair). Pairs with a non-finite value in any compared method are dropped (complete cases).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    """Mean, sample SD (ddof 1) and the t-based 95% confidence interval of the mean."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class PairedComparison:
    """A method against the reference on one metric: mean difference (method - reference) and p-values."""

    method: str
    reference: str
    n: int
    mean_diff: float
    t_stat: float
    t_p: float
    t_p_adj: float
    wilcoxon_stat: float
    wilcoxon_p: float
    wilcoxon_p_adj: float


@dataclass(frozen=True)
class OmnibusTests:
    """Across all methods: Friedman; repeated-measures ANOVA only when every method passes Shapiro-Wilk."""

    n: int
    k: int
    friedman_stat: float
    friedman_p: float
    normal: bool  # every method's scores pass Shapiro-Wilk at alpha
    anova_f: float | None
    anova_p: float | None


def describe(values, confidence: float = 0.95) -> Summary:
    """Mean +- SD and CI (Student t with n-1 df) of the finite values."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan)
    mean = float(x.mean())
    if n == 1:
        return Summary(1, mean, float("nan"), float("nan"), float("nan"))
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / np.sqrt(n))
    return Summary(n, mean, sd, mean - half, mean + half)


def holm(pvalues) -> np.ndarray:
    """Holm step-down adjusted p-values (family-wise error), capped at 1, in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    order = np.argsort(p)
    adj = np.empty(m)
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, (m - rank) * p[idx])
        adj[idx] = min(1.0, running)
    return adj


def bonferroni(pvalues) -> np.ndarray:
    """Bonferroni adjusted p-values: m * p capped at 1."""
    p = np.asarray(pvalues, dtype=np.float64)
    return np.minimum(1.0, p * len(p))


def _adjust(pvalues, correction: str) -> np.ndarray:
    if correction == "holm":
        return holm(pvalues)
    if correction == "bonferroni":
        return bonferroni(pvalues)
    raise ValueError(f"correction must be 'holm' or 'bonferroni', not {correction!r}")


def complete_cases(scores: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same pairs for every method: drop pair i if any method's value is not finite."""
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in scores.items()}
    lengths = {len(v) for v in arrays.values()}
    if len(lengths) > 1:
        raise ValueError(f"methods were scored on different numbers of pairs: {sorted(lengths)}")
    keep = np.all(np.isfinite(np.vstack(list(arrays.values()))), axis=0) if arrays else np.array([], bool)
    return {k: v[keep] for k, v in arrays.items()}


def _wilcoxon(d: np.ndarray) -> tuple[float, float]:
    if len(d) == 0 or np.all(d == 0):
        return float("nan"), 1.0  # no difference at all: nothing to reject
    res = stats.wilcoxon(d)
    return float(res.statistic), float(res.pvalue)


def paired_tests(scores: dict[str, np.ndarray], reference: str, correction: str = "holm") -> list[PairedComparison]:
    """Paired t-test and Wilcoxon signed-rank of every method against ``reference``, corrected over the methods."""
    if reference not in scores:
        raise ValueError(f"reference method {reference!r} has no scores")
    data = complete_cases(scores)
    ref = data[reference]
    rows = []
    for method, values in data.items():
        if method == reference:
            continue
        d = values - ref
        if len(d) < 2 or np.all(d == d[0]):
            t_stat, t_p = float("nan"), (1.0 if len(d) and np.all(d == 0) else float("nan"))
        else:
            res = stats.ttest_rel(values, ref)
            t_stat, t_p = float(res.statistic), float(res.pvalue)
        w_stat, w_p = _wilcoxon(d)
        rows.append((method, len(d), float(d.mean()) if len(d) else float("nan"), t_stat, t_p, w_stat, w_p))
    t_adj = _adjust([np.nan_to_num(r[4], nan=1.0) for r in rows], correction) if rows else []
    w_adj = _adjust([np.nan_to_num(r[6], nan=1.0) for r in rows], correction) if rows else []
    return [
        PairedComparison(m, reference, n, md, ts, tp, float(ta), ws, wp, float(wa))
        for (m, n, md, ts, tp, ws, wp), ta, wa in zip(rows, t_adj, w_adj, strict=True)
    ]


def rm_anova(scores: dict[str, np.ndarray]) -> tuple[float, float]:
    """One-way repeated-measures ANOVA (subjects = pairs, treatment = method): F and p with (k-1, (k-1)(n-1)) df."""
    x = np.vstack([np.asarray(v, dtype=np.float64) for v in scores.values()]).T  # (n pairs, k methods)
    n, k = x.shape
    grand = x.mean()
    ss_methods = n * ((x.mean(axis=0) - grand) ** 2).sum()
    ss_subjects = k * ((x.mean(axis=1) - grand) ** 2).sum()
    ss_error = ((x - grand) ** 2).sum() - ss_methods - ss_subjects
    df1, df2 = k - 1, (k - 1) * (n - 1)
    if ss_error <= 0:
        return float("inf") if ss_methods > 0 else float("nan"), 0.0 if ss_methods > 0 else float("nan")
    f = (ss_methods / df1) / (ss_error / df2)
    return float(f), float(stats.f.sf(f, df1, df2))


def omnibus(scores: dict[str, np.ndarray], alpha: float = 0.05) -> OmnibusTests:
    """Friedman across all methods, and RM-ANOVA when Shapiro-Wilk does not reject normality for any method."""
    data = complete_cases(scores)
    k = len(data)
    n = len(next(iter(data.values()))) if data else 0
    nan = float("nan")
    if k < 3 or n < 2:
        return OmnibusTests(n, k, nan, nan, False, None, None)
    cols = list(data.values())
    try:
        fr = stats.friedmanchisquare(*cols)
        f_stat, f_p = float(fr.statistic), float(fr.pvalue)
    except ValueError:
        f_stat, f_p = nan, nan
    normal = n >= 3 and all(np.ptp(c) > 0 and stats.shapiro(c).pvalue > alpha for c in cols)
    anova_f, anova_p = rm_anova(data) if normal else (None, None)
    return OmnibusTests(n, k, f_stat, f_p, normal, anova_f, anova_p)
