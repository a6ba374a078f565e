"""RoI-level anomaly detection on aggregated attributions (Agg2Exp, Sec. "outliers").

For every target class c, each patient is described by the vector of the mass of the
explanation of c inside every RoI (the paper's phi = |.|: sign ``abs``, stat ``mass``). One
isolation forest per class learns what usual explanations look like; a patient whose
explanation puts its mass in unusual places gets a high anomaly score. The per-class scores
are averaged into one score per patient (target ``__mean__``).

This module works on Polars frames only; the store and the CLI feed it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import polars as pl
from scipy import stats
from sklearn.ensemble import IsolationForest

from engine.errors import UserError

MEAN_TARGET = "__mean__"
SCORE_COLUMNS = ("score", "raw_score", "decision", "offset")


class AnomalyError(UserError, ValueError):
    """Importances that cannot be scored as asked (no rows, several methods, too few patients)."""


def _select(importances: pl.DataFrame, *, method: str | None, sign: str, stat: str) -> tuple[pl.DataFrame, str]:
    """Rows of one (method, sign, stat); the method is inferred when the frame holds only one."""
    if importances.height == 0:
        raise AnomalyError("no importances to score; the run holds no importance rows yet")
    methods = sorted(importances["method"].unique().to_list())
    if method is None:
        if len(methods) != 1:
            raise AnomalyError(f"the importances hold several methods {methods}; choose one with method=/--method")
        method = methods[0]
    elif method not in methods:
        raise AnomalyError(f"method {method!r} not in the importances; available: {methods}")
    df = importances.filter(
        (pl.col("method") == method) & (pl.col("sign") == sign) & (pl.col("stat") == stat)
    )
    if df.height == 0:
        raise AnomalyError(f"no importances with method={method!r}, sign={sign!r}, stat={stat!r}")
    return df, method


def mass_matrix(
    importances: pl.DataFrame, *, target: str, rois: Sequence[str] | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """Patients x RoIs matrix of one target (already filtered to one method/sign/stat).

    Patients without any row for ``target`` are left out; missing RoIs or null values are 0,
    since an RoI the aggregation did not report received no attribution mass.
    """
    df = importances.filter(pl.col("target") == target)
    wide = df.pivot(on="roi", index="patient_id", values="value", aggregate_function="mean").sort("patient_id")
    if rois is None:
        rois = sorted(c for c in wide.columns if c != "patient_id")
    rois = list(rois)
    for roi in rois:
        if roi not in wide.columns:
            wide = wide.with_columns(pl.lit(0.0).alias(roi))
    x = wide.select(rois).fill_null(0.0).to_numpy().astype(np.float64) if rois else np.zeros((wide.height, 0))
    x = np.nan_to_num(x, nan=0.0)
    return wide["patient_id"].cast(pl.String).to_list(), rois, x


class RoIAnomalyDetector:
    """One scikit-learn IsolationForest per target class on per-patient RoI mass vectors.

    ``score`` returns ``patient_id, target, score, raw_score, decision, offset`` where
    ``score = -score_samples`` (higher is more anomalous), ``raw_score = score_samples``,
    ``decision = decision_function`` (negative for outliers) and ``offset = offset_``, plus rows
    with target ``__mean__`` holding each column's mean over the patient's classes.
    """

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        contamination: float | Literal["auto"] = "auto",
        seed: int = 0,
        method: str | None = None,
        sign: str = "abs",
        stat: str = "mass",
    ) -> None:
        self.n_estimators = n_estimators
        self.contamination = contamination
        self.seed = seed
        self.method = method
        self.sign = sign
        self.stat = stat

    def fit(self, importances: pl.DataFrame) -> RoIAnomalyDetector:
        """Fit one forest per target class; needs at least two patients per class."""
        df, self.method_ = _select(importances, method=self.method, sign=self.sign, stat=self.stat)
        self.targets_: list[str] = sorted(df["target"].unique().to_list())
        self.forests_: dict[str, IsolationForest] = {}
        self.features_: dict[str, list[str]] = {}
        self.n_patients_: dict[str, int] = {}
        for target in self.targets_:
            patients, rois, x = mass_matrix(df, target=target)
            if len(patients) < 2:
                raise AnomalyError(
                    f"class {target!r} has {len(patients)} patient(s); an isolation forest needs at "
                    "least 2 - fit on a larger run (or a reference run with --reference-run)"
                )
            forest = IsolationForest(
                n_estimators=self.n_estimators, contamination=self.contamination, random_state=self.seed
            )
            forest.fit(x)
            self.forests_[target] = forest
            self.features_[target] = rois
            self.n_patients_[target] = len(patients)
        return self

    def score(self, importances: pl.DataFrame) -> pl.DataFrame:
        """Anomaly scores of every patient for every fitted class they have, plus ``__mean__``."""
        if not hasattr(self, "forests_"):
            raise AnomalyError("the detector is not fitted; call fit() first")
        df, _ = _select(importances, method=self.method_, sign=self.sign, stat=self.stat)
        parts = []
        for target in self.targets_:
            patients, _, x = mass_matrix(df, target=target, rois=self.features_[target])
            if not patients:
                continue  # nobody in this frame has this class: skip it for them
            forest = self.forests_[target]
            raw = forest.score_samples(x)
            parts.append(pl.DataFrame({
                "patient_id": patients,
                "target": [target] * len(patients),
                "score": -raw,
                "raw_score": raw,
                "decision": forest.decision_function(x),
                "offset": np.full(len(patients), float(forest.offset_)),
            }))
        if not parts:
            raise AnomalyError("none of the fitted classes appear in the importances to score")
        per_class = pl.concat(parts)
        mean = (
            per_class.group_by("patient_id")
            .agg([pl.col(c).mean() for c in SCORE_COLUMNS])
            .with_columns(pl.lit(MEAN_TARGET).alias("target"))
            .select(per_class.columns)
        )
        return pl.concat([per_class, mean]).sort("target", "patient_id")

    def fit_score(self, importances: pl.DataFrame) -> pl.DataFrame:
        """Fit and score the same patients (the paper's within-run setting)."""
        return self.fit(importances).score(importances)


def mean_foreground_dice(predictions: pl.DataFrame, *, background: str = "background") -> pl.DataFrame:
    """Per patient, the mean Dice over classes other than background (nulls ignored)."""
    if predictions.height == 0 or "dice" not in predictions.columns:
        return pl.DataFrame(schema={"patient_id": pl.String, "dice": pl.Float64})
    return (
        predictions.filter((pl.col("class") != background) & pl.col("dice").is_not_null())
        .group_by("patient_id")
        .agg(pl.col("dice").mean())
        .sort("patient_id")
    )


def model_id_for(*, run_id: str, fit_run_id: str, method: str, sign: str, stat: str, seed: int) -> str:
    """Deterministic model id: the same inputs always name (and replace) the same model."""
    key = json.dumps([run_id, fit_run_id, method, sign, stat, seed])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"iforest-{method}-s{seed}-{digest}"


def _frames_of(source: Any, run_id: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(importances, predictions) of one run from a Store or from a mapping of frames."""
    if hasattr(source, "importances") and callable(source.importances):
        return source.importances(run_id), source.predictions(run_id)
    if isinstance(source, Mapping):
        imp = source["importances"]
        pred = source.get("predictions")
        if pred is None:
            pred = pl.DataFrame(schema={"run_id": pl.String, "patient_id": pl.String, "class": pl.String,
                                        "dice": pl.Float64})
        if "run_id" in imp.columns:
            imp = imp.filter(pl.col("run_id") == run_id)
        if "run_id" in pred.columns:
            pred = pred.filter(pl.col("run_id") == run_id)
        return imp, pred
    raise TypeError("source must be a Store or a mapping with 'importances' (and 'predictions') frames")


def score_run(
    source: Any,
    *,
    run_id: str,
    reference_run_id: str | None = None,
    seed: int = 0,
    n_estimators: int = 100,
    contamination: float | Literal["auto"] = "auto",
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
) -> tuple[dict[str, Any], pl.DataFrame]:
    """Fit forests (on ``run_id`` itself, or on ``reference_run_id``) and score ``run_id``.

    ``source`` is a Store (anything with ``importances(run_id)`` and ``predictions(run_id)``) or a
    mapping ``{"importances": frame, "predictions": frame}`` holding a ``run_id`` column.
    Returns ``(model, scores)`` ready for ``Store.write_anomaly(model=model, scores=scores)``;
    the model records the Spearman correlation between the mean score and the patient's mean
    foreground Dice (the paper checks that anomalous explanations go with worse segmentations).
    """
    imp, pred = _frames_of(source, run_id)
    fit_run_id = reference_run_id or run_id
    fit_imp = imp if fit_run_id == run_id else _frames_of(source, fit_run_id)[0]
    detector = RoIAnomalyDetector(
        n_estimators=n_estimators, contamination=contamination, seed=seed, method=method, sign=sign, stat=stat
    ).fit(fit_imp)
    scores = detector.score(imp).with_columns(pl.lit(run_id).alias("run_id")).select(
        "run_id", "patient_id", "target", *SCORE_COLUMNS
    )
    rho, p_value, n_dice = spearman_with_dice(scores, pred)
    model = {
        "model_id": model_id_for(run_id=run_id, fit_run_id=fit_run_id, method=detector.method_, sign=sign,
                                 stat=stat, seed=seed),
        "run_id": run_id,
        "fit_run_id": fit_run_id,
        "mode": "within-run" if fit_run_id == run_id else "reference",
        "method": detector.method_,
        "sign": sign,
        "seed": seed,
        "params": {"n_estimators": n_estimators, "contamination": contamination, "stat": stat,
                   "n_patients_fit": detector.n_patients_, "n_dice": n_dice},
        "features": detector.features_,
        "spearman_dice": rho,
        "spearman_p": p_value,
    }
    return model, scores


def spearman_with_dice(scores: pl.DataFrame, predictions: pl.DataFrame) -> tuple[float | None, float | None, int]:
    """Spearman rho (and p) of the mean anomaly score against mean foreground Dice, and n used."""
    mean = scores.filter(pl.col("target") == MEAN_TARGET).select("patient_id", "score")
    joined = mean.join(mean_foreground_dice(predictions), on="patient_id", how="inner")
    if joined.height < 3 or joined["dice"].n_unique() < 2 or joined["score"].n_unique() < 2:
        return None, None, joined.height
    res = stats.spearmanr(joined["score"].to_numpy(), joined["dice"].to_numpy())
    return float(res.statistic), float(res.pvalue), joined.height
