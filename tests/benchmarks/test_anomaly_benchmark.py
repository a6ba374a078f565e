"""The anomaly-detection benchmark: its metrics on hand-made cases, held-out selection, and a tiny run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import polars as pl
import pytest

from tests.benchmarks.script import run_benchmark

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("anomaly_detection", ROOT / "benchmarks" / "anomaly_detection.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)  # type: ignore[union-attr]


def test_detection_metrics_match_a_hand_computed_cohort():
    # anomalies score 0.9 and 0.3; normals 0.8, 0.1, 0.2
    m = bench.detection_metrics([1, 0, 0, 1, 0], [0.9, 0.8, 0.1, 0.3, 0.2], top_fraction=0.1)
    assert m["roc_auc"] == pytest.approx(5 / 6)  # 0.9 beats 3 normals, 0.3 beats 2 of 3
    assert m["average_precision"] == pytest.approx((1 + 2 / 3) / 2)  # precision at ranks 1 and 3
    assert m["recall_top"] == 0.5  # top 10% of 5 is one patient: the 0.9 anomaly
    assert m["ranks"] == [1.0, 3.0] and m["n"] == 5
    ties = bench.detection_metrics([1, 0, 0], [0.5, 0.5, 0.1])
    assert ties["ranks"] == [1.5] and ties["roc_auc"] == pytest.approx(0.75)


def _records(aucs: dict[str, dict[str, float]]) -> pl.DataFrame:
    rows = []
    for setting, per_kind in aucs.items():
        for kind, auc in per_kind.items():
            rows.append({"setting": setting, "scorer": setting.split("/")[0], "feature_set": setting.split("/")[1],
                         "cohort_seed": 0, "scorer_seed": 0, "kind": kind, "family": "f",
                         "roc_auc": auc, "average_precision": auc, "recall_top": 1.0,
                         "ranks": [1.0 + 10 * (1 - auc)], "n": 11})
    return pl.DataFrame(rows)


def test_held_out_selection_chooses_each_kind_s_setting_on_the_other_kinds_only():
    rec = _records({
        "a/mass": {"k1": 1.0, "k2": 1.0, "k3": 0.6},
        "b/mass": {"k1": 0.6, "k2": 0.6, "k3": 0.9},
        "paper/mass": {"k1": 0.7, "k2": 0.7, "k3": 0.7},
    })
    s = bench.summarise(rec)
    # k3 held out: a scores 1.0 on k1, k2 and is chosen though b is better on k3
    assert {k: v["chosen"] for k, v in s["held_out"]["per_kind"].items()} == {"k1": "a/mass", "k2": "a/mass",
                                                                           "k3": "a/mass"}
    assert s["held_out"]["mean_roc_auc"] == pytest.approx((1.0 + 1.0 + 0.6) / 3)
    assert s["held_out"]["per_kind"]["k3"]["median_rank"] == pytest.approx(5.0)
    assert s["held_out"]["kinds_upper_half"] == 3  # rank 5 of 11 is in the upper half
    assert s["default"] == "a/mass" and s["paper"]["mean_kind_auc"] == pytest.approx(0.7)
    assert s["goal"] == {"default_mean_auc_ge_0.90": False, "default_every_kind_upper_half": False,
                         "held_out_selection_mean_auc_ge_0.90": False}  # the engine's default is not in this grid


def test_the_default_is_chosen_among_settings_that_use_the_explanation_and_the_engine_default_is_scored():
    rec = _records({
        "blocks/input": {"k1": 1.0, "k2": 1.0, "k3": 1.0},  # best, but blind to the explanation
        "blocks/mass+prediction+input": {"k1": 0.95, "k2": 0.9, "k3": 0.88},
        "neighbours/mass": {"k1": 0.7, "k2": 0.8, "k3": 0.6},
    })
    s = bench.summarise(rec)
    assert all(v["chosen"] == "blocks/input" for v in s["held_out"]["per_kind"].values())
    assert {v["chosen"] for v in s["held_out_explained"]["per_kind"].values()} == {"blocks/mass+prediction+input"}
    assert s["default"] == "blocks/mass+prediction+input" == s["engine_default"]
    assert s["engine_default_summary"]["mean_kind_auc"] == pytest.approx((0.95 + 0.9 + 0.88) / 3)
    assert s["goal"] == {"default_mean_auc_ge_0.90": True, "default_every_kind_upper_half": True,
                         "held_out_selection_mean_auc_ge_0.90": True}


def test_the_paper_mode_is_offered_on_masses_only():
    grid = bench.settings_grid(["mass", "prediction"], ["paper", "forest"])
    assert grid == [("paper", "mass"), ("forest", "mass"), ("forest", "prediction")]


@pytest.mark.slow
def test_a_quick_run_goes_through_the_engine_and_writes_every_figure(tmp_path):
    out = tmp_path / "q.json"
    proc, r = run_benchmark("anomaly_detection.py", "--quick", "--cache", str(tmp_path / "c"), out=out, timeout=1200)
    assert r["features"]["patients"] == 8 and r["kinds"] == ["missing_rescale", "situs_inversus"]
    assert set(r["settings"]) == {"paper/mass", "forest/mass", "forest/prediction", "covariance/mass",
                                  "covariance/prediction", "neighbours/mass", "neighbours/prediction",
                                  "ensemble/mass", "ensemble/prediction", "blocks/mass", "blocks/prediction"}
    for v in r["held_out"]["per_kind"].values():
        assert v["chosen"] in r["settings"] and 0.0 <= v["roc_auc"] <= 1.0 and v["cohort_size"] == 7
        assert 1.0 <= v["median_rank"] <= 7.0
    assert r["paper"]["setting"] == "paper/mass" and set(r["reasons"]) == set(r["kinds"])
    cached = list((tmp_path / "c").glob("features-*/features.parquet"))
    assert len(cached) == 1 and pl.read_parquet(cached[0]).height == 8
