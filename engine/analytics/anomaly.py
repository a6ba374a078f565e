"""Anomaly detection on aggregated attributions (Agg2Exp, Sec. "outliers") and what the model predicted.

:func:`score_run` scores a stored run with any scorer and feature set of :mod:`engine.analytics.scoring`
(default ``DEFAULT_SETTING``, chosen on held-out anomaly kinds) and stores reasons; the paper's mode,
below, is ``scorer="paper"`` / ``settings="paper"``. :func:`rescore` repeats a stored model.

The paper's mode:

For every target class c, each patient is described by the vector of the mass of the
explanation of c inside every RoI (the paper's phi = |.|: sign ``abs``, stat ``mass``). One
isolation forest per class learns what usual explanations look like; a patient whose
explanation puts its mass in unusual places gets a high anomaly score. The per-class scores
are averaged into one score per patient (target ``__mean__``).

The forests take one patients x (target, RoI) matrix (:class:`engine.analytics.matrix.ImportanceMatrix`),
which a store reader pivots in DuckDB, or a long Polars frame; this module never speaks SQL.
Two named settings: ``"engine"`` and ``"paper"`` (the reference notebook's, see ``PAPER_SETTINGS``).
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

from engine.analytics.matrix import ImportanceMatrix, SelectionError, choose_method, from_long, from_wide
from engine.analytics.rois import RoIChoice, RoISetError, choose_rois, class_order, describe, joined_definitions
from engine.errors import UserError
from engine.vocabulary import MEAN_TARGET, PREDICTION_FEATURES

SCORE_COLUMNS = ("score", "raw_score", "decision", "offset")


class AnomalyError(UserError, ValueError):
    """Importances that cannot be scored as asked (no rows, several methods, too few patients)."""


#: The paper's notebook (``tsv2_train_outlier_analysis.ipynb``): ``IsolationForest(random_state=123)``
#: with scikit-learn's other defaults, one forest per class on the masses of all 17 classes in
#: class-id order, Spearman of each class's score against that class's Dice, and the mean score
#: against the mean Dice over all 17 classes (background included).
PAPER_SETTINGS: dict[str, Any] = {"seed": 123, "n_estimators": 100, "contamination": "auto", "rois": "parts",
                                  "dice_classes": "all", "per_class_spearman": True}
ENGINE_SETTINGS: dict[str, Any] = {"seed": 0, "n_estimators": 100, "contamination": "auto", "rois": "parts",
                                   "dice_classes": "foreground", "per_class_spearman": False}
SETTINGS: dict[str, dict[str, Any]] = {"engine": ENGINE_SETTINGS, "paper": PAPER_SETTINGS}


def _matrix(importances: pl.DataFrame | ImportanceMatrix, *, method: str | None, sign: str,
            stat: str) -> ImportanceMatrix:
    if isinstance(importances, ImportanceMatrix):
        if method is not None and importances.method != method:
            raise AnomalyError(f"method {method!r} asked, but the matrix holds {importances.method!r}")
        return importances
    try:
        return from_long(importances, method=method, sign=sign, stat=stat)
    except SelectionError as exc:
        raise AnomalyError(str(exc)) from None


class RoIAnomalyDetector:
    """One scikit-learn IsolationForest per target class on per-patient RoI mass vectors.

    ``fit``/``score`` take an :class:`ImportanceMatrix` (patients x (target, RoI)) or the long
    format. Features are the RoIs of the RoI set ``rois`` (see :mod:`engine.analytics.rois`) in
    class-id order; a missing mass is 0, a missing mean 0 as well (a forest cannot take NaN).

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
        rois: RoIChoice = "parts",
        classes: Sequence[str] | None = None,
        joined: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.n_estimators = n_estimators
        self.contamination = contamination
        self.seed = seed
        self.method = method
        self.sign = sign
        self.stat = stat
        self.rois = rois
        self.classes = classes
        self.joined = joined

    def fit(self, importances: pl.DataFrame | ImportanceMatrix) -> RoIAnomalyDetector:
        """Fit one forest per target class; needs at least two patients per class."""
        m = _matrix(importances, method=self.method, sign=self.sign, stat=self.stat)
        self.method_ = m.method
        try:
            features = choose_rois(m.rois, self.rois, joined=self.joined, classes=self.classes)
        except RoISetError as exc:
            raise AnomalyError(str(exc)) from None
        self.targets_: list[str] = class_order(m.targets, classes=self.classes)
        self.forests_: dict[str, IsolationForest] = {}
        self.features_: dict[str, list[str]] = {}
        self.n_patients_: dict[str, int] = {}
        self.center_: dict[str, np.ndarray] = {}
        self.scale_: dict[str, np.ndarray] = {}
        for target in self.targets_:
            patients, rois, x = m.block(target, features)
            if len(patients) < 2:
                raise AnomalyError(
                    f"class {target!r} has {len(patients)} patient(s); an isolation forest needs at "
                    "least 2 - fit on a larger run (or a reference run with --reference-run)"
                )
            forest = IsolationForest(
                n_estimators=self.n_estimators, contamination=self.contamination, random_state=self.seed
            )
            forest.fit(np.nan_to_num(x, nan=0.0))
            self.forests_[target] = forest
            self.features_[target] = rois
            self.n_patients_[target] = len(patients)
            self.center_[target], self.scale_[target] = robust_location_scale(np.nan_to_num(x, nan=0.0))
        return self

    def score(self, importances: pl.DataFrame | ImportanceMatrix) -> pl.DataFrame:
        """Anomaly scores of every patient for every fitted class they have, plus ``__mean__``."""
        if not hasattr(self, "forests_"):
            raise AnomalyError("the detector is not fitted; call fit() first")
        m = _matrix(importances, method=self.method_, sign=self.sign, stat=self.stat)
        parts = []
        for target in self.targets_:
            if target not in m.targets:
                continue  # nobody in this frame has this class: skip it for them
            patients, _, x = m.block(target, self.features_[target])
            if not patients:
                continue
            x = np.nan_to_num(x, nan=0.0)
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

    def explain(self, importances: pl.DataFrame | ImportanceMatrix, scores: pl.DataFrame | None = None, *,
                top: int = 3) -> pl.DataFrame:
        """Why each patient scores as it does: its ``top`` (target, RoI) features furthest from the fit cohort.

        Each feature gets a robust z-score against the cohort the forests were fitted on,
        ``z = (value - median) / scale`` (see :func:`robust_location_scale`). The candidates are the
        features of the classes whose forest flags the patient (decision < 0), or of all its classes
        when none does; they are ranked by |z|. Returns ``patient_id, rank, target, roi, value,
        median, z, class_score, class_decision``.
        """
        if not hasattr(self, "forests_"):
            raise AnomalyError("the detector is not fitted; call fit() first")
        if scores is None:
            scores = self.score(importances)
        m = _matrix(importances, method=self.method_, sign=self.sign, stat=self.stat)
        per_class = scores.filter(pl.col("target") != MEAN_TARGET).select(
            "patient_id", "target", pl.col("score").alias("class_score"), pl.col("decision").alias("class_decision"))
        parts = []
        for target in self.targets_:
            if target not in m.targets:
                continue
            patients, rois, x = m.block(target, self.features_[target])
            if not patients:
                continue
            x = np.nan_to_num(x, nan=0.0)
            z = robust_z(x, self.center_[target], self.scale_[target])
            k = min(top, len(rois))
            best = np.argsort(-np.abs(z), axis=1, kind="stable")[:, :k]  # per patient, this class's top k
            rows = np.repeat(np.arange(len(patients)), k)
            cols = best.ravel()
            parts.append(pl.DataFrame({
                "patient_id": np.repeat(np.asarray(patients, dtype=object), k).tolist(),
                "target": [target] * rows.size,
                "roi": [rois[c] for c in cols],
                "value": x[rows, cols],
                "median": self.center_[target][cols],
                "z": z[rows, cols],
            }))
        if not parts:
            return pl.DataFrame(schema=REASON_SCHEMA)
        reasons = pl.concat(parts).join(per_class, on=["patient_id", "target"], how="left")
        flagged = reasons.group_by("patient_id").agg((pl.col("class_decision") < 0).any().alias("_any"))
        reasons = reasons.join(flagged, on="patient_id").filter(~pl.col("_any") | (pl.col("class_decision") < 0))
        return (
            reasons.with_columns(pl.col("z").abs().alias("_abs"))
            .sort(["patient_id", "_abs", "target", "roi"], descending=[False, True, False, False])
            .group_by("patient_id", maintain_order=True).head(top)
            .with_columns((pl.col("_abs").cum_count().over("patient_id")).cast(pl.Int64).alias("rank"))
            .select(list(REASON_SCHEMA)).cast(REASON_SCHEMA)  # type: ignore[arg-type]
        )

    def fit_score(self, importances: pl.DataFrame | ImportanceMatrix) -> pl.DataFrame:
        """Fit and score the same patients (the paper's within-run setting)."""
        return self.fit(importances).score(importances)


REASON_SCHEMA: dict[str, Any] = {
    "patient_id": pl.String, "rank": pl.Int64, "target": pl.String, "roi": pl.String, "value": pl.Float64,
    "median": pl.Float64, "z": pl.Float64, "class_score": pl.Float64, "class_decision": pl.Float64,
}
#: |z| is capped here: a feature constant in the fit cohort has no spread to measure against.
Z_CAP = 1e3


def robust_location_scale(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: median and a robust standard deviation, 1.4826 x MAD (normal-consistent).

    Where the MAD is 0 (more than half the cohort shares a value), 1.2533 x the mean absolute
    deviation from the median is used instead (also normal-consistent); 0 when the column is constant.
    """
    center = np.median(x, axis=0)
    scale = stats.median_abs_deviation(x, axis=0, scale="normal")
    mean_ad = 1.2533141373155 * np.mean(np.abs(x - center), axis=0)
    return center, np.where(scale > 0, scale, mean_ad)


def robust_z(x: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(x - center) / scale per column; 0 where x equals a constant column's value, else capped at Z_CAP."""
    diff = x - center
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(scale > 0, diff / np.where(scale > 0, scale, 1.0), np.sign(diff) * Z_CAP)
    return np.clip(z, -Z_CAP, Z_CAP)


def mean_dice(predictions: pl.DataFrame, *, classes: str = "foreground",
              background: str = "background") -> pl.DataFrame:
    """Per patient, the mean Dice over the foreground classes (or ``classes="all"``), nulls ignored."""
    if predictions.height == 0 or "dice" not in predictions.columns:
        return pl.DataFrame(schema={"patient_id": pl.String, "dice": pl.Float64})
    rows = predictions.filter(pl.col("dice").is_not_null())
    if classes == "foreground":
        rows = rows.filter(pl.col("class") != background)
    elif classes != "all":
        raise AnomalyError(f"Dice classes must be 'foreground' or 'all' (got {classes!r})")
    return (rows.group_by(pl.col("patient_id").cast(pl.String)).agg(pl.col("dice").mean()).sort("patient_id"))


def mean_foreground_dice(predictions: pl.DataFrame, *, background: str = "background") -> pl.DataFrame:
    """Per patient, the mean Dice over classes other than background (nulls ignored)."""
    return mean_dice(predictions, classes="foreground", background=background)


def model_id_for(*, run_id: str, fit_run_id: str, method: str, sign: str, stat: str, seed: int,
                 extra: Any = None) -> str:
    """Deterministic model id: the same inputs always name (and replace) the same model."""
    key = json.dumps([run_id, fit_run_id, method, sign, stat, seed] + ([extra] if extra is not None else []),
                     default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return f"iforest-{method}-s{seed}-{digest}"


def _empty_predictions() -> pl.DataFrame:
    return pl.DataFrame(schema={"run_id": pl.String, "patient_id": pl.String, "class": pl.String,
                                "dice": pl.Float64})


def _is_store(source: Any) -> bool:
    return callable(getattr(source, "importance_wide", None))


def _store_matrix(source: Any, run_id: str, *, method: str | None, sign: str, stat: str) -> ImportanceMatrix:
    """The run's matrix of done patients, pivoted by the store (the long table never leaves DuckDB)."""
    method = choose_method(source.importance_methods(run_id), method, error=AnomalyError, what="score")
    wide = source.importance_wide(run_id, method=method, sign=sign, stat=stat)
    if wide.height == 0:
        raise AnomalyError(f"no importances with method={method!r}, sign={sign!r}, stat={stat!r}")
    return from_wide(wide, method=method, sign=sign, stat=stat)


def run_context(source: Any, run_id: str) -> tuple[list[str] | None, dict[str, tuple[str, ...]]]:
    """(class names in channel order, joined RoI definitions) of a stored run, where the store has them."""
    config: Mapping[str, Any] = {}
    if callable(getattr(source, "run_info", None)):
        try:
            config = source.run_info(run_id).get("config") or {}
        except Exception:  # noqa: BLE001 - a run without a config is analysed with the defaults
            config = {}
    names = config.get("class_names") if isinstance(config, Mapping) else None
    return (list(names) if names else None), joined_definitions(config)


def _inputs_of(source: Any, run_id: str, *, method: str | None, sign: str,
               stat: str) -> tuple[ImportanceMatrix, pl.DataFrame]:
    """(matrix of done patients, predictions) of one run from a store or from a mapping of frames."""
    if _is_store(source):
        return _store_matrix(source, run_id, method=method, sign=sign, stat=stat), source.done_predictions(run_id)
    if isinstance(source, Mapping):
        imp = source["importances"]
        pred = source.get("predictions")
        if pred is None:
            pred = _empty_predictions()
        if "run_id" in imp.columns:
            imp = imp.filter(pl.col("run_id") == run_id)
        if "run_id" in pred.columns:
            pred = pred.filter(pl.col("run_id") == run_id)
        return _matrix(imp, method=method, sign=sign, stat=stat), pred
    raise TypeError("source must be a Store or a mapping with 'importances' (and 'predictions') frames")


def score_run(
    source: Any,
    *,
    run_id: str,
    reference_run_id: str | None = None,
    settings: str = "engine",
    scorer: str | None = None,
    feature_set: str | None = None,
    seed: int | None = None,
    n_estimators: int | None = None,
    contamination: float | Literal["auto"] | None = None,
    method: str | None = None,
    sign: str = "abs",
    stat: str = "mass",
    rois: RoIChoice | None = None,
    reasons: int = 3,
) -> tuple[dict[str, Any], pl.DataFrame]:
    """Fit a scorer (on ``run_id`` itself, or on ``reference_run_id``) and score ``run_id``.

    ``scorer`` and ``feature_set`` name a scorer and a feature set of :mod:`engine.analytics.scoring`
    (default :data:`~engine.analytics.scoring.DEFAULT_SETTING`: one k-NN per block of features - RoI
    masses, what the model predicted, the input over each predicted class - chosen on held-out
    anomaly kinds). ``settings="paper"`` (or ``scorer="paper"``) is
    the paper's mode: one isolation forest per class on RoI masses (:class:`RoIAnomalyDetector`);
    with ``settings="paper"`` the reference notebook's seed 123, Dice over all classes and per-class
    Spearman, with ``"engine"`` seed 0 and Dice over the foreground. ``seed``, ``n_estimators``,
    ``contamination`` and ``rois`` override single settings (the last three for forests).
    ``source`` is a Store (its done patients are read as one patients x features matrix pivoted by
    DuckDB) or a mapping ``{"importances": frame, "predictions": frame}`` holding a ``run_id`` column.

    Returns ``(model, scores)`` ready for ``Store.write_anomaly(model=model, scores=scores)``.
    ``scores`` holds a ``__mean__`` row per patient (the scorer's anomaly score, higher = more
    anomalous) and one row per class: the class forest's score in the paper's mode, else the
    root-mean-square robust z of the class's features (:meth:`RobustProfile.class_scores`).
    The model records everything :func:`rescore` needs (scorer, feature set, parameters, features,
    excluded RoIs, seed, fit run), the Spearman correlation between the mean score and the patient's
    mean Dice, and ``model["reasons"]``: each patient's ``reasons`` top features by robust z-score
    (``Store.write_anomaly_reasons``).
    """
    from engine.analytics import scoring

    if settings not in SETTINGS:
        raise AnomalyError(f"unknown anomaly settings {settings!r}; choose one of {', '.join(SETTINGS)}")
    if scorer is None:
        scorer = "paper" if settings == "paper" else scoring.DEFAULT_SETTING[0]
    if feature_set is None:
        feature_set = "mass" if scorer == "paper" else scoring.DEFAULT_SETTING[1]
    if scorer not in scoring.SCORERS:
        raise AnomalyError(f"unknown scorer {scorer!r}; {_did_you_mean(scorer, scoring.SCORERS)}")
    if feature_set not in scoring.FEATURE_SETS:
        raise AnomalyError(f"unknown feature set {feature_set!r}; {_did_you_mean(feature_set, scoring.FEATURE_SETS)}")
    if scorer == "paper" and feature_set != "mass":
        raise AnomalyError(f"the paper's per-class forests score RoI masses only; use feature_set 'mass' "
                           f"(got {feature_set!r}) or another scorer")
    chosen = dict(SETTINGS[settings])
    for key, value in (("seed", seed), ("n_estimators", n_estimators), ("contamination", contamination),
                       ("rois", rois)):
        if value is not None:
            chosen[key] = value
    if scorer == "paper":
        return _score_run_forests(source, run_id=run_id, reference_run_id=reference_run_id, settings=settings,
                                  chosen=chosen, method=method, sign=sign, stat=stat, reasons=reasons)
    return _score_run_features(source, run_id=run_id, reference_run_id=reference_run_id, settings=settings,
                               chosen=chosen, scorer=scorer, feature_set=feature_set, method=method,
                               reasons=reasons)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"choose one of {', '.join(choices)}"


def _score_run_forests(source: Any, *, run_id: str, reference_run_id: str | None, settings: str,
                       chosen: dict[str, Any], method: str | None, sign: str, stat: str,
                       reasons: int) -> tuple[dict[str, Any], pl.DataFrame]:
    """The paper's mode: one isolation forest per class on the (target, RoI) values of ``stat``/``sign``."""
    classes, joined = run_context(source, run_id)
    imp, pred = _inputs_of(source, run_id, method=method, sign=sign, stat=stat)
    fit_run_id = reference_run_id or run_id
    fit_imp = imp if fit_run_id == run_id else _inputs_of(source, fit_run_id, method=imp.method, sign=sign,
                                                          stat=stat)[0]
    detector = RoIAnomalyDetector(
        n_estimators=chosen["n_estimators"], contamination=chosen["contamination"], seed=chosen["seed"],
        method=imp.method, sign=sign, stat=stat, rois=chosen["rois"], classes=classes, joined=joined,
    ).fit(fit_imp)
    scores = detector.score(imp).with_columns(pl.lit(run_id).alias("run_id")).select(
        "run_id", "patient_id", "target", *SCORE_COLUMNS
    )
    rho, p_value, n_dice = spearman_with_dice(scores, pred, classes=chosen["dice_classes"])
    params: dict[str, Any] = {
        "settings": settings, "scorer": "paper", "feature_set": "mass",
        "n_estimators": chosen["n_estimators"], "contamination": chosen["contamination"],
        "stat": stat, "rois": describe(chosen["rois"]), "dice_classes": chosen["dice_classes"],
        "n_patients_fit": detector.n_patients_, "n_dice": n_dice,
    }
    if chosen["per_class_spearman"]:
        params["spearman_per_class"] = per_class_spearman(scores, pred)
    model = {
        "model_id": model_id_for(run_id=run_id, fit_run_id=fit_run_id, method=detector.method_, sign=sign,
                                 stat=stat, seed=chosen["seed"],
                                 extra=None if (settings, chosen["rois"]) == ("engine", "parts")
                                 else [settings, describe(chosen["rois"]), chosen["n_estimators"]]),
        "run_id": run_id,
        "fit_run_id": fit_run_id,
        "mode": "within-run" if fit_run_id == run_id else "reference",
        "method": detector.method_,
        "sign": sign,
        "seed": chosen["seed"],
        "scorer": "paper",
        "feature_set": "mass",
        "params": params,
        "features": detector.features_,
        "spearman_dice": rho,
        "spearman_p": p_value,
    }
    if reasons > 0:
        kind = f"{stat}_{sign}"
        model["reasons"] = detector.explain(imp, scores, top=reasons).with_columns(
            (pl.lit(kind + "|") + pl.col("target") + "|" + pl.col("roi")).alias("feature"),
            pl.lit(kind).alias("kind"))
    return model, scores


def _resolve_method(source: Any, run_id: str, method: str | None) -> str:
    if _is_store(source):
        methods = source.importance_methods(run_id)
    else:
        imp = source["importances"]
        if "run_id" in imp.columns:
            imp = imp.filter(pl.col("run_id") == run_id)
        methods = sorted(imp["method"].unique().to_list()) if "method" in imp.columns else ["any"]
    if not methods:
        raise AnomalyError("no importances to score; the run holds no importance rows for done patients yet")
    if method is None:
        if len(methods) != 1:
            raise AnomalyError(f"the importances hold several methods {methods}; choose one with method=/--method")
        return str(methods[0])
    if method not in methods:
        raise AnomalyError(f"method {method!r} not in the importances; available: {methods}")
    return method


def feature_frame_of(source: Any, run_id: str, *, feature_set: str, method: str,
                     exclude_rois: Sequence[str] = ()) -> pl.DataFrame:
    """Done patients x the features of ``feature_set`` (names as :mod:`engine.analytics.scoring` spells them).

    From a Store the frame is pivoted by DuckDB (``importance_wide`` per kind and ``prediction_wide``);
    from a mapping of long frames by :func:`engine.analytics.scoring.feature_frame`.
    """
    from engine.analytics import scoring

    kinds = scoring.FEATURE_SETS[feature_set]
    from_predictions = {kind for _, kind in PREDICTION_FEATURES}  # kinds of the predictions table
    excluded = set(exclude_rois)
    if _is_store(source):
        sep = source.FEATURE_SEP
        frame: pl.DataFrame | None = None
        for kind in kinds:
            if kind in from_predictions:
                continue
            stat, sign = kind.split("_", 1)
            wide = source.importance_wide(run_id, method=method, sign=sign, stat=stat)
            keep = [c for c in wide.columns if c != "patient_id" and c.split(sep, 1)[1] not in excluded]
            wide = wide.select("patient_id", *[pl.col(c).alias(f"{kind}|{c.replace(sep, '|')}") for c in keep])
            frame = wide if frame is None else frame.join(wide, on="patient_id", how="full", coalesce=True)
        if from_predictions & set(kinds):
            pred = source.prediction_wide(run_id)
            pred = pred.select("patient_id", *[c for c in pred.columns if c.split("|", 1)[0] in kinds])
            frame = pred if frame is None else frame.join(pred, on="patient_id", how="full", coalesce=True)
        assert frame is not None
        return _computed(frame).sort("patient_id")
    imp = source["importances"]
    pred = source.get("predictions")
    if "run_id" in imp.columns:
        imp = imp.filter(pl.col("run_id") == run_id)
    if "method" in imp.columns:
        imp = imp.filter(pl.col("method") == method)
    if pred is not None and "run_id" in pred.columns:
        pred = pred.filter(pl.col("run_id") == run_id)
    wide = scoring.feature_frame(imp, pred, exclude_rois=sorted(excluded))
    return _computed(wide.select("patient_id", *scoring.feature_columns(wide.columns, feature_set)))


def _computed(frame: pl.DataFrame) -> pl.DataFrame:
    """Without the feature columns null for every patient: not computed for this run (a store
    written by an engine before that feature existed), so not evidence about anyone."""
    if frame.height == 0:
        return frame
    counts = frame.null_count().row(0, named=True)
    return frame.select([c for c in frame.columns if c == "patient_id" or counts[c] < frame.height])


def _aligned(frame: pl.DataFrame, features: Sequence[str]) -> np.ndarray:
    """The frame's values of ``features`` in that order; a feature the frame lacks, or a null, is 0."""
    missing = [pl.lit(0.0).alias(f) for f in features if f not in frame.columns]
    x = frame.with_columns(missing).select(list(features)).fill_null(0.0).to_numpy().astype(np.float64)
    return np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def _json_params(estimator: Any) -> dict[str, Any]:
    """The scorer's own parameters (``get_params(deep=False)``) that JSON holds as they are."""
    return {k: v for k, v in estimator.get_params(deep=False).items()
            if v is None or isinstance(v, (bool, int, float, str))}


def build_scorer(name: str, *, seed: int, params: Mapping[str, Any] | None = None) -> Any:
    """A scorer by name with ``seed`` and then ``params`` (as :func:`_json_params` recorded them) set."""
    from engine.analytics import scoring

    est = scoring.make_scorer(name, seed=seed)
    own = est.get_params(deep=False)
    return est.set_params(**{k: v for k, v in dict(params or {}).items() if k in own})


def _score_run_features(source: Any, *, run_id: str, reference_run_id: str | None, settings: str,
                        chosen: dict[str, Any], scorer: str, feature_set: str, method: str | None,
                        reasons: int, features: Sequence[str] | None = None,
                        scorer_params: Mapping[str, Any] | None = None) -> tuple[dict[str, Any], pl.DataFrame]:
    """Any scorer of :mod:`engine.analytics.scoring` on one feature set; reasons from a :class:`RobustProfile`."""
    from engine.analytics import scoring

    _, joined = run_context(source, run_id)
    method = _resolve_method(source, run_id, method)
    if chosen["rois"] == "parts":  # a joined RoI would count its parts twice
        exclude = sorted(joined)
    elif chosen["rois"] == "joined":
        exclude = sorted({part for parts in joined.values() for part in parts})
    else:
        raise AnomalyError("an explicit RoI list is supported by the paper's per-class forests only; "
                           "use scorer 'paper' or rois 'parts'/'joined'")
    frame = feature_frame_of(source, run_id, feature_set=feature_set, method=method, exclude_rois=exclude)
    fit_run_id = reference_run_id or run_id
    fit_frame = frame if fit_run_id == run_id else feature_frame_of(
        source, fit_run_id, feature_set=feature_set, method=method, exclude_rois=exclude)
    if features is None:
        features = scoring.feature_columns(fit_frame.columns, feature_set)
    features = list(features)
    if not features or frame.height == 0:
        raise AnomalyError(f"no features of the set {feature_set!r} for done patients of run {fit_run_id!r}; "
                           "choose a feature set the run holds (an imported run has masses only: 'mass')")
    if scorer_params is None:
        scorer_params = {k: chosen[k] for k in ("n_estimators",) if k in chosen}
    est = build_scorer(scorer, seed=chosen["seed"], params=scorer_params)
    if "feature_names" in est.get_params(deep=False):  # scorers that group features by name
        est.set_params(feature_names=list(features))
    x_fit, x = _aligned(fit_frame, features), _aligned(frame, features)
    try:
        est.fit(x_fit)
        profile = scoring.RobustProfile(feature_names=features).fit(x_fit)
    except scoring.ScoringError as exc:
        raise AnomalyError(str(exc)) from None
    raw = est.score_samples(x)
    patients = frame["patient_id"].cast(pl.String).to_list()
    per_class = profile.class_scores(x)
    class_rows = [(pid, r.target, r.score) for pid, rs in zip(patients, per_class) for r in rs]
    none = pl.lit(None, dtype=pl.Float64)
    per = pl.DataFrame(class_rows, schema={"patient_id": pl.String, "target": pl.String, "score": pl.Float64},
                       orient="row")
    mean = pl.DataFrame({"patient_id": patients, "target": [MEAN_TARGET] * len(patients), "score": -raw,
                         "raw_score": raw})
    scores = pl.concat([
        per.with_columns(none.alias("raw_score")),
        mean,
    ]).with_columns(none.alias("decision"), none.alias("offset"), pl.lit(run_id).alias("run_id")).select(
        "run_id", "patient_id", "target", *SCORE_COLUMNS).sort("target", "patient_id")
    pred = source.done_predictions(run_id) if _is_store(source) else _inputs_of(
        source, run_id, method=method, sign="abs", stat="mass")[1]
    rho, p_value, n_dice = spearman_with_dice(scores, pred, classes=chosen["dice_classes"])
    own = _json_params(est)
    params: dict[str, Any] = {
        "settings": settings, "scorer": scorer, "feature_set": feature_set, "scorer_params": own,
        "exclude_rois": exclude, "rois": describe(chosen["rois"]), "dice_classes": chosen["dice_classes"],
        "n_patients_fit": int(x_fit.shape[0]), "n_dice": n_dice,
    }
    if chosen["per_class_spearman"]:
        params["spearman_per_class"] = per_class_spearman(scores, pred)
    key = json.dumps([run_id, fit_run_id, method, scorer, feature_set, chosen["seed"], own, exclude, features],
                     default=str)
    model: dict[str, Any] = {
        "model_id": f"{scorer}-{feature_set}-{method}-s{chosen['seed']}-{hashlib.sha1(key.encode()).hexdigest()[:10]}",
        "run_id": run_id,
        "fit_run_id": fit_run_id,
        "mode": "within-run" if fit_run_id == run_id else "reference",
        "method": method,
        "sign": "abs",
        "seed": chosen["seed"],
        "scorer": scorer,
        "feature_set": feature_set,
        "params": params,
        "features": features,
        "spearman_dice": rho,
        "spearman_p": p_value,
    }
    if reasons > 0:
        class_score = {(pid, r.target): r.score for pid, rs in zip(patients, per_class) for r in rs}
        rows = [
            (pid, rank, r.target, r.roi, r.value, r.median, r.z, class_score.get((pid, r.target)), None, r.feature,
             r.feature.split("|", 1)[0])
            for pid, rs in zip(patients, profile.reasons(x, top_k=reasons)) for rank, r in enumerate(rs, start=1)
        ]
        model["reasons"] = pl.DataFrame(rows, schema={**REASON_SCHEMA, "feature": pl.String, "kind": pl.String},
                                        orient="row")
    return model, scores


def rescore(source: Any, model: Mapping[str, Any], *, run_id: str | None = None) -> tuple[dict[str, Any], pl.DataFrame]:
    """Score ``run_id`` (default the model's own run) again from a stored model row (``Store.anomaly_model``).

    The scorer is rebuilt from the row's scorer, parameters and seed, refitted on the row's fit run
    with the row's features and excluded RoIs: on unchanged runs the scores are the stored ones.
    """
    params = model.get("params") or {}
    if isinstance(params, str):
        params = json.loads(params)
    features = model.get("features")
    if isinstance(features, str):
        features = json.loads(features)
    settings = params.get("settings", "engine")
    scorer = model.get("scorer") or params.get("scorer") or "paper"
    target_run = run_id or str(model["run_id"])
    reference = None if model["fit_run_id"] == target_run else str(model["fit_run_id"])
    chosen = dict(SETTINGS[settings])
    chosen["seed"] = model.get("seed", chosen["seed"])
    if scorer == "paper":
        rois = "joined" if params.get("rois") == "joined" else chosen["rois"]
        return score_run(source, run_id=target_run, reference_run_id=reference, settings=settings, scorer="paper",
                         seed=chosen["seed"], n_estimators=params.get("n_estimators"),
                         contamination=params.get("contamination"), method=model.get("method"),
                         sign=model.get("sign") or "abs", stat=params.get("stat", "mass"), rois=rois)
    return _score_run_features(source, run_id=target_run, reference_run_id=reference, settings=settings,
                               chosen=chosen, scorer=scorer,
                               feature_set=model.get("feature_set") or params["feature_set"],
                               method=model.get("method"), reasons=3, features=features,
                               scorer_params=params.get("scorer_params"))


_PRED_WORDS = {"pred_voxels": "predicted volume", "pred_confidence": "prediction confidence",
               "pred_entropy": "prediction entropy", "input_mean": "input intensity",
               "input_std": "input intensity spread", "input_local": "input local contrast"}


def reason_text(reason: Mapping[str, Any]) -> str:
    """One stored reason in words: ``heart in trachea (z +4.2)``, ``liver prediction entropy (z +3.0)``.

    RoI importances other than ``mass_abs`` name their kind: ``heart in aorta [mass_pos] (z -2.5)``.
    The same text as the ``top_anomalies`` query.
    """
    kind = reason.get("kind") or "mass_abs"
    z = f"(z {reason['z']:+.1f})" if reason.get("z") is not None else ""
    if kind in _PRED_WORDS:
        return f"{reason['target']} {_PRED_WORDS[kind]} {z}".strip()
    tag = "" if kind == "mass_abs" else f" [{kind}]"
    return f"{reason['target']} in {reason['roi']}{tag} {z}".strip()


def reasons_by_patient(reasons: pl.DataFrame | None) -> dict[str, str]:
    """patient id -> its reasons in rank order, as :func:`reason_text` words joined by ``", "``."""
    if reasons is None or reasons.height == 0:
        return {}
    out: dict[str, list[str]] = {}
    for r in reasons.sort("patient_id", "rank").iter_rows(named=True):
        out.setdefault(str(r["patient_id"]), []).append(reason_text(r))
    return {k: ", ".join(v) for k, v in out.items()}


def top_reason_target(reasons: pl.DataFrame, patient_id: str, *, classes: Sequence[str] | None = None) -> str | None:
    """The class behind a patient's top-ranked reason that has a map (one of ``classes``, not background)."""
    rows = reasons.filter(pl.col("patient_id") == patient_id).sort("rank")
    for target in rows["target"].to_list():
        if target != "background" and (classes is None or target in classes):
            return str(target)
    return None


def spearman_with_dice(scores: pl.DataFrame, predictions: pl.DataFrame, *,
                       classes: str = "foreground") -> tuple[float | None, float | None, int]:
    """Spearman rho (and p) of the mean anomaly score against the mean Dice, and n used."""
    mean = scores.filter(pl.col("target") == MEAN_TARGET).select("patient_id", "score")
    joined = mean.join(mean_dice(predictions, classes=classes), on="patient_id", how="inner")
    return _spearman(joined["score"].to_numpy(), joined["dice"].to_numpy())


def _spearman(score: np.ndarray, dice: np.ndarray) -> tuple[float | None, float | None, int]:
    if score.size < 3 or np.unique(dice).size < 2 or np.unique(score).size < 2:
        return None, None, int(score.size)
    res = stats.spearmanr(score, dice)
    return float(res.statistic), float(res.pvalue), int(score.size)


def per_class_spearman(scores: pl.DataFrame, predictions: pl.DataFrame) -> dict[str, dict[str, Any]]:
    """Per class: Spearman of the class's anomaly score (higher = more anomalous) against its own Dice.

    The paper's notebook correlates Dice with ``decision_function``, which is minus the score
    plus a constant per class, so its rho is minus this one and its p-value the same.
    """
    if predictions.height == 0 or "dice" not in predictions.columns:
        return {}
    dice = predictions.select(pl.col("patient_id").cast(pl.String), pl.col("class").alias("target"), "dice")
    joined = scores.filter(pl.col("target") != MEAN_TARGET).join(dice, on=["patient_id", "target"], how="inner")
    joined = joined.filter(pl.col("dice").is_not_null())
    out: dict[str, dict[str, Any]] = {}
    for (target,), part in joined.group_by(["target"], maintain_order=True):
        rho, p, n = _spearman(part["score"].to_numpy(), part["dice"].to_numpy())
        out[str(target)] = {"rho": rho, "p": p, "n": n}
    return out
