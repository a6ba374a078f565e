"""Bias audit: do anomalies and importances differ between groups of a metadata column?

For each metadata column (sex, age, site, scanner, ...) two families of tests are run:

* **outlier tests** - are anomaly outliers different from inliers in this column?
  Mann-Whitney U for a numeric column; for a contingency table Fisher's exact test (2x2),
  chi-square when every expected count is at least 5, else a permutation test of the chi-square
  statistic (SciPy). Outliers follow ``outlier_rule``: ``"decision"`` (default) - the mean
  decision value over classes is negative (scikit-learn's own rule); ``"union"`` - the paper's
  rule, any class's forest flags the patient (its decision value is negative). When the rule
  leaves either side empty, the top 10% by mean score are used; ``top_fraction=`` forces the
  top-fraction rule.
* **importance tests** - for every (target, roi) of the RoI set (``rois="parts"`` by default;
  a joined RoI and its parts are never tested together), does the importance differ between the
  column's groups? Mann-Whitney U for two groups, Kruskal-Wallis for more. Every patient with
  the target counts; an empty RoI's mass is 0. A numeric column is split at its median into
  ``<= median`` and ``> median``; missing values (null or NaN) are left out of the groups and of
  the median, and counted.

P-values are corrected with Benjamini-Hochberg across all tests of one column. Effect sizes:
rank-biserial correlation 2U/(n1 n2) - 1 from Mann-Whitney's U (two groups; positive when the
first group is larger), epsilon-squared (Kruskal-Wallis) and Cramer's V (contingency tables),
each with a seeded, stratified bootstrap 95% percentile interval. The bootstrap works on ranks:
the values are sorted once, and each resample is its counts of the distinct values, so a test
costs O(n log n) once plus O(n) per resample, in memory BOOT_BATCH x n.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
from scipy import stats

from engine.analytics.matrix import ImportanceMatrix, SelectionError, from_long
from engine.analytics.rois import RoIChoice, RoISetError, choose_rois, class_order, describe
from engine.errors import UserError
from engine.vocabulary import MEAN_TARGET

OUTLIER_RULES: tuple[str, ...] = ("decision", "union")
#: Bootstrap resamples evaluated at once: memory is BOOT_BATCH x n, whatever n_boot is.
BOOT_BATCH = 64
#: Above this many patients a two-group test's interval is DeLong's (O(n log n)) rather than a
#: bootstrap (O(n_boot x n)): at 100,000 patients 1,000 resamples cost ~13 s per test.
BOOT_MAX_N = 20_000
#: Above BOOT_MAX_N a Kruskal-Wallis interval is effect +- 1.96 bootstrap standard errors, the
#: standard error from this many resamples (50-200 estimate a standard error well; Efron and
#: Tibshirani 1993, ch. 6). At that size it is close to the percentile interval; at smaller sizes
#: epsilon-squared's bootstrap distribution is right-skewed and the percentile interval is kept.
BOOT_SE_RESAMPLES = 50

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

    Patients with a missing value (null, or NaN in a numeric column) are left out, of the groups
    and of the median (:func:`missing_count` counts them). Raises a clear error for an unknown
    column or a column with a single group.
    """
    meta_cols = [c for c in patients.columns if c != "patient_id"]
    if column not in patients.columns or column == "patient_id":
        raise UnknownColumnError(
            f"column {column!r} is not in the patients' metadata; available: {sorted(meta_cols) or 'none'} "
            "(metadata comes from the manifest's extra columns)"
        )
    df = _present(patients.select("patient_id", column), column)
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


def _present(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    """Rows whose ``column`` holds a value: not null, and not NaN when it is a float."""
    frame = frame.drop_nulls(column)
    if frame.schema[column].is_float():
        frame = frame.filter(~pl.col(column).is_nan())
    return frame


def missing_count(patients: pl.DataFrame, column: str) -> int:
    """How many patients have no value (null or NaN) in ``column``."""
    if column not in patients.columns:
        return 0
    return patients.height - _present(patients.select(column), column).height


# ---------------------------------------------------------------- effect sizes
def rank_biserial(x: np.ndarray, y: np.ndarray) -> float:
    """Rank-biserial correlation 2*U_x/(n_x*n_y) - 1 = P(x > y) - P(x < y), from Mann-Whitney's U."""
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    u = stats.mannwhitneyu(x, y, alternative="two-sided").statistic
    return float(2.0 * u / (x.size * y.size) - 1.0)


def _batches(n_boot: int) -> list[int]:
    return [min(BOOT_BATCH, n_boot - start) for start in range(0, n_boot, BOOT_BATCH)]


def _boot_rank_sums(groups: Sequence[np.ndarray], n_boot: int,
                    rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stratified bootstrap, BOOT_BATCH resamples at a time, by ranks of the original values.

    The values are sorted once (O(n log n)); a resample is then only its counts of each distinct
    value, so its mid-ranks, rank sums and tie counts cost O(n) time and memory - no sort, no
    pairs. All of it is integer arithmetic (twice a mid-rank is an integer), which NumPy does
    several times faster than the same work in floating point. Yields ``(rank sums (b, G), counts
    of each distinct value (b, V))`` per batch.
    """
    uniq, inverse = np.unique(np.concatenate(groups), return_inverse=True)
    starts = np.cumsum([0] + [g.size for g in groups])
    codes = [inverse[starts[i]:starts[i + 1]] for i in range(len(groups))]
    v = uniq.size
    for b in _batches(n_boot):
        offsets = (np.arange(b) * v)[:, None]
        drawn = [code[rng.integers(0, code.size, size=(b, code.size))] for code in codes]  # (b, n_g) value codes
        total = np.bincount(np.concatenate([d + offsets for d in drawn], axis=1).ravel(),
                            minlength=b * v).reshape(b, v)
        # twice the mid-rank of each value: 2 x (values below it) + (its count + 1), in place
        twice_mid = np.cumsum(total, axis=1)
        twice_mid *= 2
        twice_mid -= total
        twice_mid += 1
        sums = np.stack([np.take_along_axis(twice_mid, d, axis=1).sum(axis=1) for d in drawn], axis=1)
        yield sums / 2.0, total


def _boot_rank_biserial(x: np.ndarray, y: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Rank-biserial 2U/(n_x n_y) - 1 of each bootstrap resample, U = R_x - n_x(n_x + 1)/2."""
    out = [2.0 * (r[:, 0] - x.size * (x.size + 1) / 2.0) / (x.size * y.size) - 1.0
           for r, _ in _boot_rank_sums([x, y], n_boot, rng)]
    return np.concatenate(out) if out else np.empty(0)


def delong_interval(x: np.ndarray, y: np.ndarray, *, level: float = 0.95) -> tuple[float, float]:
    """Normal interval of the rank-biserial 2*AUC - 1 with DeLong's variance of the AUC (1988).

    AUC = U/(n_x n_y); its variance is var(V10)/n_x + var(V01)/n_y with the placement values
    V10_i = P(y < x_i) + P(y = x_i)/2 and V01_j = P(x > y_j) + P(x = y_j)/2, all from ranks:
    O(n log n), against O(B n) for a bootstrap of B resamples.
    """
    nx, ny = x.size, y.size
    if nx < 2 or ny < 2:
        return float("nan"), float("nan")
    pooled = stats.rankdata(np.concatenate([x, y]))
    v10 = (pooled[:nx] - stats.rankdata(x)) / ny
    v01 = 1.0 - (pooled[nx:] - stats.rankdata(y)) / nx
    auc = v10.mean()
    se = 2.0 * np.sqrt(v10.var(ddof=1) / nx + v01.var(ddof=1) / ny)
    z = stats.norm.ppf(0.5 + level / 2)
    r = 2.0 * auc - 1.0
    return float(max(-1.0, r - z * se)), float(min(1.0, r + z * se))


def _boot_kruskal_h(groups: Sequence[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Tie-corrected Kruskal-Wallis H of each bootstrap resample (NaN for a constant one)."""
    sizes = np.array([g.size for g in groups], dtype=float)
    n = sizes.sum()
    out = []
    for r, total in _boot_rank_sums(groups, n_boot, rng):
        h = 12.0 / (n * (n + 1)) * (r**2 / sizes).sum(axis=1) - 3 * (n + 1)
        ties = 1.0 - (total * total * total - total).sum(axis=1) / (n**3 - n)  # integers: counts <= n
        with np.errstate(divide="ignore", invalid="ignore"):
            out.append(np.where(ties > 0, h / ties, np.nan))
    return np.concatenate(out) if out else np.empty(0)


def epsilon_squared(h: float, n: int) -> float:
    """Epsilon-squared effect size of a Kruskal-Wallis H over n observations: H / (n - 1)."""
    return float(h / (n - 1)) if n > 1 else float("nan")


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


def _normal_ci(estimate: float, samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    samples = samples[np.isfinite(samples)]
    if samples.size < 2 or not np.isfinite(estimate):
        return float("nan"), float("nan")
    half = stats.norm.ppf(0.5 + level / 2) * float(np.std(samples, ddof=1))
    return float(estimate - half), float(estimate + half)


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
    stratified bootstrap 95% interval of the effect. Above ``BOOT_MAX_N`` patients: DeLong's
    interval for two groups (:func:`delong_interval`), and for more the effect +- 1.96 bootstrap
    standard errors from ``BOOT_SE_RESAMPLES`` resamples. Constant data gives p = NaN.
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
        if n > BOOT_MAX_N and n_boot > 0:
            lo, hi = delong_interval(x, y)
        else:
            lo, hi = _percentile_ci(_boot_rank_biserial(x, y, n_boot, rng))
        return {"test": "mann-whitney", "n": n, "statistic": stat, "p_value": p,
                "effect": "rank-biserial", "effect_size": effect, "ci_low": lo, "ci_high": hi}
    if constant:
        stat, p, effect = float("nan"), float("nan"), 0.0
    else:
        res = stats.kruskal(*groups)
        stat, p = float(res.statistic), float(res.pvalue)
        effect = epsilon_squared(stat, n)
    if n > BOOT_MAX_N and n_boot > 0:
        lo, hi = _normal_ci(effect, _boot_kruskal_h(groups, min(n_boot, BOOT_SE_RESAMPLES), rng) / (n - 1))
        lo, hi = max(0.0, lo), min(1.0, hi)  # epsilon-squared lies in [0, 1]
    else:
        lo, hi = _percentile_ci(_boot_kruskal_h(groups, n_boot, rng) / (n - 1))
    return {"test": "kruskal-wallis", "n": n, "statistic": stat, "p_value": p,
            "effect": "epsilon-squared", "effect_size": effect, "ci_low": lo, "ci_high": hi}


def compare_categories(
    outlier: np.ndarray, category: np.ndarray, *, n_boot: int = 1000, rng: np.random.Generator
) -> dict[str, Any]:
    """Outlier flag vs a categorical value: Fisher exact (2x2), chi-square, or a permutation test.

    Chi-square's p-value is an approximation that needs every expected count to be at least 5;
    a larger table with a smaller expected count gets a permutation test of the same statistic
    (SciPy's ``PermutationMethod``, seeded from ``rng``).
    """
    cats = np.unique(category)
    table = np.array([[np.sum((outlier == o) & (category == c)) for c in cats] for o in (True, False)])
    if table.shape == (2, 2):
        res = stats.fisher_exact(table)
        test, stat, p = "fisher-exact", float(res.statistic), float(res.pvalue)
    elif stats.contingency.expected_freq(table).min() < 5:
        method = stats.PermutationMethod(n_resamples=9999, random_state=int(rng.integers(2**32)))
        res = stats.chi2_contingency(table, correction=False, method=method)
        test, stat, p = "chi-square-permutation", float(res.statistic), float(res.pvalue)
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


def outlier_flags(scores: pl.DataFrame, *, top_fraction: float | None = None,
                  rule: str = "decision") -> pl.DataFrame:
    """``patient_id, outlier`` from anomaly scores.

    ``rule="decision"`` (default): outlier when the mean decision value (``__mean__`` row) is
    negative, scikit-learn's rule; ``rule="union"``: the paper's rule, outlier when any class's
    decision value is negative. When the rule leaves no outlier or no inlier, the top 10% by mean
    score. ``top_fraction`` forces the top-fraction rule (at least one patient).
    """
    if rule not in OUTLIER_RULES:
        raise AuditError(f"unknown outlier rule {rule!r}; choose one of {', '.join(OUTLIER_RULES)}")
    mean = scores.filter(pl.col("target") == MEAN_TARGET).select("patient_id", "score", "decision")
    if mean.height == 0:
        raise AuditError("the anomaly scores have no '__mean__' rows; run `agg2exp anomaly --run RUN` first")
    if top_fraction is None:
        if rule == "decision":
            flagged = mean.select("patient_id", (pl.col("decision") < 0).alias("outlier"))
        else:
            per_class = scores.filter(pl.col("target") != MEAN_TARGET).group_by("patient_id").agg(
                (pl.col("decision") < 0).any().alias("outlier"))
            flagged = mean.select("patient_id").join(per_class, on="patient_id", how="left").with_columns(
                pl.col("outlier").fill_null(False))
        if 0 < int(flagged["outlier"].sum()) < flagged.height:
            return flagged.sort("patient_id")
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


def _importance_matrix(importances: pl.DataFrame | ImportanceMatrix, *, method: str | None, sign: str,
                       stat: str) -> ImportanceMatrix | None:
    if isinstance(importances, ImportanceMatrix):
        return importances
    if importances.height == 0:
        return None
    try:
        return from_long(importances, method=method, sign=sign, stat=stat)
    except SelectionError as exc:
        if "several methods" in str(exc):
            raise AuditError(str(exc).replace("method=/--method", "--method")) from None
        return None


def audit_column(
    patients: pl.DataFrame,
    importances: pl.DataFrame | ImportanceMatrix,
    *,
    column: str,
    scores: pl.DataFrame | None = None,
    top_fraction: float | None = None,
    outlier_rule: str = "decision",
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
    rois: RoIChoice = "parts",
    joined: Mapping[str, Sequence[str]] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> pl.DataFrame:
    """All tests of one metadata column, BH-corrected together, ranked by q-value.

    ``patients`` has ``patient_id`` and metadata columns; ``importances`` is an
    :class:`ImportanceMatrix` or the long format; ``scores`` (optional) are anomaly scores with
    ``__mean__`` rows for the outlier test.
    """
    rng = np.random.default_rng(seed)
    labels = group_labels(patients, column)
    rows: list[dict[str, Any]] = []

    if scores is not None and scores.height:
        flags = outlier_flags(scores, top_fraction=top_fraction, rule=outlier_rule)
        vals = _present(patients.select(pl.col("patient_id").cast(pl.String), column), column).join(
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

    m = _importance_matrix(importances, method=method, sign=sign, stat=stat)
    if m is not None and m.patient_ids:
        try:
            keep = choose_rois(m.rois, rois, joined=joined)
        except RoISetError as exc:
            raise AuditError(str(exc)) from None
        group_of = dict(zip(labels["patient_id"].to_list(), labels["group"].to_list()))
        row_groups = np.array([group_of.get(p) for p in m.patient_ids], dtype=object)
        group_names = sorted(labels["group"].unique().to_list())
        in_group = {g: row_groups == g for g in group_names}
        values = m.filled()
        has_target = m.has_target
        roi_index = {r: i for i, r in enumerate(m.rois)}
        for target in class_order(m.targets):
            ti = m.targets.index(target)
            for roi in keep:
                v = values[:, ti, roi_index[roi]]
                ok = has_target[:, ti] & ~np.isnan(v)
                arrays = [v[ok & in_group[g]] for g in group_names]
                present = [(g, a) for g, a in zip(group_names, arrays) if a.size]
                if len(present) < 2:
                    continue
                res = compare_groups([a for _, a in present], n_boot=n_boot, rng=rng)
                rows.append({"family": "importance", "target": target, "roi": roi,
                             "groups": " vs ".join(g for g, _ in present), **res})

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
    importances: pl.DataFrame | ImportanceMatrix,
    *,
    columns: Sequence[str],
    scores: pl.DataFrame | None = None,
    **kwargs: Any,
) -> pl.DataFrame:
    """Audit several columns (each corrected on its own); ranks restart within each column."""
    if not columns:
        raise AuditError("give at least one metadata column to audit, e.g. --by sex,age")
    m = _importance_matrix(importances, method=kwargs.get("method"), sign=kwargs.get("sign", "abs"),
                           stat=kwargs.get("stat", "mass"))
    source = m if m is not None else importances
    frames = [audit_column(patients, source, column=c, scores=scores, **kwargs) for c in columns]
    return pl.concat(frames)


def audit_run(
    source: Any,
    *,
    run_id: str | None,
    columns: Sequence[str],
    model_id: str | None = None,
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
    rois: RoIChoice = "parts",
    save: bool = True,
    **kwargs: Any,
) -> tuple[str, pl.DataFrame, bool]:
    """Audit a stored run and store the result: ``(audit_id, ranked results, had anomaly scores)``.

    ``source`` is a Store, writable when ``save`` (``save=False`` audits without storing, e.g. on the
    live view of a run still writing); its done patients are audited (their metadata from
    ``done_metadata``, their importances as one matrix from ``importance_wide``), with the run's
    latest anomaly model (or ``model_id``) for the outlier tests. The audit id is a hash of the
    run, the model and the parameters, so re-running the same audit replaces it; the parameters,
    the RoI set and the number of patients without a value in each column are stored with it.
    """
    import hashlib
    import json

    from engine.analytics.anomaly import AnomalyError, _store_matrix, run_context

    if not columns:
        raise AuditError("give the metadata columns to audit, e.g. --by sex,age,site")
    run_id = source.require_run(run_id)
    patients = source.done_metadata(run_id)
    try:
        matrix = _store_matrix(source, run_id, method=method, sign=sign, stat=stat)
    except AnomalyError as exc:
        if "several methods" in str(exc) or "not in the importances" in str(exc):
            raise AuditError(str(exc).replace("method=/--method", "--method")) from None
        matrix = None
    _, joined = run_context(source, run_id)
    scores = source.anomaly_model_scores(run_id, model_id)
    used_model = scores["model_id"][0] if scores.height else None
    empty = pl.DataFrame(schema={"patient_id": pl.String, "method": pl.String, "target": pl.String,
                                 "roi": pl.String, "stat": pl.String, "sign": pl.String, "value": pl.Float64})
    result = audit(patients, matrix if matrix is not None else empty, columns=columns,
                   scores=scores if scores.height else None, method=method, sign=sign, stat=stat, rois=rois,
                   joined=joined, **kwargs)
    params = {"by": list(columns), "method": method, "sign": sign, "stat": stat, "rois": describe(rois),
              **{k: v for k, v in kwargs.items()},
              "missing": {c: missing_count(patients, c) for c in columns}}
    audit_id = "audit-" + hashlib.sha1(json.dumps([run_id, used_model, params], default=str).encode()).hexdigest()[:10]
    if save:
        source.write_audit(audit_id=audit_id, run_id=run_id, results=result, model_id=used_model, params=params)
    return audit_id, result, bool(scores.height)


def recorded_explainer(config: Any) -> Mapping[str, Any] | None:
    """The resolved explainer settings a run's config records (``engine.runtime`` writes them), or
    None for a run without them (an imported CSV)."""
    explainer = config.get("explainer") if isinstance(config, Mapping) else None
    return explainer if isinstance(explainer, Mapping) else None


def precision_note(run_info: Mapping[str, Any]) -> str | None:
    """A note for an audit of a run whose attributions were computed under autocast, else None.

    Measured on the demo cohort (``benchmarks/bf16_cohort.py``): bf16 keeps the RoI masses and the
    anomaly ranking but moves q-values near the threshold, so tests there can change sides.
    """
    autocast = (recorded_explainer(run_info.get("config")) or {}).get("autocast")
    if not autocast:
        return None
    return (f"note: run {run_info.get('run_id')}'s attributions were computed under {autocast} autocast; tests with q "
            "near the threshold can change sides in exact fp32 (7 of 1,450 on the demo cohort, BENCHMARKS.md). "
            "For a published audit, rerun the job without `autocast`.")
