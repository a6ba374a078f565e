"""Anomaly scorers, feature sets and reasons (engine.analytics.scoring) against independent computations."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy.spatial.distance import cdist
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import RobustScaler

from engine.analytics import scoring as S
from engine.analytics.anomaly import RoIAnomalyDetector

NAMES = [f"mass_abs|t{t}|r{r}" for t in range(3) for r in range(4)]
OUTLIERS = [3, 17, 30]


@pytest.fixture(scope="module")
def cohort():
    rng = np.random.default_rng(0)
    x = rng.normal(0.2, 0.02, (40, len(NAMES)))
    x[OUTLIERS, 5] += 0.3  # t1's explanation puts extra mass on r1
    return pl.DataFrame(x, schema=NAMES)


@pytest.mark.parametrize("name", S.SCORERS)
def test_every_scorer_ranks_the_planted_outliers_first_and_follows_the_estimator_contract(name, cohort):
    sc = S.make_scorer(name, seed=1)
    assert sc.fit(cohort) is sc
    a = sc.anomaly_score(cohort)
    np.testing.assert_allclose(a, -sc.score_samples(cohort))
    truth = np.isin(np.arange(len(a)), OUTLIERS)
    if name == "paper":  # the mean over classes dilutes one class's outliers; that class's forest finds them
        a = sc.per_class_scores(cohort).filter(pl.col("target") == "t1").sort("row")["score"].to_numpy()
    if name in ("paper", "forest", "ensemble"):  # clustered outliers partly mask each other in a forest
        assert roc_auc_score(truth, a) > 0.85
    else:
        assert set(np.argsort(-a)[:3]) == set(OUTLIERS)
    assert repr(clone(sc)) == repr(sc)  # parameters only in __init__, as scikit-learn clones them


def test_scorers_refuse_unfitted_use_too_few_patients_and_a_different_feature_count(cohort):
    with pytest.raises(S.ScoringError, match="not fitted"):
        S.ForestScorer().score_samples(cohort)
    with pytest.raises(S.ScoringError, match="at least 6 patients"):
        S.CovarianceScorer().fit(cohort.head(4))
    sc = S.NeighbourScorer().fit(cohort)
    with pytest.raises(S.ScoringError, match="fitted on 12 features"):
        sc.score_samples(cohort.select(NAMES[:3]))
    with pytest.raises(S.ScoringError, match="unknown scorer"):
        S.make_scorer("magic")


def test_the_paper_mode_equals_the_per_class_forests_mean_score_on_the_long_frame(cohort):
    x = cohort.to_numpy()
    rows = [{"patient_id": f"q{i:02d}", "method": "m", "stat": "mass", "sign": "abs",
             "target": n.split("|")[1], "roi": n.split("|")[2], "value": float(x[i, j])}
            for i in range(x.shape[0]) for j, n in enumerate(NAMES)]
    ref = RoIAnomalyDetector(seed=4).fit_score(pl.DataFrame(rows))
    expect = ref.filter(pl.col("target") == "__mean__").sort("patient_id")["score"].to_numpy()
    got = S.PerClassForestScorer(seed=4).fit(cohort).anomaly_score(cohort)
    np.testing.assert_allclose(got, expect, rtol=1e-12)


def test_neighbour_score_is_the_mean_distance_to_the_k_nearest_other_patients(cohort):
    x = cohort.to_numpy()
    sc = S.NeighbourScorer(n_neighbors=4, clip=1e9).fit(x)
    z = RobustScaler().fit(x).transform(x)
    d = cdist(z, z)
    np.fill_diagonal(d, np.inf)
    expect = np.sort(d, axis=1)[:, :4].mean(axis=1)
    np.testing.assert_allclose(sc.anomaly_score(x), expect, rtol=1e-10)
    # a new patient is compared with its 4 nearest fit patients, none skipped
    new = x[:1] + 0.01
    dn = cdist(RobustScaler().fit(x).transform(new), z)
    np.testing.assert_allclose(sc.anomaly_score(new), np.sort(dn, axis=1)[:, :4].mean(axis=1), rtol=1e-10)


def test_a_patient_is_never_its_own_neighbour_whatever_the_rounding_of_its_self_distance():
    """k-NN distances come from |a|^2 + |b|^2 - 2ab: in 300 dimensions a row's distance to itself is
    ~1e-7 rather than 0 for many rows. The score must still skip the row itself (it once tested
    for a zero distance, and counted a third of a cohort as their own nearest neighbour)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 300)) * rng.uniform(1e-3, 1e3, size=300) + rng.uniform(-1e3, 1e3, size=300)
    sc = S.NeighbourScorer(n_neighbors=5, clip=1e9).fit(x)
    z = RobustScaler().fit(x).transform(x)
    dist, _ = sc.neighbours_.kneighbors(z)
    assert (dist[:, 0] > 0).sum() >= 3  # the case that broke the zero test
    d = cdist(z, z)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(sc.anomaly_score(x), np.sort(d, axis=1)[:, :5].mean(axis=1), rtol=1e-9)
    # a twin (the same features twice) is another patient: each is the other's neighbour at distance 0
    twins = np.vstack([x, x[:1]])
    sc = S.NeighbourScorer(n_neighbors=5, clip=1e9).fit(twins)
    zt = RobustScaler().fit(twins).transform(twins)
    dt = cdist(zt, zt)
    np.fill_diagonal(dt, np.inf)
    np.testing.assert_allclose(sc.anomaly_score(twins), np.sort(dt, axis=1)[:, :5].mean(axis=1), atol=1e-6)


def test_neighbour_lookup_among_a_seeded_subset_matches_a_hand_computation(cohort):
    x = cohort.to_numpy()
    sc = S.NeighbourScorer(n_neighbors=3, clip=1e9, max_samples=15, seed=7).fit(x)
    sample = np.sort(np.random.default_rng(7).choice(x.shape[0], size=15, replace=False))
    np.testing.assert_array_equal(sc.sample_, sample)
    z = RobustScaler().fit(x).transform(x)  # the standardisation still uses every patient
    d = cdist(z, z[sample])
    d[sample, np.arange(15)] = np.inf  # a drawn patient is not its own neighbour
    np.testing.assert_allclose(sc.anomaly_score(x), np.sort(d, axis=1)[:, :3].mean(axis=1), rtol=1e-10)
    # a cohort no larger than max_samples is scored exactly as with every patient
    full = S.NeighbourScorer(max_samples=None).fit(x).anomaly_score(x)
    np.testing.assert_array_equal(S.NeighbourScorer(max_samples=40).fit(x).anomaly_score(x), full)
    with pytest.raises(S.ScoringError, match="max_samples=3 leaves fewer than n_neighbors"):
        S.NeighbourScorer(max_samples=3).fit(x)


def test_neighbours_among_a_subset_find_groups_of_alike_outliers_that_all_patients_mask():
    # 3,000 normal patients and 60 outliers in three tight groups of 20 (one fault each): among all
    # patients each outlier's 5 nearest are its own group, so it looks normal; among 256 drawn, not.
    rng = np.random.default_rng(3)
    x = rng.normal(0.0, 1.0, (3060, 8))
    for g in range(3):
        x[3000 + 20 * g: 3020 + 20 * g] = rng.normal(0.0, 0.05, (20, 8)) + np.eye(8)[g] * 6.0
    y = np.arange(3060) >= 3000
    masked = roc_auc_score(y, S.NeighbourScorer(max_samples=None).fit(x).anomaly_score(x))
    found = roc_auc_score(y, S.NeighbourScorer(max_samples=256, seed=0).fit(x).anomaly_score(x))
    assert masked < 0.6 and found > 0.95, (masked, found)


def test_block_ensemble_is_the_mean_robust_z_of_one_knn_per_block_by_hand():
    from scipy.stats import norm

    rng = np.random.default_rng(5)
    names = ["mass_abs|h|a", "mass_abs|h|b", "mass_abs|h|c", "pred_voxels|h", "pred_entropy|h", "input_std|h"]
    x = rng.normal(size=(25, 6))
    x[4, 5] += 8.0  # the input block alone: one feature of six
    sc = S.BlockEnsemble(feature_names=names).fit(x)

    def knn(block: np.ndarray, k: int = 5) -> np.ndarray:  # mean distance to the k nearest others
        z = np.clip(RobustScaler().fit(block).transform(block), -10, 10)
        d = cdist(z, z)
        np.fill_diagonal(d, np.inf)
        return -np.sort(d, axis=1)[:, :k].mean(axis=1)

    def robust_z(v: np.ndarray) -> np.ndarray:
        med = np.median(v)
        return (v - med) * norm.ppf(0.75) / np.median(np.abs(v - med))  # MAD scaled to a normal SD

    blocks = [[0, 1, 2], [3, 4], [5]]
    expect = np.mean([robust_z(-knn(x[:, b])) for b in blocks], axis=0)  # anomaly = minus the k-NN score
    np.testing.assert_allclose(sc.anomaly_score(x), expect, rtol=1e-9)
    assert int(np.argmax(sc.anomaly_score(x))) == 4  # one block's outlier is not drowned by the others
    with pytest.raises(S.ScoringError, match="needs the names of the 6 features"):
        S.BlockEnsemble().fit(x)


@pytest.mark.parametrize("name", ["covariance", "neighbours"])
def test_standardised_scorers_do_not_depend_on_the_units_of_a_feature(name, cohort):
    x = cohort.to_numpy()
    y = x * np.linspace(0.5, 1000.0, x.shape[1])
    a = S.make_scorer(name).fit(x).anomaly_score(x)
    b = S.make_scorer(name).fit(y).anomaly_score(y)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_rank_ensemble_of_one_member_gives_mid_rank_percentiles_on_the_fit_cohort(cohort):
    x = cohort.to_numpy()
    ens = S.RankEnsemble(members=(S.ForestScorer(seed=2),)).fit(x)
    member = S.ForestScorer(seed=2).fit(x).score_samples(x)
    ranks = np.argsort(np.argsort(member)) + 1  # 1 = lowest score_samples (most anomalous)
    np.testing.assert_allclose(ens.score_samples(x), (ranks - 0.5) / len(x) * 100)


def test_robust_z_scores_and_reasons_match_a_hand_computation():
    x = pl.DataFrame({
        "mass_abs|heart|aorta": [1.0, 2.0, 3.0, 4.0, 100.0],
        "mass_abs|heart|heart": [5.0, 5.0, 5.0, 5.0, 5.0],
        "pred_voxels|aorta": [10.0, 10.0, 10.0, 10.0, 30.0],
    })
    prof = S.RobustProfile().fit(x)
    z = prof.zscores(x)
    assert z[4, 0] == pytest.approx(97.0 / 1.4826, rel=1e-4)  # median 3, MAD 1
    assert z[4, 1] == 0.0  # constant feature: scale 1, no deviation
    sd = np.std([10, 10, 10, 10, 30], ddof=1)  # MAD 0: falls back to the standard deviation
    assert z[4, 2] == pytest.approx(20.0 / sd)
    top = prof.reasons(x, top_k=2)[4]
    assert [r.feature for r in top] == ["mass_abs|heart|aorta", "pred_voxels|aorta"]
    assert top[0].target == "heart" and top[0].roi == "aorta" and top[0].median == 3.0 and top[0].value == 100.0
    assert top[1].target == "aorta" and top[1].roi is None
    cls = prof.class_scores(x)[4]
    assert cls[0].target == "heart" and cls[0].score == pytest.approx(np.sqrt(z[4, 0] ** 2 / 2)) and cls[0].n_features == 2


def test_feature_frame_is_wide_by_kind_target_and_roi_and_leaves_out_joined_rois():
    imp = pl.DataFrame({
        "patient_id": ["a", "a", "a", "b"],
        "target": ["heart", "heart", "heart", "heart"],
        "roi": ["aorta", "lung", "aorta", "aorta"],
        "stat": ["mass", "mass", "mean", "mass"],
        "sign": ["abs", "abs", "abs", "abs"],
        "value": [0.1, 0.5, 0.01, 0.2],
    })
    pred = pl.DataFrame({"patient_id": ["a", "b"], "class": ["heart", "heart"], "voxels": [100, 120]})
    wide = S.feature_frame(imp, pred, exclude_rois=["lung"])
    assert set(wide.columns) == {"patient_id", "mass_abs|heart|aorta", "mean_abs|heart|aorta", "pred_voxels|heart"}
    names, m = S.feature_matrix(wide, "mean")
    assert names == ["mean_abs|heart|aorta"] and m[:, 0].tolist() == [0.01, 0.0]  # b has no mean row: 0
    assert S.feature_columns(wide.columns, "mass+prediction") == ["mass_abs|heart|aorta", "pred_voxels|heart"]
    with pytest.raises(S.ScoringError, match="no features of the set 'signed_mass'"):
        S.feature_matrix(wide, "signed_mass")
    with pytest.raises(S.ScoringError, match="unknown feature set"):
        S.feature_columns(wide.columns, "everything")


def test_input_features_are_their_own_kinds_and_join_the_prediction_sets():
    imp = pl.DataFrame({"patient_id": ["a", "b"], "target": ["heart"] * 2, "roi": ["aorta"] * 2,
                        "stat": ["mass"] * 2, "sign": ["abs"] * 2, "value": [0.1, 0.2]})
    pred = pl.DataFrame({"patient_id": ["a", "b"], "class": ["heart", "heart"], "voxels": [100, 120],
                         "input_mean": [0.4, None], "input_std": [0.05, None]})
    wide = S.feature_frame(imp, pred)
    assert S.feature_columns(wide.columns, "input") == ["input_mean|heart", "input_std|heart"]
    assert S.feature_columns(wide.columns, "mass+prediction") == ["mass_abs|heart|aorta", "pred_voxels|heart"]
    assert S.feature_columns(wide.columns, "mass+prediction+input") == [
        "mass_abs|heart|aorta", "pred_voxels|heart", "input_mean|heart", "input_std|heart"]
    names, m = S.feature_matrix(wide, "input")
    assert m.tolist() == [[0.4, 0.05], [0.0, 0.0]]  # b's heart was not predicted: 0, like its volume
    assert S.feature_target("input_std|heart") == "heart"


def test_the_default_ensemble_on_its_fit_cohort_is_the_mean_of_its_members_mid_rank_percentiles(cohort):
    from scipy.stats import percentileofscore

    x = cohort.to_numpy()
    members = [S.make_scorer(n, seed=3).fit(x).score_samples(x) for n in ("forest", "covariance", "neighbours")]
    expect = np.mean([percentileofscore(m, m, kind="mean") for m in members], axis=0)
    np.testing.assert_allclose(S.make_scorer("ensemble", seed=3).fit(x).score_samples(x), expect)
