"""Bias audit: do anomalies and importances differ between groups of a metadata column?

For each metadata column (sex, age, site, scanner, ...) two families of tests are run:

* **outlier tests** - are anomaly outliers different from inliers in this column?
  Mann-Whitney U for a numeric column, Fisher's exact test for a 2x2 table, chi-square
  otherwise. Outliers are, by default, patients whose mean decision value is negative
  (scikit-learn's own outlier rule); when that leaves either side empty, the top 10% by mean
  score are used. ``top_fraction=`` forces the top-fraction rule.
* **importance tests** - for every (target, roi) mass importance, does it differ between the
  column's groups? Mann-Whitney U for two groups, Kruskal-Wallis for more. A numeric column is
  split at its median into ``<= median`` and ``> median`` (two groups).

P-values are corrected with Benjamini-Hochberg across all tests of one column. Effect sizes:
rank-biserial correlation (two groups; positive when the first group is larger),
epsilon-squared (Kruskal-Wallis) and Cramer's V (contingency tables), each with a seeded,
stratified bootstrap 95% percentile interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from engine.analytics.anomaly import MEAN_TARGET
from engine.errors import UserError

AUDIT_SCHEMA: dict[str, Any] = {
    "rank": pl.Int64,
    "column": pl.String,
    "family": pl.String,  # 'outlier' or 'importance'
    "target": pl.String,
    "roi": pl.String,
    "test": pl.String,
    "groups": pl.String,
    "n": pl.Int64,
    "statistic": pl.Float64,
    "p_value": pl.Float64,
    "q_value": pl.Float64,
    "effect": pl.String,
    "effect_size": pl.Float64,
    "ci_low": pl.Float64,
    "ci_high": pl.Float64,
    "significant": pl.Boolean,
}


class AuditError(UserError, ValueError):
    """A metadata column that cannot be audited as asked."""


class UnknownColumnError(AuditError):
    """The column is not in the patients' metadata."""


class SingleGroupError(AuditError):
    """The column has only one group (or one value), so nothing can be compared."""


# ---------------------------------------------------------------- grouping
def is_numeric(series: pl.Series) -> bool:
    """Whether a metadata column is treated as numeric (median split) rather than categorical."""
    return series.dtype.is_numeric() and series.dtype != pl.Boolean


def group_labels(patients: pl.DataFrame, column: str) -> pl.DataFrame:
    """``patient_id, group`` for one column: categories as strings, numbers split at the median.

    Patients with a null value are left out. Raises a clear error for an unknown column or a
    column with a single group.
    """
    meta_cols = [c for c in patients.columns if c != "patient_id"]
    if column not in patients.columns or column == "patient_id":
        raise UnknownColumnError(
            f"column {column!r} is not in the patients' metadata; available: {sorted(meta_cols) or 'none'} "
            "(metadata comes from the manifest's extra columns)"
        )
    df = patients.select("patient_id", column).drop_nulls(column)
    values = df[column]
    if is_numeric(values):
        median = float(values.median())  # type: ignore[arg-type]
        label = pl.when(pl.col(column) <= median).then(pl.lit(f"{column}<={median:g}")).otherwise(
            pl.lit(f"{column}>{median:g}"))
        out = df.select(pl.col("patient_id").cast(pl.String), label.alias("group"))
    else:
        out = df.select(pl.col("patient_id").cast(pl.String), pl.col(column).cast(pl.String).alias("group"))
    n_groups = out["group"].n_unique()
    if n_groups < 2:
        raise SingleGroupError(
            f"column {column!r} has a single group among patients with a value "
            f"({out['group'].unique().to_list()}); choose a column whose values differ"
        )
    return out


# ---------------------------------------------------------------- effect sizes
def rank_biserial(x: np.ndarray, y: np.ndarray) -> float:
    """Rank-biserial correlation 2*U_x/(n_x*n_y) - 1: P(x > y) - P(x < y)."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    gt = (x[:, None] > y[None, :]).sum()
    lt = (x[:, None] < y[None, :]).sum()
    return float((gt - lt) / (x.size * y.size))


def _rank_biserial_batch(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rank-biserial for a batch of resamples: x (B, n_x), y (B, n_y)."""
    d = x[:, :, None] - y[:, None, :]
    return ((d > 0).sum(axis=(1, 2)) - (d < 0).sum(axis=(1, 2))) / (x.shape[1] * y.shape[1])


def epsilon_squared(h: float, n: int) -> float:
    """Epsilon-squared effect size of a Kruskal-Wallis H over n observations: H / (n - 1)."""
    return float(h / (n - 1)) if n > 1 else float("nan")


def _kruskal_h_batch(values: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Tie-corrected Kruskal-Wallis H for a batch: values (B, n) with groups as column blocks."""
    n = values.shape[1]
    ranks = stats.rankdata(values, axis=1)
    h = np.zeros(values.shape[0])
    start = 0
    for size in sizes:
        r = ranks[:, start:start + size].sum(axis=1)
        h += r**2 / size
        start += size
    h = 12.0 / (n * (n + 1)) * h - 3 * (n + 1)
    # tie correction: sum over tie groups of t^3 - t equals sum over elements of t_i^2 - 1
    t = (values[:, :, None] == values[:, None, :]).sum(axis=2)
    tie = (t.astype(float) ** 2 - 1).sum(axis=1)
    corr = 1 - tie / (n**3 - n)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(corr > 0, h / corr, np.nan)


def cramers_v(table: np.ndarray) -> float:
    """Cramer's V of a contingency table (phi for 2x2), without continuity correction."""
    table = np.asarray(table, dtype=float)
    n = table.sum()
    k = min(table.shape) - 1
    if n == 0 or k == 0:
        return float("nan")
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / n
    with np.errstate(divide="ignore", invalid="ignore"):
        chi2 = np.nansum(np.where(expected > 0, (table - expected) ** 2 / expected, 0.0))
    return float(np.sqrt(chi2 / (n * k)))


def _percentile_ci(samples: np.ndarray) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


# ---------------------------------------------------------------- tests
def compare_groups(
    groups: Sequence[np.ndarray], *, n_boot: int = 1000, rng: np.random.Generator
) -> dict[str, Any]:
    """Test a numeric quantity across groups: Mann-Whitney (2 groups) or Kruskal-Wallis (more).

    Returns test name, statistic, p-value, effect size (rank-biserial / epsilon-squared) and a
    stratified bootstrap 95% interval of the effect. Constant data gives p = NaN (no test).
    """
    groups = [np.asarray(g, dtype=float) for g in groups]
    n = int(sum(g.size for g in groups))
    everything = np.concatenate(groups)
    constant = np.all(everything == everything[0])
    if len(groups) == 2:
        x, y = groups
        if constant:
            stat, p = float("nan"), float("nan")
        else:
            res = stats.mannwhitneyu(x, y, alternative="two-sided")
            stat, p = float(res.statistic), float(res.pvalue)
        effect = rank_biserial(x, y)
        boot = np.empty(0)
        if n_boot > 0:
            bx = x[rng.integers(0, x.size, size=(n_boot, x.size))]
            by = y[rng.integers(0, y.size, size=(n_boot, y.size))]
            boot = _rank_biserial_batch(bx, by)
        lo, hi = _percentile_ci(boot)
        return {"test": "mann-whitney", "n": n, "statistic": stat, "p_value": p,
                "effect": "rank-biserial", "effect_size": effect, "ci_low": lo, "ci_high": hi}
    if constant:
        stat, p, effect = float("nan"), float("nan"), 0.0
    else:
        res = stats.kruskal(*groups)
        stat, p = float(res.statistic), float(res.pvalue)
        effect = epsilon_squared(stat, n)
    lo = hi = float("nan")
    if n_boot > 0:
        blocks = [g[rng.integers(0, g.size, size=(n_boot, g.size))] for g in groups]
        h = _kruskal_h_batch(np.concatenate(blocks, axis=1), [g.size for g in groups])
        lo, hi = _percentile_ci(h / (n - 1))
    return {"test": "kruskal-wallis", "n": n, "statistic": stat, "p_value": p,
            "effect": "epsilon-squared", "effect_size": effect, "ci_low": lo, "ci_high": hi}


def compare_categories(
    outlier: np.ndarray, category: np.ndarray, *, n_boot: int = 1000, rng: np.random.Generator
) -> dict[str, Any]:
    """Outlier flag vs a categorical value: Fisher exact for 2x2, chi-square otherwise."""
    cats = np.unique(category)
    table = np.array([[np.sum((outlier == o) & (category == c)) for c in cats] for o in (True, False)])
    if table.shape == (2, 2):
        res = stats.fisher_exact(table)
        test, stat, p = "fisher-exact", float(res.statistic), float(res.pvalue)
    else:
        res = stats.chi2_contingency(table, correction=False)
        test, stat, p = "chi-square", float(res.statistic), float(res.pvalue)
    effect = cramers_v(table)
    boot = []
    n = outlier.size
    for _ in range(n_boot):
        idx = rng.integers(0, n, size=n)
        o, c = outlier[idx], category[idx]
        boot.append(cramers_v(np.array([[np.sum((o == a) & (c == k)) for k in cats] for a in (True, False)])))
    lo, hi = _percentile_ci(np.asarray(boot))
    return {"test": test, "n": int(n), "statistic": stat, "p_value": p,
            "effect": "cramers-v", "effect_size": effect, "ci_low": lo, "ci_high": hi}


def outlier_flags(scores: pl.DataFrame, *, top_fraction: float | None = None) -> pl.DataFrame:
    """``patient_id, outlier`` from anomaly scores (their ``__mean__`` rows).

    Default: outlier when the mean decision value is negative (scikit-learn's rule); when that
    leaves no outlier or no inlier, the top 10% by mean score. ``top_fraction`` forces the
    top-fraction rule (at least one patient).
    """
    mean = scores.filter(pl.col("target") == MEAN_TARGET).select("patient_id", "score", "decision")
    if mean.height == 0:
        raise AuditError("the anomaly scores have no '__mean__' rows; run `agg2exp anomaly --run RUN` first")
    if top_fraction is None:
        flags = mean["decision"] < 0
        if 0 < int(flags.sum()) < mean.height:
            return mean.select("patient_id", flags.alias("outlier"))
        top_fraction = 0.10
    if not 0 < top_fraction < 1:
        raise AuditError(f"the outlier fraction must lie strictly between 0 and 1 (got {top_fraction})")
    k = max(1, int(round(top_fraction * mean.height)))
    ranked = mean.sort(["score", "patient_id"], descending=[True, False]).with_row_index("_i")
    return ranked.select("patient_id", (pl.col("_i") < k).alias("outlier"))


def bh(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values; NaN p-values stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = stats.false_discovery_control(p[ok], method="bh")
    return q


def audit_column(
    patients: pl.DataFrame,
    importances: pl.DataFrame,
    *,
    column: str,
    scores: pl.DataFrame | None = None,
    top_fraction: float | None = None,
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pl.DataFrame:
    """All tests of one metadata column, BH-corrected together, ranked by q-value.

    ``patients`` has ``patient_id`` and metadata columns; ``importances`` is the long format;
    ``scores`` (optional) are anomaly scores with ``__mean__`` rows for the outlier test.
    """
    rng = np.random.default_rng(seed)
    labels = group_labels(patients, column)
    rows: list[dict[str, Any]] = []

    if scores is not None and scores.height:
        flags = outlier_flags(scores, top_fraction=top_fraction)
        vals = patients.select(pl.col("patient_id").cast(pl.String), column).drop_nulls(column).join(
            flags, on="patient_id", how="inner")
        out = vals["outlier"].to_numpy()
        if 0 < out.sum() < out.size:
            series = vals[column]
            if is_numeric(series):
                v = series.cast(pl.Float64).to_numpy()
                res = compare_groups([v[out], v[~out]], n_boot=n_boot, rng=rng)
            else:
                res = compare_categories(out, series.cast(pl.String).to_numpy(), n_boot=n_boot, rng=rng)
            rows.append({"family": "outlier", "target": MEAN_TARGET, "roi": None,
                         "groups": "outliers vs inliers", **res})

    imp = importances.filter((pl.col("sign") == sign) & (pl.col("stat") == stat))
    if method is not None:
        imp = imp.filter(pl.col("method") == method)
    elif imp.height and imp["method"].n_unique() > 1:
        raise AuditError(
            f"the importances hold several methods {sorted(imp['method'].unique().to_list())}; choose one with --method"
        )
    imp = imp.with_columns(pl.col("patient_id").cast(pl.String)).join(labels, on="patient_id", how="inner")
    group_names = sorted(labels["group"].unique().to_list())
    for (target, roi), part in imp.group_by(["target", "roi"], maintain_order=True):
        present = [g for g in group_names if (part["group"] == g).any()]
        if len(present) < 2:
            continue
        arrays = [part.filter(pl.col("group") == g)["value"].fill_null(0.0).to_numpy() for g in present]
        res = compare_groups(arrays, n_boot=n_boot, rng=rng)
        rows.append({"family": "importance", "target": target, "roi": roi,
                     "groups": " vs ".join(present), **res})

    if not rows:
        return pl.DataFrame(schema=AUDIT_SCHEMA)
    frame = pl.DataFrame(rows, infer_schema_length=None).with_columns(pl.lit(column).alias("column"))
    q = bh(frame["p_value"].fill_null(float("nan")).to_numpy())
    frame = frame.with_columns(pl.Series("q_value", q).fill_nan(None), pl.col("p_value").fill_nan(None))
    frame = frame.with_columns((pl.col("q_value") < alpha).fill_null(False).alias("significant"))
    frame = frame.with_columns(pl.col("effect_size").abs().alias("_abs")).sort(
        ["q_value", "p_value", "_abs"], descending=[False, False, True], nulls_last=True
    ).drop("_abs")
    frame = frame.with_row_index("rank", offset=1).with_columns(pl.col("rank").cast(pl.Int64))
    return frame.select([c for c in AUDIT_SCHEMA]).cast(AUDIT_SCHEMA)


def audit(
    patients: pl.DataFrame,
    importances: pl.DataFrame,
    *,
    columns: Sequence[str],
    scores: pl.DataFrame | None = None,
    **kwargs: Any,
) -> pl.DataFrame:
    """Audit several columns (each corrected on its own); ranks restart within each column."""
    if not columns:
        raise AuditError("give at least one metadata column to audit, e.g. --by sex,age")
    frames = [audit_column(patients, importances, column=c, scores=scores, **kwargs) for c in columns]
    return pl.concat(frames)


#: Columns of ``Store.patients`` that are bookkeeping, not cohort metadata.
_NOT_METADATA = ("run_id", "image_path", "label_path", "status", "error", "traceback", "attempts",
                 "worker", "seconds", "timings", "updated_at")


def audit_run(
    source: Any,
    *,
    run_id: str | None,
    columns: Sequence[str],
    model_id: str | None = None,
    **kwargs: Any,
) -> tuple[str, pl.DataFrame, bool]:
    """Audit a stored run and store the result: ``(audit_id, ranked results, had anomaly scores)``.

    ``source`` is a writable Store; patients that are ``done`` are audited, with the run's latest
    anomaly model (or ``model_id``) for the outlier tests. The audit id is a hash of the run, the
    model and the parameters, so re-running the same audit replaces it.
    """
    import hashlib
    import json

    if not columns:
        raise AuditError("give the metadata columns to audit, e.g. --by sex,age,site")
    run_id = source.require_run(run_id)
    patients = source.patients(run_id)
    patients = patients.filter(pl.col("status") == "done").select(
        [c for c in patients.columns if c not in _NOT_METADATA]
    )
    scores = source.anomaly_model_scores(run_id, model_id)
    used_model = scores["model_id"][0] if scores.height else None
    result = audit(patients, source.importances(run_id), columns=columns,
                   scores=scores if scores.height else None, **kwargs)
    params = {"by": list(columns), **{k: v for k, v in kwargs.items()}}
    audit_id = "audit-" + hashlib.sha1(json.dumps([run_id, used_model, params], default=str).encode()).hexdigest()[:10]
    source.write_audit(audit_id=audit_id, run_id=run_id, results=result, model_id=used_model, params=params)
    return audit_id, result, bool(scores.height)
