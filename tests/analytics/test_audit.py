"""Bias audit, checked against scipy called directly on hand-built data."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats

from engine.analytics.audit import (
    SingleGroupError,
    UnknownColumnError,
    audit,
    audit_column,
    bh,
    compare_groups,
    group_labels,
    outlier_flags,
    rank_biserial,
)
from engine.analytics.reference import read_reference_csv
from engine.errors import UserError
from tests.analytics._store import reference_csv, synthetic_metadata

N = 24


@pytest.fixture()
def cohort() -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(11)
    ids = [f"p{i:02d}" for i in range(N)]
    sex = ["F" if i < N // 2 else "M" for i in range(N)]
    site = ["abc"[i % 3] for i in range(N)]
    age = rng.integers(20, 90, N).astype(float)
    patients = pl.DataFrame({"patient_id": ids, "sex": sex, "site": site, "age": age, "const": ["x"] * N})
    rows = []
    for i, pid in enumerate(ids):
        shift = 0.3 if sex[i] == "M" else 0.0  # heart-in-heart differs by sex
        rows.append((pid, "m", "heart", "heart", "mass", "abs", 0.2 + shift + 0.05 * rng.standard_normal()))
        rows.append((pid, "m", "heart", "aorta", "mass", "abs", 0.1 + 0.05 * rng.standard_normal()))
    imp = pl.DataFrame(rows, schema=["patient_id", "method", "target", "roi", "stat", "sign", "value"], orient="row")
    score = rng.random(N)
    scores = pl.DataFrame({"patient_id": ids, "target": ["__mean__"] * N, "score": score,
                           "decision": 0.5 - score})
    return patients, imp, scores


def test_importance_tests_match_scipy(cohort) -> None:
    patients, imp, _ = cohort
    res = audit_column(patients, imp, column="sex", n_boot=200, seed=0)
    assert res.height == 2 and set(res["family"]) == {"importance"}
    heart = imp.filter(pl.col("roi") == "heart").join(patients, on="patient_id")
    f = heart.filter(pl.col("sex") == "F")["value"].to_numpy()
    m = heart.filter(pl.col("sex") == "M")["value"].to_numpy()
    mw = stats.mannwhitneyu(f, m, alternative="two-sided")
    row = res.filter(pl.col("roi") == "heart").row(0, named=True)
    assert row["test"] == "mann-whitney" and row["groups"] == "F vs M" and row["n"] == N
    assert row["statistic"] == pytest.approx(mw.statistic)
    assert row["p_value"] == pytest.approx(mw.pvalue)
    assert row["effect_size"] == pytest.approx(2 * mw.statistic / (f.size * m.size) - 1)
    assert row["effect_size"] < -0.9  # M larger
    assert row["ci_low"] <= row["effect_size"] <= row["ci_high"]
    # BH by hand over the column's two p-values
    p = np.sort(res["p_value"].to_numpy())
    q_hand = np.minimum.accumulate((p * 2 / np.arange(1, 3))[::-1])[::-1]
    np.testing.assert_allclose(np.sort(res["q_value"].to_numpy()), np.minimum(q_hand, 1))
    assert res["rank"].to_list() == [1, 2] and res["roi"][0] == "heart" and res["significant"][0]


def test_bh_by_hand() -> None:
    p = np.array([0.01, 0.04, 0.03, 0.5, np.nan])
    # sorted 0.01, 0.03, 0.04, 0.5 with m = 4: 0.04, 0.06, 0.0533 -> 0.0533 (monotone), 0.5
    expected = np.array([0.04, 0.16 / 3, 0.16 / 3, 0.5, np.nan])
    np.testing.assert_allclose(bh(p), expected)


def test_kruskal_and_epsilon_squared(cohort) -> None:
    patients, imp, _ = cohort
    res = audit_column(patients, imp, column="site", n_boot=100, seed=1)
    row = res.filter(pl.col("roi") == "aorta").row(0, named=True)
    joined = imp.filter(pl.col("roi") == "aorta").join(patients, on="patient_id")
    groups = [joined.filter(pl.col("site") == s)["value"].to_numpy() for s in "abc"]
    kw = stats.kruskal(*groups)
    assert row["test"] == "kruskal-wallis" and row["groups"] == "a vs b vs c"
    assert row["statistic"] == pytest.approx(kw.statistic)
    assert row["p_value"] == pytest.approx(kw.pvalue)
    assert row["effect_size"] == pytest.approx(kw.statistic / (N - 1))
    assert row["ci_low"] <= row["ci_high"]


def _pairwise_rank_biserial(x: np.ndarray, y: np.ndarray) -> float:
    """The definition by pairs: P(x > y) - P(x < y), O(n1 n2) (only for small checks)."""
    d = np.asarray(x, float)[:, None] - np.asarray(y, float)[None, :]
    return float(((d > 0).sum() - (d < 0).sum()) / d.size)


def test_rank_biserial_from_u_equals_the_pairwise_definition_with_ties() -> None:
    rng = np.random.default_rng(5)
    for _ in range(20):
        x = rng.integers(0, 6, rng.integers(1, 15)).astype(float)
        y = rng.integers(0, 6, rng.integers(1, 15)).astype(float)
        assert rank_biserial(x, y) == pytest.approx(_pairwise_rank_biserial(x, y), abs=1e-12)


def test_batched_bootstrap_equals_each_resample_computed_alone(monkeypatch) -> None:
    import importlib

    audit_mod = importlib.import_module("engine.analytics.audit")
    monkeypatch.setattr(audit_mod, "BOOT_BATCH", 7)  # several batches, the last one partial
    x = np.array([0.1, 0.4, 0.4, 0.9, 0.3, 0.2])
    y = np.array([0.5, 0.4, 0.8, 0.7, 0.7])
    boot = audit_mod._boot_rank_biserial(x, y, 20, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    expected = []
    for b in audit_mod._batches(20):
        bx = x[rng.integers(0, x.size, size=(b, x.size))]
        by = y[rng.integers(0, y.size, size=(b, y.size))]
        expected += [_pairwise_rank_biserial(bx[i], by[i]) for i in range(b)]
    np.testing.assert_allclose(boot, expected, atol=1e-12)
    groups = [np.array([1.0, 2, 2, 3]), np.array([2.0, 4, 4, 4, 5]), np.array([0.0, 1, 1])]
    h = audit_mod._boot_kruskal_h(groups, 20, np.random.default_rng(9))
    rng = np.random.default_rng(9)
    ref = []
    for b in audit_mod._batches(20):
        blocks = [g[rng.integers(0, g.size, size=(b, g.size))] for g in groups]
        for i in range(b):
            rows = [blk[i] for blk in blocks]
            const = np.unique(np.concatenate(rows)).size == 1
            ref.append(np.nan if const else stats.kruskal(*rows).statistic)
    np.testing.assert_allclose(h, ref, equal_nan=True)


def test_numeric_column_is_split_at_the_median(cohort) -> None:
    patients, imp, _ = cohort
    labels = group_labels(patients, "age")
    median = float(np.median(patients["age"].to_numpy()))
    assert set(labels["group"]) == {f"age<={median:g}", f"age>{median:g}"}
    low = labels.filter(pl.col("group") == f"age<={median:g}")["patient_id"].to_list()
    assert low == patients.filter(pl.col("age") <= median)["patient_id"].to_list()


def test_outlier_tests(cohort) -> None:
    patients, imp, scores = cohort
    flags = outlier_flags(scores)
    expected = (scores["decision"] < 0).to_list()
    assert flags["outlier"].to_list() == expected
    top = outlier_flags(scores, top_fraction=0.25)
    assert int(top["outlier"].sum()) == 6
    assert set(top.filter(pl.col("outlier"))["patient_id"]) == set(
        scores.sort("score", descending=True)["patient_id"][:6])
    # categorical 2x2: Fisher exact
    res = audit_column(patients, imp, column="sex", scores=scores, n_boot=50)
    row = res.filter(pl.col("family") == "outlier").row(0, named=True)
    j = patients.join(flags, on="patient_id")
    table = [[int(((j["outlier"]) & (j["sex"] == s)).sum()) for s in ("F", "M")],
             [int(((~j["outlier"]) & (j["sex"] == s)).sum()) for s in ("F", "M")]]
    assert row["test"] == "fisher-exact"
    assert row["p_value"] == pytest.approx(stats.fisher_exact(table).pvalue)
    # categorical with 3 levels and 8 patients per site: expected counts below 5, so a
    # permutation test of the chi-square statistic (two Monte Carlo estimates agree to ~0.01)
    row3 = audit_column(patients, imp, column="site", scores=scores, n_boot=20).filter(
        pl.col("family") == "outlier").row(0, named=True)
    table3 = np.array([[int((j["outlier"] & (j["site"] == s)).sum()) for s in "abc"],
                       [int((~j["outlier"] & (j["site"] == s)).sum()) for s in "abc"]])
    assert stats.contingency.expected_freq(table3).min() < 5
    assert row3["test"] == "chi-square-permutation"
    perm = stats.chi2_contingency(table3, correction=False,
                                  method=stats.PermutationMethod(n_resamples=9999, random_state=0))
    assert row3["statistic"] == pytest.approx(perm.statistic)
    assert row3["p_value"] == pytest.approx(perm.pvalue, abs=0.03)
    # numeric: Mann-Whitney of age, outliers vs inliers
    rowa = audit_column(patients, imp, column="age", scores=scores, n_boot=20).filter(
        pl.col("family") == "outlier").row(0, named=True)
    ages = j["age"].to_numpy()
    out = j["outlier"].to_numpy()
    mw = stats.mannwhitneyu(ages[out], ages[~out], alternative="two-sided")
    assert rowa["p_value"] == pytest.approx(mw.pvalue)
    assert rowa["effect_size"] == pytest.approx(rank_biserial(ages[out], ages[~out]))


def test_bootstrap_is_seeded() -> None:
    x, y = np.arange(10.0), np.arange(5.0, 15.0)
    a = compare_groups([x, y], n_boot=300, rng=np.random.default_rng(4))
    b = compare_groups([x, y], n_boot=300, rng=np.random.default_rng(4))
    assert (a["ci_low"], a["ci_high"]) == (b["ci_low"], b["ci_high"])


def test_bad_columns_are_user_errors(cohort) -> None:
    patients, imp, _ = cohort
    with pytest.raises(UnknownColumnError, match="not in the patients' metadata.*available") as exc:
        audit(patients, imp, columns=["scanner"])
    assert isinstance(exc.value, UserError)
    with pytest.raises(SingleGroupError, match="single group"):
        audit(patients, imp, columns=["const"])


def test_audit_on_the_shared_csv_is_ranked() -> None:
    data = read_reference_csv(reference_csv())
    patients = synthetic_metadata(data.patient_ids)
    res = audit(patients, data.importances, columns=["sex", "site"], n_boot=20, seed=0)
    assert res.filter(pl.col("column") == "sex").height == 17 * 17
    for col in ("sex", "site"):
        part = res.filter(pl.col("column") == col)
        q = part["q_value"].drop_nulls().to_numpy()
        assert np.all(np.diff(q) >= 0)
        assert part["rank"].to_list() == list(range(1, part.height + 1))


def test_delong_interval_by_hand_and_against_the_bootstrap() -> None:
    from engine.analytics.audit import _boot_rank_biserial, delong_interval

    # placements by hand: x = [1, 3], y = [0, 2, 3]; V10 = [1/3, (2 + 0.5)/3], V01 = [1, 0.5, 0.25]
    x, y = np.array([1.0, 3.0]), np.array([0.0, 2.0, 3.0])
    v10, v01 = np.array([1 / 3, 2.5 / 3]), np.array([1.0, 0.5, 0.25])
    r = 2 * v10.mean() - 1
    assert r == pytest.approx(_pairwise_rank_biserial(x, y))
    se = 2 * np.sqrt(v10.var(ddof=1) / 2 + v01.var(ddof=1) / 3)
    lo, hi = delong_interval(x, y)
    assert (lo, hi) == pytest.approx((max(-1, r - 1.959964 * se), min(1, r + 1.959964 * se)), abs=1e-6)
    # on a larger sample the DeLong interval and the bootstrap percentile interval agree
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.3, 1, 1500), rng.normal(0, 1, 2500)
    boot = np.percentile(_boot_rank_biserial(x, y, 2000, np.random.default_rng(1)), [2.5, 97.5])
    np.testing.assert_allclose(delong_interval(x, y), boot, atol=0.01)


def test_the_audit_bootstrap_benchmark_runs_and_writes_its_json(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "b.json"
    subprocess.run([sys.executable, str(root / "benchmarks" / "audit_bootstrap.py"), "--sizes", "60,25000",
                    "--n-boot", "50", "--json", str(out)], check=True, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(root)})
    rows = json.loads(out.read_text())["rows"]
    assert [r["interval"] for r in rows] == ["bootstrap", "delong"]
    assert rows[0]["baseline_s"] > 0 and rows[0]["ci"][0] <= rows[0]["ci"][1]


def test_above_the_bootstrap_limit_kruskal_gets_a_normal_interval_close_to_the_percentile_one(monkeypatch) -> None:
    import importlib

    audit_mod = importlib.import_module("engine.analytics.audit")
    rng = np.random.default_rng(2)
    groups = [rng.normal(0.0, 1, 700), rng.normal(0.2, 1, 800), rng.normal(0.4, 1, 900)]
    percentile = audit_mod.compare_groups(groups, n_boot=1000, rng=np.random.default_rng(0))
    monkeypatch.setattr(audit_mod, "BOOT_MAX_N", 1000)
    normal = audit_mod.compare_groups(groups, n_boot=1000, rng=np.random.default_rng(0))
    assert normal["effect_size"] == percentile["effect_size"] == pytest.approx(
        stats.kruskal(*groups).statistic / 2399)
    assert normal["ci_low"] == pytest.approx(percentile["ci_low"], abs=0.01)
    assert normal["ci_high"] == pytest.approx(percentile["ci_high"], abs=0.01)
