"""Bench statistics against scipy.stats and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as ss

from dicomnode.lab import stats


@pytest.fixture
def scores():
    rng = np.random.default_rng(3)
    base = rng.normal(0.6, 0.05, 20)
    return {
        "ref": base,
        "better": base + 0.02 + rng.normal(0, 0.01, 20),
        "same": base + rng.normal(0, 0.01, 20),
    }


def test_describe_mean_sd_and_ci_match_scipy(scores):
    x = scores["ref"]
    d = stats.describe(x)
    lo, hi = ss.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=ss.sem(x))
    assert (d.n, d.mean, d.sd) == (20, pytest.approx(x.mean()), pytest.approx(x.std(ddof=1)))
    assert (d.ci_low, d.ci_high) == (pytest.approx(lo), pytest.approx(hi))
    assert stats.describe([1.0, np.nan, 3.0]).n == 2


def test_paired_tests_match_scipy_and_are_corrected(scores):
    rows = {r.method: r for r in stats.paired_tests(scores, "ref", "holm")}
    assert set(rows) == {"better", "same"}
    for m, r in rows.items():
        t = ss.ttest_rel(scores[m], scores["ref"])
        w = ss.wilcoxon(scores[m] - scores["ref"])
        assert (r.t_stat, r.t_p) == (pytest.approx(t.statistic), pytest.approx(t.pvalue))
        assert (r.wilcoxon_stat, r.wilcoxon_p) == (pytest.approx(w.statistic), pytest.approx(w.pvalue))
        assert r.mean_diff == pytest.approx(np.mean(scores[m] - scores["ref"]))
    raw = [rows["better"].t_p, rows["same"].t_p]
    assert [rows["better"].t_p_adj, rows["same"].t_p_adj] == pytest.approx(list(stats.holm(raw)))
    bonf = {r.method: r for r in stats.paired_tests(scores, "ref", "bonferroni")}
    assert bonf["same"].wilcoxon_p_adj == pytest.approx(min(1.0, 2 * rows["same"].wilcoxon_p))
    assert rows["better"].wilcoxon_p_adj < 0.05


def test_holm_and_bonferroni_by_hand():
    p = [0.01, 0.04, 0.03, 0.20]
    # sorted 0.01, 0.03, 0.04, 0.20 -> 4*0.01, 3*0.03, max(0.09, 2*0.04), max(0.09, 1*0.2)
    assert list(stats.holm(p)) == pytest.approx([0.04, 0.09, 0.09, 0.20])
    assert list(stats.bonferroni(p)) == pytest.approx([0.04, 0.16, 0.12, 0.80])


def test_friedman_matches_scipy(scores):
    om = stats.omnibus(scores)
    ref = ss.friedmanchisquare(*scores.values())
    assert (om.friedman_stat, om.friedman_p) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue))
    assert om.k == 3 and om.n == 20


def test_rm_anova_equals_squared_paired_t_for_two_methods(scores):
    two = {"ref": scores["ref"], "better": scores["better"]}
    f, p = stats.rm_anova(two)
    t = ss.ttest_rel(scores["better"], scores["ref"])
    assert f == pytest.approx(t.statistic**2) and p == pytest.approx(t.pvalue)


def test_rm_anova_runs_only_when_every_method_is_normal(scores):
    om = stats.omnibus(scores)
    normal = all(ss.shapiro(v).pvalue > 0.05 for v in scores.values())
    assert om.normal == normal and (om.anova_f is not None) == normal
    skewed = dict(scores, skew=np.exp(np.linspace(0, 8, 20)))
    assert stats.omnibus(skewed).anova_f is None


def test_non_finite_pairs_are_dropped_for_all_methods(scores):
    s = {k: v.copy() for k, v in scores.items()}
    s["same"][0] = np.nan
    rows = stats.paired_tests(s, "ref")
    assert all(r.n == 19 for r in rows)
