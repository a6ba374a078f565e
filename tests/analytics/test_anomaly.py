"""Per-class isolation forests, checked against scikit-learn called directly."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import stats
from sklearn.ensemble import IsolationForest

from engine.analytics.anomaly import (
    MEAN_TARGET,
    AnomalyError,
    RoIAnomalyDetector,
    mean_foreground_dice,
    score_run,
)
from engine.analytics.reference import read_reference_csv
from tests.analytics._store import reference_csv

ROIS = ["r0", "r1", "r2"]


def _long(matrix: dict[str, np.ndarray], patients: list[str], *, method: str = "m") -> pl.DataFrame:
    rows = []
    for target, x in matrix.items():
        for i, pid in enumerate(patients):
            for j, roi in enumerate(ROIS):
                rows.append((pid, method, target, roi, "mass", "abs", float(x[i, j])))
    return pl.DataFrame(rows, schema=["patient_id", "method", "target", "roi", "stat", "sign", "value"],
                        orient="row")


@pytest.fixture()
def hand_data() -> tuple[dict[str, np.ndarray], list[str]]:
    rng = np.random.default_rng(3)
    patients = [f"p{i:02d}" for i in range(20)]
    x_a = rng.dirichlet([5, 3, 2], size=20)
    x_a[7] = [0.01, 0.01, 0.98]  # an obvious outlier for class a
    x_b = rng.dirichlet([2, 2, 6], size=20)
    return {"a": x_a, "b": x_b}, patients


def test_scores_equal_sklearn_fitted_directly(hand_data) -> None:
    matrix, patients = hand_data
    imp = _long(matrix, patients)
    det = RoIAnomalyDetector(n_estimators=60, seed=5).fit(imp)
    assert det.targets_ == ["a", "b"] and det.features_["a"] == ROIS and det.method_ == "m"
    scores = det.score(imp)
    for target, x in matrix.items():
        ref = IsolationForest(n_estimators=60, random_state=5).fit(x)
        got = scores.filter(pl.col("target") == target).sort("patient_id")
        np.testing.assert_allclose(got["raw_score"].to_numpy(), ref.score_samples(x))
        np.testing.assert_allclose(got["score"].to_numpy(), -ref.score_samples(x))
        np.testing.assert_allclose(got["decision"].to_numpy(), ref.decision_function(x))
        np.testing.assert_allclose(got["offset"].to_numpy(), ref.offset_)
    a = scores.filter(pl.col("target") == "a").sort("score", descending=True)
    assert a["patient_id"][0] == "p07"
    # __mean__ is the mean over classes of every column
    mean = scores.filter(pl.col("target") == MEAN_TARGET).sort("patient_id")
    per = scores.filter(pl.col("target") != MEAN_TARGET).group_by("patient_id").agg(
        pl.col("score", "decision").mean()).sort("patient_id")
    np.testing.assert_allclose(mean["score"].to_numpy(), per["score"].to_numpy())
    np.testing.assert_allclose(mean["decision"].to_numpy(), per["decision"].to_numpy())


def test_missing_rois_are_zero_and_missing_targets_are_skipped(hand_data) -> None:
    matrix, patients = hand_data
    imp = _long(matrix, patients)
    # p03 has no r2 row for class a: the detector must treat it as 0
    imp = imp.filter(~((pl.col("patient_id") == "p03") & (pl.col("target") == "a") & (pl.col("roi") == "r2")))
    # p04 lacks class b entirely
    imp = imp.filter(~((pl.col("patient_id") == "p04") & (pl.col("target") == "b")))
    det = RoIAnomalyDetector(n_estimators=40, seed=1).fit(imp)
    scores = det.score(imp)
    x_a = matrix["a"].copy()
    x_a[3, 2] = 0.0
    ref = IsolationForest(n_estimators=40, random_state=1).fit(x_a)
    got = scores.filter(pl.col("target") == "a").sort("patient_id")["raw_score"].to_numpy()
    np.testing.assert_allclose(got, ref.score_samples(x_a))
    p04 = scores.filter(pl.col("patient_id") == "p04")
    assert set(p04["target"]) == {"a", MEAN_TARGET}
    assert p04.filter(pl.col("target") == MEAN_TARGET)["score"].item() == pytest.approx(
        p04.filter(pl.col("target") == "a")["score"].item())


def test_errors(hand_data) -> None:
    matrix, patients = hand_data
    two = pl.concat([_long(matrix, patients, method="m1"), _long(matrix, patients, method="m2")])
    with pytest.raises(AnomalyError, match="several methods"):
        RoIAnomalyDetector().fit(two)
    RoIAnomalyDetector(n_estimators=10, method="m2").fit(two)
    with pytest.raises(AnomalyError, match="at least 2"):
        RoIAnomalyDetector().fit(_long({"a": matrix["a"][:1]}, patients[:1]))
    with pytest.raises(AnomalyError, match="not fitted"):
        RoIAnomalyDetector().score(two)


def test_score_run_paper_mode_within_and_reference(hand_data) -> None:
    matrix, patients = hand_data
    imp = pl.concat([
        _long(matrix, patients).with_columns(pl.lit("r1").alias("run_id")),
        _long({k: v[::-1] for k, v in matrix.items()}, patients).with_columns(pl.lit("r2").alias("run_id")),
    ])
    dice = np.linspace(0.8, 0.99, len(patients))
    pred = pl.DataFrame({
        "run_id": ["r1"] * len(patients) * 2,
        "patient_id": patients * 2,
        "class": ["heart"] * len(patients) + ["background"] * len(patients),
        "dice": np.concatenate([dice, np.ones(len(patients))]),
    })
    source = {"importances": imp, "predictions": pred}
    model, scores = score_run(source, scorer="paper", run_id="r1", seed=2, n_estimators=30)
    assert model["mode"] == "within-run" and model["fit_run_id"] == "r1" and model["method"] == "m"
    assert set(scores["run_id"]) == {"r1"}
    assert scores.columns == ["run_id", "patient_id", "target", "score", "raw_score", "decision", "offset"]
    mean = scores.filter(pl.col("target") == MEAN_TARGET).sort("patient_id")
    expected = stats.spearmanr(mean["score"].to_numpy(), dice)
    assert model["spearman_dice"] == pytest.approx(expected.statistic)
    assert model["spearman_p"] == pytest.approx(expected.pvalue)
    again, _ = score_run(source, scorer="paper", run_id="r1", seed=2, n_estimators=30)
    assert again["model_id"] == model["model_id"]
    other, _ = score_run(source, scorer="paper", run_id="r1", seed=3, n_estimators=30)
    assert other["model_id"] != model["model_id"]
    ref_model, ref_scores = score_run(source, scorer="paper", run_id="r2", reference_run_id="r1", seed=2, n_estimators=30)
    assert ref_model["mode"] == "reference" and ref_model["fit_run_id"] == "r1"
    assert ref_model["spearman_dice"] is None  # r2 has no Dice
    # scoring r2 with forests fitted on r1 equals sklearn fitted on r1's matrix
    forest = IsolationForest(n_estimators=30, random_state=2).fit(matrix["a"])
    got = ref_scores.filter(pl.col("target") == "a").sort("patient_id")["raw_score"].to_numpy()
    np.testing.assert_allclose(got, forest.score_samples(matrix["a"][::-1]))


def test_mean_foreground_dice_ignores_background() -> None:
    pred = pl.DataFrame({"patient_id": ["a", "a", "a"], "class": ["background", "x", "y"], "dice": [1.0, 0.5, None]})
    assert mean_foreground_dice(pred)["dice"].to_list() == [0.5]


def test_shared_csv_ranking_is_identical_for_a_fixed_seed() -> None:
    imp = read_reference_csv(reference_csv()).importances
    first = RoIAnomalyDetector(n_estimators=50, seed=7).fit(imp).score(imp)
    second = RoIAnomalyDetector(n_estimators=50, seed=7).fit(imp).score(imp)
    assert first["target"].n_unique() == 18  # 17 classes and __mean__
    for target in first["target"].unique().to_list():
        r1 = first.filter(pl.col("target") == target).sort(["score", "patient_id"], descending=[True, False])
        r2 = second.filter(pl.col("target") == target).sort(["score", "patient_id"], descending=[True, False])
        assert r1["patient_id"].to_list() == r2["patient_id"].to_list()
        np.testing.assert_array_equal(r1["score"].to_numpy(), r2["score"].to_numpy())
