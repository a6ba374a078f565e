"""score_run with the scorers and feature sets of engine.analytics.scoring, on a real store.

Expected values are computed here from the rows written, with NumPy and scikit-learn directly
(not through the engine's feature frames or scorers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import RobustScaler

from engine import store
from engine.analytics.anomaly import AnomalyError, rescore, score_run
from engine.results import PatientResult
from engine.vocabulary import MEAN_TARGET

TARGETS = ("aorta", "heart")
ROIS = ("aorta", "heart", "trachea", "lung")  # lung is a joined RoI: left out of the "parts" features
CLASSES = ("background", "aorta", "heart")
N = 14


def _patient(i: int, rng: np.random.Generator) -> PatientResult:
    rows = [(t, r, st, sg, float(rng.gamma(2.0) * (8.0 if (i == 3 and t == "heart" and r == "trachea") else 1.0)))
            for t in TARGETS for r in ROIS for st in ("mass", "mean") for sg in ("abs", "pos", "neg")]
    imp = pl.DataFrame(rows, schema=["target", "roi", "stat", "sign", "value"], orient="row").with_columns(
        pl.lit("saliency").alias("method"))
    pred = pl.DataFrame({"class": list(CLASSES), "voxels": [5000, int(rng.integers(90, 110)), int(rng.integers(190, 210))],
                         "dice": [0.99, 0.8 + 0.01 * i, 0.9], "confidence": rng.uniform(0.8, 0.99, 3),
                         "entropy": rng.uniform(0.05, 0.3, 3), "input_mean": rng.normal(0.5, 0.05, 3),
                         "input_std": rng.uniform(0.01, 0.05, 3), "input_local": rng.uniform(0.1, 0.2, 3)})
    return PatientResult(patient_id=f"p{i:02d}", importances=imp, predictions=pred, worker="t", seconds=1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[PatientResult]]]:
    db = tmp_path_factory.mktemp("score") / "s.duckdb"
    written: dict[str, list[PatientResult]] = {}
    with store.open_writer(db, live=False) as s:
        for run, seed in (("a", 0), ("b", 1)):
            rng = np.random.default_rng(seed)
            s.create_run(run, config={"class_names": list(CLASSES)})
            ids = [f"p{i:02d}" for i in range(N)]
            s.register_patients(run, pl.DataFrame({"patient_id": ids, "image_path": [f"/x/{p}" for p in ids]}))
            written[run] = [_patient(i, rng) for i in range(N)]
            for r in written[run]:
                s.write_patient(run, r)
    return db, written


def _by_hand(results: list[PatientResult], *, inputs: bool = False) -> tuple[list[str], list[str], np.ndarray]:
    """patients, features, matrix of mass_abs (RoIs but lung) + pred voxels/confidence/entropy (+ input
    mean/std/local contrast when ``inputs``), in sorted order."""
    names, rows = None, []
    for r in sorted(results, key=lambda r: r.patient_id):
        m = r.importances.filter((pl.col("stat") == "mass") & (pl.col("sign") == "abs") & (pl.col("roi") != "lung"))
        feats = {f"mass_abs|{t}|{roi}": v for t, roi, v in m.select("target", "roi", "value").iter_rows()}
        for col in ("voxels", "confidence", "entropy"):
            feats.update({f"pred_{col}|{c}": float(v) for c, v in r.predictions.select("class", col).iter_rows()})
        for col in ("input_mean", "input_std", "input_local") if inputs else ():
            feats.update({f"{col}|{c}": float(v) for c, v in r.predictions.select("class", col).iter_rows()})
        names = names or sorted(feats)
        rows.append([feats[n] for n in names])
    return [r.patient_id for r in sorted(results, key=lambda r: r.patient_id)], names, np.array(rows)


def _knn_score(fit: np.ndarray, x: np.ndarray, k: int = 5) -> np.ndarray:
    scaler = RobustScaler().fit(fit)
    tree = NearestNeighbors(n_neighbors=k + 1).fit(np.clip(scaler.transform(fit), -10, 10))
    dist, _ = tree.kneighbors(np.clip(scaler.transform(x), -10, 10))
    d = np.where((dist[:, 0] == 0)[:, None], dist[:, 1:], dist[:, :-1])
    return d.mean(axis=1)


def test_the_default_is_the_mean_robust_z_of_one_knn_per_block_of_features(runs) -> None:
    db, written = runs
    with store.open(db) as s:
        model, scores = score_run(s, run_id="a")
    assert model["scorer"] == "blocks" and model["feature_set"] == "mass+prediction+input"
    patients, names, x = _by_hand(written["a"], inputs=True)
    assert sorted(model["features"]) == names
    z = []
    for kinds in (("mass_abs",), ("pred_voxels", "pred_confidence", "pred_entropy"), ("input_mean", "input_std"),
                  ("input_local",)):
        cols = [i for i, n in enumerate(names) if n.split("|")[0] in kinds]
        a = _knn_score(x[:, cols], x[:, cols])
        z.append((a - np.median(a)) / stats.median_abs_deviation(a, scale="normal"))
    mean = scores.filter(pl.col("target") == MEAN_TARGET).sort("patient_id")
    assert mean["patient_id"].to_list() == patients
    np.testing.assert_allclose(mean["score"].to_numpy(), np.mean(z, axis=0), rtol=1e-9)
    assert mean["patient_id"][int(np.argmax(mean["score"].to_numpy()))] == "p03"  # the planted patient


def test_knn_scores_are_distances_on_masses_and_prediction_features(runs) -> None:
    db, written = runs
    with store.open(db) as s:
        model, scores = score_run(s, run_id="a", scorer="neighbours", feature_set="mass+prediction")
    patients, names, x = _by_hand(written["a"])
    assert model["scorer"] == "neighbours" and model["feature_set"] == "mass+prediction"
    assert sorted(model["features"]) == names and not any("|lung" in f for f in model["features"])
    mean = scores.filter(pl.col("target") == MEAN_TARGET).sort("patient_id")
    assert mean["patient_id"].to_list() == patients
    np.testing.assert_allclose(mean["score"].to_numpy(), _knn_score(x, x), rtol=1e-9)
    assert mean["patient_id"][int(np.argmax(mean["score"].to_numpy()))] == "p03"  # the planted patient
    dice = [0.8 + 0.01 * i for i in range(N)]
    assert model["spearman_dice"] == pytest.approx(stats.spearmanr(mean["score"].to_numpy(), dice).statistic)


def test_per_class_rows_and_reasons_are_robust_z_scores_against_the_fit_cohort(runs) -> None:
    db, written = runs
    with store.open(db) as s:
        model, scores = score_run(s, run_id="a", reasons=2)
    patients, names, x = _by_hand(written["a"], inputs=True)
    med = np.median(x, axis=0)
    mad = 1.4826 * np.median(np.abs(x - med), axis=0)
    scale = np.where(mad > 0, mad, np.where(x.std(axis=0, ddof=1) > 0, x.std(axis=0, ddof=1), 1.0))
    z = (x - med) / scale
    heart = [i for i, n in enumerate(names) if n.split("|")[1] == "heart"]
    got = scores.filter(pl.col("target") == "heart").sort("patient_id")["score"].to_numpy()
    np.testing.assert_allclose(got, np.sqrt(np.mean(z[:, heart] ** 2, axis=1)), rtol=1e-4)
    reasons = model["reasons"].filter(pl.col("patient_id") == "p03").sort("rank")
    top = int(np.argmax(np.abs(z[patients.index("p03")])))
    first = reasons.row(0, named=True)
    assert reasons.height == 2 and first["feature"] == names[top] == "mass_abs|heart|trachea"
    assert first["kind"] == "mass_abs" and first["target"] == "heart" and first["roi"] == "trachea"
    assert first["z"] == pytest.approx(z[patients.index("p03"), top], rel=1e-4)


def test_rescoring_from_the_stored_model_row_gives_identical_scores(runs, tmp_path: Path) -> None:
    import shutil

    db, _ = runs
    copy = tmp_path / "copy.duckdb"
    shutil.copy(db, copy)
    with store.open_writer(copy, live=False) as s:
        for kwargs in ({}, {"scorer": "forest", "feature_set": "signed_mass", "seed": 4, "n_estimators": 30},
                       {"scorer": "paper"}, {"settings": "paper"},
                       {"scorer": "blocks", "feature_set": "mass+prediction"}):
            model, scores = score_run(s, run_id="b", reference_run_id="a", **kwargs)
            s.write_anomaly(model=model, scores=scores)
            row = s.anomaly_model(model["model_id"])
            assert row["scorer"] == model["scorer"] and row["fit_run_id"] == "a" and row["seed"] == model["seed"]
            again_model, again = rescore(s, row)
            assert again_model["model_id"] == model["model_id"]
            stored = s.anomaly_model_scores("b", model["model_id"]).select(scores.columns)
            assert again.sort("target", "patient_id").equals(stored.sort("target", "patient_id")), kwargs


def test_paper_mode_is_unchanged_by_the_new_scorers(runs) -> None:
    from engine.analytics.anomaly import RoIAnomalyDetector

    db, _ = runs
    with store.open(db) as s:
        model, scores = score_run(s, run_id="a", settings="paper")
        imp = s.importances("a")
    expected = RoIAnomalyDetector(seed=123, classes=list(CLASSES)).fit_score(imp)
    assert model["scorer"] == "paper" and model["feature_set"] == "mass" and model["seed"] == 123
    np.testing.assert_allclose(scores.sort("target", "patient_id")["score"].to_numpy(),
                               expected.sort("target", "patient_id")["score"].to_numpy())


def test_an_unknown_scorer_or_feature_set_is_refused_with_a_suggestion(runs) -> None:
    db, _ = runs
    with store.open(db) as s:
        with pytest.raises(AnomalyError, match="did you mean 'neighbours'"):
            score_run(s, run_id="a", scorer="neighbors")
        with pytest.raises(AnomalyError, match="did you mean 'signed_mass'"):
            score_run(s, run_id="a", feature_set="signed-mass")
        with pytest.raises(AnomalyError, match="masses only"):
            score_run(s, run_id="a", scorer="paper", feature_set="prediction")


def test_a_feature_no_patient_has_is_left_out_not_scored_as_zero(tmp_path) -> None:
    """A store written before ``input_local`` existed (upgraded in place): the column is NULL for
    every patient, so the default scores the three blocks the run holds."""
    from engine.analytics.anomaly import feature_frame_of

    rng = np.random.default_rng(0)
    results = [_patient(i, rng) for i in range(N)]
    db = tmp_path / "old.duckdb"
    with store.open_writer(db, live=False) as s:
        s.create_run("old", config={"class_names": list(CLASSES)})
        ids = [r.patient_id for r in results]
        s.register_patients("old", pl.DataFrame({"patient_id": ids, "image_path": [f"/x/{p}" for p in ids]}))
        for r in results:
            s.write_patient("old", PatientResult(patient_id=r.patient_id, importances=r.importances,
                                                 predictions=r.predictions.drop("input_local"), worker="t", seconds=1.0))
    with store.open(db) as s:
        frame = feature_frame_of(s, "old", feature_set="mass+prediction+input", method="saliency")
        model, scores = score_run(s, run_id="old")
    assert not any(c.startswith("input_local|") for c in frame.columns)
    assert any(c.startswith("input_mean|") for c in frame.columns)
    assert not any(f.startswith("input_local|") for f in model["features"])
    patients, names, x = _by_hand(results, inputs=True)
    keep = [i for i, n in enumerate(names) if not n.startswith("input_local|")]
    names, x = [names[i] for i in keep], x[:, keep]
    z = []
    for kinds in (("mass_abs",), ("pred_voxels", "pred_confidence", "pred_entropy"), ("input_mean", "input_std")):
        cols = [i for i, n in enumerate(names) if n.split("|")[0] in kinds]
        a = _knn_score(x[:, cols], x[:, cols])
        z.append((a - np.median(a)) / stats.median_abs_deviation(a, scale="normal"))
    mean = scores.filter(pl.col("target") == MEAN_TARGET).sort("patient_id")
    np.testing.assert_allclose(mean["score"].to_numpy(), np.mean(z, axis=0), rtol=1e-9)
