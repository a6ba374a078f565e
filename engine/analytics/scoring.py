"""Anomaly scorers and feature sets on a patients x features matrix, and the reasons behind a score.

Features are named ``<kind>|<target>|<roi>`` for RoI importances (``kind`` = ``<stat>_<sign>``, e.g.
``mass_abs|heart|aorta``: the share of the explanation of ``heart`` inside the ``aorta`` RoI) and
``pred_<what>|<class>`` for what the model predicted, which needs no ground truth: ``pred_voxels``
(predicted volume), ``pred_confidence`` (mean softmax maximum over the class's predicted voxels) and
``pred_entropy`` (mean softmax entropy there). :func:`feature_frame` builds that wide frame from the
engine's long ``importances`` and ``predictions`` frames; the store's ``predictions`` table holds all
three (the pipeline computes confidence and entropy from the clean stitched logits), and
``engine.analytics.anomaly.score_run`` reads them pivoted by DuckDB.

Feature sets (:data:`FEATURE_SETS`): ``mass`` (the paper's |attribution| masses), ``signed_mass``
(positive and negative masses), ``mean`` (mean |attribution| per RoI voxel), ``prediction`` (the three
model-prediction features), ``input`` (mean and standard deviation of the model's input over each
predicted class: what an acquisition fault does to a structure) and their unions ``mass+prediction``,
``prediction+input`` and ``mass+prediction+input``. Missing values are 0: an RoI with no voxels has
mass 0, and a class the model did not predict has volume, confidence and entropy 0.

Scorers follow scikit-learn's outlier estimators: parameters in ``__init__``, ``fit(X)`` returns
``self``, ``score_samples(X)`` is higher for more normal patients, and :meth:`anomaly_score` is its
negative (higher = more anomalous). All work is scikit-learn's or SciPy's:

* :class:`PerClassForestScorer` - the paper's mode, one isolation forest per target class on that
  class's RoI masses, averaged (``engine.analytics.anomaly.RoIAnomalyDetector``, used as is);
* :class:`ForestScorer` - one ``IsolationForest`` on all features;
* :class:`CovarianceScorer` - robust Mahalanobis distance (``MinCovDet``) on the leading principal
  components of robustly standardised features;
* :class:`NeighbourScorer` - mean distance to the k nearest patients of the fit cohort
  (``NearestNeighbors``) on robustly standardised features;
* :class:`RankEnsemble` - the mean, over member scorers, of each patient's percentile among the fit
  cohort's scores of that member (``scipy.stats.percentileofscore``).

Robust standardisation is ``RobustScaler`` (median, interquartile range), clipped to +-10 so that one extreme
feature cannot decide alone. Reasons (:class:`RobustProfile`): robust z-scores of a patient's features
against the fit cohort, z = (x - median) / (1.4826 MAD) (``scipy.stats.median_abs_deviation``, with the
standard deviation, then 1, when the MAD is 0), per-class scores as the root-mean-square z over a
class's features, and the top reasons as small dataclasses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
from scipy import stats
from sklearn.base import BaseEstimator, OutlierMixin, clone
from sklearn.covariance import MinCovDet
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, RobustScaler

from engine.errors import UserError
from engine.vocabulary import PREDICTION_FEATURES

__all__ = [
    "DEFAULT_SETTING",
    "FEATURE_SETS",
    "SCORERS",
    "ClassReason",
    "CovarianceScorer",
    "FeatureReason",
    "ForestScorer",
    "NeighbourScorer",
    "PerClassForestScorer",
    "RankEnsemble",
    "BlockEnsemble",
    "RobustProfile",
    "ScoringError",
    "feature_columns",
    "feature_frame",
    "feature_matrix",
    "feature_target",
    "make_scorer",
]

PRED_KINDS = ("pred_voxels", "pred_confidence", "pred_entropy")
#: Per predicted class: mean and standard deviation of the model's input over its voxels (its level),
#: and the 99.9th percentile of the input's local contrast there (its detail: small things a mean hides).
INPUT_LEVEL_KINDS = ("input_mean", "input_std")
INPUT_DETAIL_KINDS = ("input_local",)
INPUT_KINDS = (*INPUT_LEVEL_KINDS, *INPUT_DETAIL_KINDS)
#: Feature set name -> feature kinds (the part of a feature name before the first ``|``).
FEATURE_SETS: dict[str, tuple[str, ...]] = {
    "mass": ("mass_abs",),
    "signed_mass": ("mass_pos", "mass_neg"),
    "mean": ("mean_abs",),
    "prediction": PRED_KINDS,
    "mass+prediction": ("mass_abs", *PRED_KINDS),
    "input": INPUT_KINDS,
    "prediction+input": (*PRED_KINDS, *INPUT_KINDS),
    "mass+prediction+input": ("mass_abs", *PRED_KINDS, *INPUT_KINDS),
}
CLIP = 10.0


class ScoringError(UserError, ValueError):
    """A matrix that cannot be scored as asked (too few patients, no features of the set)."""


# ----------------------------------------------------------------------------- features


def feature_frame(importances: pl.DataFrame, predictions: pl.DataFrame | None = None, *,
                  exclude_rois: Sequence[str] = ()) -> pl.DataFrame:
    """Wide patients x features frame (``patient_id`` + feature columns) from long engine frames.

    ``importances``: ``patient_id, target, roi, stat, sign, value`` (one method); ``predictions``:
    ``patient_id, class, voxels`` and optionally ``confidence``, ``entropy``, ``input_mean``, ``input_std``,
    ``input_local``. RoIs in
    ``exclude_rois`` (e.g. joined RoIs, which would count their parts twice) are left out.
    """
    imp = importances.filter(~pl.col("roi").is_in(list(exclude_rois))).with_columns(
        (pl.col("stat") + "_" + pl.col("sign") + "|" + pl.col("target") + "|" + pl.col("roi")).alias("feature")
    )
    wide = imp.pivot(on="feature", index="patient_id", values="value", aggregate_function="first")
    if predictions is not None and predictions.height:
        for col, kind in PREDICTION_FEATURES:
            if col not in predictions.columns:
                continue
            p = predictions.select("patient_id", (pl.lit(kind + "|") + pl.col("class")).alias("feature"),
                                   pl.col(col).cast(pl.Float64).alias("value"))
            wide = wide.join(p.pivot(on="feature", index="patient_id", values="value", aggregate_function="first"),
                             on="patient_id", how="full", coalesce=True)
    return wide.sort("patient_id")


def feature_columns(columns: Sequence[str], feature_set: str) -> list[str]:
    """The columns of ``feature_set`` among ``columns``, in the given order."""
    if feature_set not in FEATURE_SETS:
        raise ScoringError(f"unknown feature set {feature_set!r}; use one of {tuple(FEATURE_SETS)}")
    kinds = set(FEATURE_SETS[feature_set])
    return [c for c in columns if "|" in c and c.split("|", 1)[0] in kinds]


def feature_matrix(frame: pl.DataFrame, feature_set: str) -> tuple[list[str], np.ndarray]:
    """(feature names, float matrix with missing values as 0) of one feature set."""
    cols = feature_columns(frame.columns, feature_set)
    if not cols:
        raise ScoringError(f"the frame holds no features of the set {feature_set!r} "
                           f"(kinds {FEATURE_SETS[feature_set]})")
    x = frame.select(cols).fill_null(0.0).to_numpy().astype(np.float64)
    return cols, np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def feature_target(name: str) -> str:
    """The class a feature belongs to: the explained target, or the predicted class."""
    parts = name.split("|")
    return parts[1] if len(parts) > 1 else name


def feature_roi(name: str) -> str | None:
    parts = name.split("|")
    return parts[2] if len(parts) > 2 else None


# ----------------------------------------------------------------------------- scorers


def _as_matrix(x: Any) -> np.ndarray:
    if isinstance(x, pl.DataFrame):
        x = x.to_numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ScoringError(f"expected a patients x features matrix; got shape {a.shape}")
    return a


def _names(x: Any, given: Sequence[str] | None) -> list[str]:
    """Feature names: a Polars frame's columns, else the ``feature_names`` a scorer was given."""
    return list(x.columns) if isinstance(x, pl.DataFrame) else list(given or [])


def _robust_location_scale(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column: the median, and 1.4826 MAD (the standard deviation where the MAD is 0, then 1)."""
    mad = stats.median_abs_deviation(a, axis=0, scale="normal")
    sd = a.std(axis=0, ddof=1)
    return np.median(a, axis=0), np.where(mad > 0, mad, np.where(sd > 0, sd, 1.0))


def _standardiser(clip: float) -> Pipeline:
    return make_pipeline(RobustScaler(),
                         FunctionTransformer(np.clip, kw_args={"a_min": -clip, "a_max": clip}))


class _Scorer(OutlierMixin, BaseEstimator):
    def anomaly_score(self, x: Any) -> np.ndarray:
        """Higher = more anomalous: ``-score_samples(x)``."""
        return -self.score_samples(x)

    def _check_fit(self, x: Any, min_patients: int = 3) -> np.ndarray:
        a = _as_matrix(x)
        if a.shape[0] < min_patients:
            raise ScoringError(f"{type(self).__name__} needs at least {min_patients} patients to fit; got "
                               f"{a.shape[0]} - fit on a larger run (or a reference run)")
        if a.shape[1] == 0:
            raise ScoringError("no features to fit on")
        self.n_features_in_ = a.shape[1]
        return a

    def _check_score(self, x: Any) -> np.ndarray:
        if not hasattr(self, "n_features_in_"):
            raise ScoringError(f"{type(self).__name__} is not fitted; call fit() first")
        a = _as_matrix(x)
        if a.shape[1] != self.n_features_in_:
            raise ScoringError(f"fitted on {self.n_features_in_} features, asked to score {a.shape[1]}")
        return a


class ForestScorer(_Scorer):
    """One ``IsolationForest`` on all features."""

    def __init__(self, n_estimators: int = 100, seed: int = 0) -> None:
        self.n_estimators = n_estimators
        self.seed = seed

    def fit(self, x: Any, y: Any = None) -> ForestScorer:
        a = self._check_fit(x, 2)
        self.forest_ = IsolationForest(n_estimators=self.n_estimators, random_state=self.seed).fit(a)
        return self

    def score_samples(self, x: Any) -> np.ndarray:
        a = self._check_score(x)
        return self.forest_.score_samples(a)


class CovarianceScorer(_Scorer):
    """Minus the robust (``MinCovDet``) Mahalanobis distance on the leading principal components of
    robustly standardised features; at most ``n_components`` and a third of the patients."""

    def __init__(self, n_components: int = 8, seed: int = 0, clip: float = CLIP) -> None:
        self.n_components = n_components
        self.seed = seed
        self.clip = clip

    def fit(self, x: Any, y: Any = None) -> CovarianceScorer:
        a = self._check_fit(x, 6)
        k = int(max(1, min(self.n_components, a.shape[0] // 3, a.shape[1])))
        self.transform_ = make_pipeline(_standardiser(self.clip), PCA(n_components=k, random_state=self.seed))
        z = self.transform_.fit_transform(a)
        self.covariance_ = MinCovDet(random_state=self.seed).fit(z)
        return self

    def score_samples(self, x: Any) -> np.ndarray:
        a = self._check_score(x)
        return -self.covariance_.mahalanobis(self.transform_.transform(a))


class NeighbourScorer(_Scorer):
    """Minus the mean distance to the ``n_neighbors`` nearest fit patients (robustly standardised
    features). A scored row identical to a fit row is that patient: its zero self-distance is skipped.

    Above ``max_samples`` fit patients the neighbours are looked up among a seeded random subset of
    that many (the standardisation still uses every patient), as ``IsolationForest`` subsamples:
    in a cohort of 100,000 a few hundred patients that share one fault form tight groups, and the
    distance to the 5 nearest *of all* is then small for each of them (measured: 500 planted
    outliers in 18 groups ranked below the normal patients, ROC AUC 0.09); among 2,048 drawn
    patients a group of fewer than ~250 has almost no member, so its patients stay far from their
    neighbours. It also makes scoring O(n x max_samples) instead of O(n^2). ``None`` uses every
    patient. Cohorts up to ``max_samples`` are scored exactly as without it.
    """

    def __init__(self, n_neighbors: int = 5, clip: float = CLIP, max_samples: int | None = 2048,
                 seed: int = 0) -> None:
        self.n_neighbors = n_neighbors
        self.clip = clip
        self.max_samples = max_samples
        self.seed = seed

    def fit(self, x: Any, y: Any = None) -> NeighbourScorer:
        a = self._check_fit(x, 2)
        if self.max_samples is not None and self.max_samples < self.n_neighbors + 1:
            raise ScoringError(f"max_samples={self.max_samples} leaves fewer than n_neighbors + 1 = "
                               f"{self.n_neighbors + 1} patients to look up; raise it or pass None")
        self.scaler_ = _standardiser(self.clip).fit(a)
        z = self.scaler_.transform(a)
        if self.max_samples is not None and a.shape[0] > self.max_samples:
            rows = np.random.default_rng(self.seed).choice(a.shape[0], size=self.max_samples, replace=False)
            self.sample_ = np.sort(rows)
            z = z[self.sample_]
        else:
            self.sample_ = np.arange(a.shape[0])
        self.k_ = int(min(self.n_neighbors, z.shape[0] - 1))
        self.neighbours_ = NearestNeighbors(n_neighbors=self.k_ + 1).fit(z)
        # each looked-up row by content: a scored row equal to one of them is that patient
        self.rows_ = {}
        for i, row in enumerate(z):
            self.rows_.setdefault(row.tobytes(), i)
        return self

    def score_samples(self, x: Any) -> np.ndarray:
        """Minus the mean distance to the ``k`` nearest looked-up patients other than the row itself.

        The row itself is recognised by content (its standardised features equal a looked-up row's
        bit for bit), not by a zero distance: k-NN distances are computed as |a|^2 + |b|^2 - 2ab, and
        a row's distance to itself comes out as 0 or as ~1e-7 depending on rounding, so a zero test
        counted some patients as their own nearest neighbour (a third of a 30-patient cohort).
        """
        a = self._check_score(x)
        z = self.scaler_.transform(a)
        dist, idx = self.neighbours_.kneighbors(z)
        own = np.array([self.rows_.get(row.tobytes(), -1) for row in z])
        is_own = idx == own[:, None]
        # drop the row's own entry where it is among the k + 1 found, else the farthest
        drop = np.where(is_own.any(axis=1), is_own.argmax(axis=1), idx.shape[1] - 1)
        keep = np.ones(dist.shape, dtype=bool)
        keep[np.arange(len(z)), drop] = False
        return -dist[keep].reshape(len(z), -1).mean(axis=1)


class PerClassForestScorer(_Scorer):
    """The paper's mode: one isolation forest per target class on that class's RoI masses
    (``RoIAnomalyDetector``), ``score_samples`` = the mean over classes of each forest's
    ``score_samples``. Needs the feature names (``mass_abs|<target>|<roi>``): pass a Polars frame
    or ``feature_names``."""

    def __init__(self, n_estimators: int = 100, seed: int = 0, feature_names: Sequence[str] | None = None) -> None:
        self.n_estimators = n_estimators
        self.seed = seed
        self.feature_names = feature_names

    def _long(self, x: Any) -> pl.DataFrame:
        names = _names(x, self.feature_names)
        a = _as_matrix(x)
        if len(names) != a.shape[1] or not all(n.startswith("mass_abs|") for n in names):
            raise ScoringError("the paper's per-class forests need mass_abs|<target>|<roi> features, named")
        n = a.shape[0]
        pids = [f"p{i:07d}" for i in range(n)]
        return pl.DataFrame({
            "patient_id": np.repeat(pids, len(names)),
            "method": "any", "stat": "mass", "sign": "abs",
            "target": np.tile([feature_target(c) for c in names], n),
            "roi": np.tile([feature_roi(c) for c in names], n),
            "value": a.reshape(-1),
        })

    def fit(self, x: Any, y: Any = None) -> PerClassForestScorer:
        from engine.analytics.anomaly import RoIAnomalyDetector

        self._check_fit(x, 2)
        self.detector_ = RoIAnomalyDetector(n_estimators=self.n_estimators, seed=self.seed).fit(self._long(x))
        return self

    def per_class_scores(self, x: Any) -> pl.DataFrame:
        """Per patient (row order) and class, the forest's anomaly score (higher = more anomalous)."""
        self._check_score(x)
        s = self.detector_.score(self._long(x))
        return s.with_columns(pl.col("patient_id").str.slice(1).cast(pl.Int64).alias("row")).select(
            "row", "target", "score")

    def score_samples(self, x: Any) -> np.ndarray:
        s = self.per_class_scores(x).filter(pl.col("target") == "__mean__").sort("row")
        return -s["score"].to_numpy()


class RankEnsemble(_Scorer):
    """Mean over ``members`` of each patient's percentile (0-100) among the fit cohort's
    ``score_samples`` of that member; higher = more normal. Members are cloned before fitting."""

    def __init__(self, members: Sequence[_Scorer] | None = None) -> None:
        self.members = members

    def fit(self, x: Any, y: Any = None) -> RankEnsemble:
        a = self._check_fit(x, 6)
        members = self.members if self.members is not None else (ForestScorer(), CovarianceScorer(), NeighbourScorer())
        self.members_ = [clone(m).fit(a) for m in members]
        self.fit_scores_ = [m.score_samples(a) for m in self.members_]
        return self

    def score_samples(self, x: Any) -> np.ndarray:
        a = self._check_score(x)
        pct = [stats.percentileofscore(ref, m.score_samples(a), kind="mean")
               for m, ref in zip(self.members_, self.fit_scores_)]
        return np.mean(pct, axis=0)


class BlockEnsemble(_Scorer):
    """Minus the mean over blocks of features of each patient's robust z-score of a ``base``
    scorer's anomaly score fitted on that block alone (z against the fit cohort's scores: median and
    1.4826 MAD); higher = more normal.

    Blocks are groups of feature kinds (:data:`BLOCKS`: the explanation's RoI importances, what the
    model predicted, the input's level and its local detail over each predicted class). On the union
    of the blocks one distance is dominated by the block with the most features (289 RoI masses
    against 51 input features);
    here each block has an equal say, and a patient far out in one block keeps that distance (a
    mean of percentiles would cap it at the cohort's edge). Needs the feature names
    (``feature_names``, or a Polars frame).
    """

    def __init__(self, base: str = "neighbours", seed: int = 0, feature_names: Sequence[str] | None = None) -> None:
        self.base = base
        self.seed = seed
        self.feature_names = feature_names

    def _blocks(self, x: Any, width: int) -> list[np.ndarray]:
        names = _names(x, self.feature_names)
        if len(names) != width:
            raise ScoringError(f"the block ensemble needs the names of the {width} features (feature_names=)")
        kinds = [n.split("|", 1)[0] for n in names]
        cols = [np.array([i for i, k in enumerate(kinds) if k in block], dtype=int) for block in BLOCKS]
        return [c for c in cols if c.size]

    def fit(self, x: Any, y: Any = None) -> BlockEnsemble:
        a = self._check_fit(x, 2)  # as its k-NN members
        if self.base not in ("forest", "covariance", "neighbours"):
            raise ScoringError(f"base scorer {self.base!r} of the block ensemble must be forest, covariance or neighbours")
        self.columns_ = self._blocks(x, a.shape[1])
        if not self.columns_:
            raise ScoringError(f"no feature belongs to a block; kinds per block: {BLOCKS}")
        self.members_ = [make_scorer(self.base, seed=self.seed).fit(a[:, c]) for c in self.columns_]
        self.centre_, self.scale_ = _robust_location_scale(self._member_scores(a))
        return self

    def _member_scores(self, a: np.ndarray) -> np.ndarray:
        """Patients x blocks: each block's member's anomaly score."""
        return np.column_stack([m.anomaly_score(a[:, c]) for m, c in zip(self.members_, self.columns_)])

    def score_samples(self, x: Any) -> np.ndarray:
        a = self._check_score(x)
        return -((self._member_scores(a) - self.centre_) / self.scale_).mean(axis=1)


#: Feature kinds grouped into the blocks of :class:`BlockEnsemble`.
BLOCKS: tuple[tuple[str, ...], ...] = (
    ("mass_abs", "mass_pos", "mass_neg", "mean_abs"),  # the explanation
    PRED_KINDS,  # what the model predicted
    INPUT_LEVEL_KINDS,  # the input's level over each predicted class
    INPUT_DETAIL_KINDS,  # the input's local detail there
)

SCORERS = ("paper", "forest", "covariance", "neighbours", "ensemble", "blocks")
#: (scorer, feature set): among the settings that use the explanation, the one benchmarks/anomaly_detection.py
#: chooses on every held-out kind (BENCHMARKS.md: one k-NN per block - RoI masses, prediction, the input's
#: level, its local detail - combined as robust z-scores). The paper's mode is ("paper", "mass").
DEFAULT_SETTING: tuple[str, str] = ("blocks", "mass+prediction+input")


def make_scorer(name: str, *, seed: int = 0) -> _Scorer:
    """A scorer by name (``SCORERS``) with its default parameters and ``seed``."""
    if name == "paper":
        return PerClassForestScorer(seed=seed)
    if name == "forest":
        return ForestScorer(seed=seed)
    if name == "covariance":
        return CovarianceScorer(seed=seed)
    if name == "neighbours":
        return NeighbourScorer(seed=seed)
    if name == "ensemble":
        return RankEnsemble(members=(ForestScorer(seed=seed), CovarianceScorer(seed=seed), NeighbourScorer(seed=seed)))
    if name == "blocks":
        return BlockEnsemble(seed=seed)
    raise ScoringError(f"unknown scorer {name!r}; use one of {SCORERS}")


# ----------------------------------------------------------------------------- reasons


@dataclass(frozen=True)
class FeatureReason:
    """One feature of a patient against the fit cohort: value, cohort median and robust z."""

    feature: str
    target: str
    roi: str | None
    value: float
    median: float
    z: float


@dataclass(frozen=True)
class ClassReason:
    """One class's share in a patient's anomaly: root-mean-square robust z over its features."""

    target: str
    score: float
    n_features: int


class RobustProfile(BaseEstimator):
    """Cohort medians and robust scales of named features; robust z-scores and top reasons."""

    def __init__(self, feature_names: Sequence[str] | None = None) -> None:
        self.feature_names = feature_names

    def fit(self, x: Any, y: Any = None) -> RobustProfile:
        names = _names(x, self.feature_names)
        a = _as_matrix(x)
        if len(names) != a.shape[1]:
            raise ScoringError(f"{a.shape[1]} features but {len(names)} names")
        if a.shape[0] < 2:
            raise ScoringError("robust z-scores need at least 2 patients in the fit cohort")
        self.names_ = names
        self.median_, self.scale_ = _robust_location_scale(a)
        self.targets_ = [feature_target(n) for n in names]
        return self

    def zscores(self, x: Any) -> np.ndarray:
        return (_as_matrix(x) - self.median_) / self.scale_

    def class_scores(self, x: Any) -> list[list[ClassReason]]:
        """Per patient, every class's RMS z, highest first."""
        z = self.zscores(x)
        classes = sorted(set(self.targets_))
        idx = {c: np.array([i for i, t in enumerate(self.targets_) if t == c]) for c in classes}
        out = []
        for row in z:
            rs = [ClassReason(c, float(np.sqrt(np.mean(row[idx[c]] ** 2))), len(idx[c])) for c in classes]
            out.append(sorted(rs, key=lambda r: -r.score))
        return out

    def reasons(self, x: Any, *, top_k: int = 5) -> list[list[FeatureReason]]:
        """Per patient, the ``top_k`` features with the largest |z|."""
        a = _as_matrix(x)
        z = self.zscores(a)
        out = []
        for row, zr in zip(a, z):
            order = np.argsort(-np.abs(zr), kind="stable")[:top_k]
            out.append([FeatureReason(self.names_[i], self.targets_[i], feature_roi(self.names_[i]), float(row[i]),
                                      float(self.median_[i]), float(zr[i])) for i in order])
        return out
