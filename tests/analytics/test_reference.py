"""Parsing and importing the reference implementation's wide CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from engine import store
from engine.analytics.reference import ReferenceFormatError, parse_reference_frame, read_reference_csv
from engine.commands.import_csv import import_reference_csv
from engine.labels import THORAX_CLASSES
from tests.analytics._store import reference_csv


def test_hand_built_frame_is_melted_to_long_rows() -> None:
    wide = pl.DataFrame({
        "patient": ["p1", "p2"],
        "heart_explanation_in_heart_mass": [0.2, 0.3],
        "heart_explanation_in_vertebraes_mass": [0.1, 0.05],
        "heart_explanation_in_heart_mean": [5.0, 6.0],
        "heart_explanation_var": [1.0, 2.0],
        "heart_explanation_mean": [0.5, 0.6],
        "heart_dice": [0.9, 0.8],
        "vertebraes_dice": [0.95, 0.97],
        "heart_iou": [0.82, 0.67],
    })
    data = parse_reference_frame(wide, method="ig")
    imp = data.importances
    assert imp.height == 2 * 3
    assert set(imp["method"]) == {"ig"} and set(imp["sign"]) == {"abs"}
    assert "vertebraes" not in set(imp["roi"]) and "vertebrae" in set(imp["roi"])
    v = imp.filter((pl.col("patient_id") == "p2") & (pl.col("roi") == "vertebrae"))["value"].item()
    assert v == pytest.approx(0.05)
    pred = data.predictions
    assert set(pred["class"]) == {"heart", "vertebrae"}
    assert pred["voxels"].null_count() == pred.height
    row = pred.filter((pl.col("patient_id") == "p1") & (pl.col("class") == "heart")).row(0, named=True)
    assert row["dice"] == pytest.approx(0.9) and row["iou"] == pytest.approx(0.82)
    assert pred.filter(pl.col("class") == "vertebrae")["iou"].null_count() == 2
    assert data.summaries.height == 4  # explanation var and mean per patient


def test_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ReferenceFormatError, match="patient"):
        parse_reference_frame(pl.DataFrame({"x": [1]}))
    with pytest.raises(ReferenceFormatError, match="explanation_in"):
        parse_reference_frame(pl.DataFrame({"patient": ["a"], "heart_dice": [0.5]}))
    with pytest.raises(ReferenceFormatError, match="no file"):
        read_reference_csv(tmp_path / "missing.csv")


def test_shared_csv_parses_to_the_thorax_classes() -> None:
    data = read_reference_csv(reference_csv())
    assert len(data.patient_ids) == 32
    assert set(data.importances["target"]) == set(THORAX_CLASSES)
    assert set(data.importances["roi"]) == set(THORAX_CLASSES)
    assert data.importances.height == 32 * 17 * 17 * 2
    # the reference aggregation normalises mass over the whole volume: rows sum to 1
    sums = data.importances.filter(pl.col("stat") == "mass").group_by("patient_id", "target").agg(pl.col("value").sum())
    np.testing.assert_allclose(sums["value"].to_numpy(), 1.0, atol=1e-4)


def test_importing_the_shared_csv_gives_a_run_of_32_patients(tmp_path: Path) -> None:
    with store.open_writer(tmp_path / "s.duckdb") as s:
        run_id = import_reference_csv(s, reference_csv())
        assert run_id == "import-tsv2_test_aggregated_sg_explanations_with_dice"
        info = s.run_info(run_id)
        assert info["kind"] == "import" and info["status"] == "done"
        assert s.table_counts(run_id) == {"patients": 32, "predictions": 32 * 17, "importances": 32 * 17 * 17 * 2}
        assert s.status_counts(run_id)["done"] == 32
        pred = s.predictions(run_id)
        # re-importing replaces, never duplicates
        import_reference_csv(s, reference_csv())
        assert s.table_counts(run_id)["importances"] == 32 * 17 * 17 * 2
    fg = pred.filter(pl.col("class") != "background")
    mean_dice = fg.group_by("patient_id").agg(pl.col("dice").mean())["dice"].mean()
    assert mean_dice == pytest.approx(0.960, abs=0.001)
    assert fg["dice"].mean() == pytest.approx(0.960, abs=0.001)  # same: every patient has all classes
