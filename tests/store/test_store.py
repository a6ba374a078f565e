"""The store's writer and readers: retries, failures, metadata, schema versions, lazy reads."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from engine import store
from engine.errors import QueryError
from engine.results import PatientResult
from tests.store._rows import ROWS_PER_PATIENT, manifest, result

RUN = "r1"


@pytest.fixture()
def writer(tmp_path: Path):
    s = store.open_writer(tmp_path / "s.duckdb", live=False)
    s.create_run(RUN, config={})
    s.register_patients(RUN, manifest(["p1", "p2", "p3"]))
    yield s
    s.close()


def _counts(s: store.Store, pid: str) -> tuple[int, int]:
    imp = s._rows("SELECT count(*) FROM importances WHERE run_id = ? AND patient_id = ?", [RUN, pid])[0][0]
    pred = s._rows("SELECT count(*) FROM predictions WHERE run_id = ? AND patient_id = ?", [RUN, pid])[0][0]
    return imp, pred


# ---------------------------------------------------------------------- storage (issue 13, item 1)


def test_a_retried_patient_leaves_exactly_one_set_of_rows(writer: store.Store) -> None:
    writer.write_patient(RUN, result("p1", seed=1))
    writer.write_patient(RUN, result("p1", seed=2))
    assert _counts(writer, "p1") == (ROWS_PER_PATIENT, 4)
    values = writer.importances(RUN).filter(pl.col("patient_id") == "p1").sort("target", "roi", "stat", "sign")
    expected = result("p1", seed=2).importances.sort("target", "roi", "stat", "sign")
    assert values["value"].to_list() == expected["value"].to_list()  # the second attempt's rows, exactly
    assert writer.verify_unique(RUN)["duplicate_keys"] == 0
    assert writer.patients(RUN).filter(pl.col("patient_id") == "p1")["attempts"].item() == 2


def test_a_patient_that_never_had_rows_is_appended_without_a_delete(writer: store.Store, monkeypatch) -> None:
    deleted: list[str] = []
    real = writer._delete_patient_rows
    monkeypatch.setattr(writer, "_delete_patient_rows", lambda run, pid, methods=None: (deleted.append(pid),
                                                                                      real(run, pid, methods)))
    writer.write_patient(RUN, result("p1"))
    writer.mark_failed(RUN, "p2", error="VolumeError: unreadable")
    writer.write_patient(RUN, result("p2"))  # failed before: it has no rows, nothing to delete
    assert deleted == []
    writer.write_patient(RUN, result("p1", seed=3))  # done before: its rows are replaced
    assert deleted == ["p1"]


def test_finished_at_is_recorded_in_utc_for_done_and_failed_patients(writer: store.Store) -> None:
    before = datetime.now(timezone.utc)
    writer.write_patient(RUN, result("p1"))
    writer.mark_failed(RUN, "p2", error="VolumeError: unreadable")
    p = {r["patient_id"]: r for r in writer.patients(RUN).iter_rows(named=True)}
    for pid in ("p1", "p2"):
        assert p[pid]["finished_at"] is not None
        assert p[pid]["finished_at"] >= before
    assert p["p3"]["finished_at"] is None  # still pending


def test_finish_run_checks_uniqueness_once_and_names_a_duplicate(writer: store.Store) -> None:
    writer.write_patient(RUN, result("p1"))
    writer.finish_run(RUN, status="partial")
    check = writer.run_info(RUN)["report"]["uniqueness"]
    assert check["duplicate_keys"] == 0 and check["rows"] == ROWS_PER_PATIENT
    # a row copied behind the writer's back is found and named
    writer._exec("INSERT INTO importances SELECT * FROM importances WHERE patient_id = 'p1' "
                 "AND target = 'aorta' AND roi = 'heart' AND stat = 'mass' AND sign = 'abs'")
    with pytest.raises(store.StoreError, match=r"1 duplicated importance key.*'p1'.*aorta/heart/mass/abs x2"):
        writer.finish_run(RUN, status="done")
    assert writer.run_info(RUN)["status"] == "duplicates"


def test_importances_table_has_no_key_index(writer: store.Store) -> None:
    constraints = writer._rows("SELECT constraint_type FROM duckdb_constraints() WHERE table_name = 'importances' "
                               "AND constraint_type IN ('PRIMARY KEY', 'UNIQUE')")
    indexes = writer._rows("SELECT index_name FROM duckdb_indexes() WHERE table_name = 'importances'")
    assert constraints == [] and indexes == []


@pytest.mark.parametrize(("version", "message"), [
    ("2", "holds store schema 2, this engine reads schema 5: re-run the job"),
    ("6", "holds store schema 6, this engine reads schema 5: upgrade the engine"),
])
def test_a_store_of_another_schema_version_is_refused_in_one_line(tmp_path: Path, version: str, message: str) -> None:
    db = tmp_path / "old.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', ?)", [version])
    con.close()
    for opener in (store.open, store.open_writer):
        with pytest.raises(store.StoreError, match=message) as err:
            opener(db)
        assert "\n" not in str(err.value) and str(db) in str(err.value)


def _as_schema_3(db: Path) -> None:
    """Turn a new store back into what schema 3 wrote: no input columns, no patient_id index."""
    con = duckdb.connect(str(db))
    con.execute("DROP VIEW patient_dice")
    con.execute("DROP INDEX patients_patient_id")
    con.execute("ALTER TABLE predictions DROP COLUMN input_mean")
    con.execute("ALTER TABLE predictions DROP COLUMN input_std")
    con.execute("ALTER TABLE predictions DROP COLUMN input_local")
    con.execute("CREATE VIEW patient_dice AS SELECT run_id, patient_id, avg(dice) AS mean_dice, count(dice) AS n_classes "
                "FROM predictions WHERE class <> 'background' AND dice IS NOT NULL GROUP BY run_id, patient_id")
    con.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    con.close()


def _store_with_one_of_two_patients(db: Path) -> Path:
    """A new store whose run registered p1 and p2 and holds p1's results."""
    with store.open_writer(db, live=False) as w:
        w.create_run(RUN, config={}, job_name="t")
        w.register_patients(RUN, pl.DataFrame({"patient_id": ["p1", "p2"], "image_path": ["a", "b"]}))
        w.write_patient(RUN, result("p1"))
    return db


def test_a_schema_3_store_is_upgraded_in_place_by_a_writer_and_keeps_its_rows(tmp_path: Path) -> None:
    db = _store_with_one_of_two_patients(tmp_path / "v3.duckdb")
    _as_schema_3(db)
    with pytest.raises(store.StoreError, match="schema 3, this engine reads schema 5: open it once for writing") as err:
        store.open(db)
    assert "\n" not in str(err.value)
    with store.open_writer(db, live=False) as w:  # the upgrade
        cols = w.sql("SELECT column_name FROM information_schema.columns WHERE table_name = 'predictions'")
        assert {"input_mean", "input_std", "input_local"} <= set(cols["column_name"].to_list())
        assert w.sql("SELECT value FROM meta WHERE key = 'schema_version'").item() == "5"
        assert w._rows("SELECT index_name FROM duckdb_indexes() WHERE table_name = 'patients'") == [
            ("patients_patient_id",)]
        w.write_patient(RUN, result("p2"))  # the run goes on after the upgrade
    with store.open(db) as s:
        assert s.table_counts(RUN)["importances"] == 2 * result("p1").importances.height
        wide = s.prediction_wide(RUN)
        assert wide.height == 2 and wide["input_mean|heart"].null_count() == 2  # not computed before


def test_a_schema_4_store_gains_the_local_contrast_column_and_keeps_its_rows(tmp_path: Path) -> None:
    db = _store_with_one_of_two_patients(tmp_path / "v4.duckdb")
    con = duckdb.connect(str(db))
    con.execute("ALTER TABLE predictions DROP COLUMN input_local")
    con.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(store.StoreError, match="schema 4, this engine reads schema 5"):
        store.open(db)
    with store.open_writer(db, live=False) as w:
        assert w.sql("SELECT value FROM meta WHERE key = 'schema_version'").item() == "5"
        w.write_patient(RUN, result("p2"))
    with store.open(db) as s:
        wide = s.prediction_wide(RUN)
        assert wide.height == 2 and wide["pred_voxels|heart"].null_count() == 0  # the old row is kept
        assert wide["input_local|heart"].null_count() == 2  # the fixture's results do not carry it


def test_a_duckdb_file_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE t (a INT)")
    con.close()
    with pytest.raises(store.StoreError, match="is not an agg2exp store"):
        store.open_writer(db)


# ---------------------------------------------------------------------- edge cases (issue 11, item 8)


def test_a_patient_going_from_done_to_failed_loses_its_rows(writer: store.Store) -> None:
    writer.write_patient(RUN, result("p1"))
    writer.write_patient(RUN, result("p2"))
    writer.mark_failed(RUN, "p1", error="worker died 3 times")
    assert _counts(writer, "p1") == (0, 0)
    assert _counts(writer, "p2") == (ROWS_PER_PATIENT, 4)
    assert writer.importances(RUN)["patient_id"].unique().to_list() == ["p2"]


def test_failing_after_done_is_one_transaction(writer: store.Store, monkeypatch) -> None:
    writer.write_patient(RUN, result("p1"))
    real = writer._exec

    def failing_update(query: str, params=None):
        if query.startswith("UPDATE patients SET status = 'failed'"):
            raise RuntimeError("disk full")
        return real(query, params)

    monkeypatch.setattr(writer, "_exec", failing_update)
    with pytest.raises(RuntimeError):
        writer.mark_failed(RUN, "p1", error="x")
    monkeypatch.undo()
    assert _counts(writer, "p1") == (ROWS_PER_PATIENT, 4)  # the delete was rolled back with the update
    assert writer.status_counts(RUN)["done"] == 1


def test_metadata_named_like_bookkeeping_columns_is_kept(tmp_path: Path) -> None:
    with store.open_writer(tmp_path / "s.duckdb", live=False) as s:
        s.create_run(RUN, config={})
        s.register_patients(RUN, manifest(["p1", "p2"], status=["inpatient", "outpatient"], seconds=[10, 20],
                                          site=["A", "B"]))
        s.write_patient(RUN, result("p1"))
        meta = s.patient_metadata(RUN, status=None).sort("patient_id")
        assert meta.columns == ["patient_id", "status", "seconds", "site"]
        assert meta["status"].to_list() == ["inpatient", "outpatient"]
        assert meta["seconds"].to_list() == [10, 20]
        assert s.patient_metadata(RUN)["patient_id"].to_list() == ["p1"]  # done patients by default
        wide = s.patients(RUN).sort("patient_id")
        assert wide["status"].to_list() == ["done", "pending"]  # bookkeeping untouched
        assert wide["meta_status"].to_list() == ["inpatient", "outpatient"]
        assert wide["meta_seconds"].to_list() == [10, 20]
        assert wide["seconds"].to_list() == [1.0, None]


def test_registering_a_patient_again_refreshes_its_metadata_and_keeps_its_results(writer: store.Store) -> None:
    writer.write_patient(RUN, result("p1"))
    added = writer.register_patients(RUN, manifest(["p1", "p4"], age=[50, 60]))
    assert added == 1
    meta = writer.patient_metadata(RUN, status=None).sort("patient_id")
    assert meta.filter(pl.col("patient_id") == "p1")["age"].item() == 50
    assert writer.status_counts(RUN) == {"pending": 3, "running": 0, "done": 1, "failed": 0}
    assert _counts(writer, "p1") == (ROWS_PER_PATIENT, 4)


def test_a_duplicate_key_inside_one_result_is_named_and_nothing_is_written(writer: store.Store) -> None:
    good = result("p1")
    dup = PatientResult(patient_id="p1", importances=pl.concat([good.importances, good.importances.head(1)]),
                        predictions=good.predictions)
    with pytest.raises(store.StoreError, match=r"patient 'p1'.*\(patient_id='p1', method='smoothgrad', "
                                               r"target='aorta', roi='background', stat='mass', sign='abs'\) appears 2 times"):
        writer.write_patient(RUN, dup)
    assert _counts(writer, "p1") == (0, 0)
    assert writer.status_counts(RUN)["pending"] == 3


def test_an_unknown_stat_is_refused_by_name(writer: store.Store) -> None:
    bad = result("p1")
    bad = PatientResult("p1", bad.importances.with_columns(pl.lit("median").alias("stat")), bad.predictions)
    with pytest.raises(store.StoreError, match=r"unknown stat value\(s\) \['median'\]"):
        writer.write_patient(RUN, bad)


def test_a_manifest_listing_a_patient_twice_is_refused(writer: store.Store) -> None:
    with pytest.raises(store.StoreError, match=r"lists patient\(s\) \['p9'\] more than once"):
        writer.register_patients(RUN, manifest(["p9", "p9"]))


def test_importing_frames_replaces_the_run(tmp_path: Path) -> None:
    imp = result("a").importances.with_columns(pl.lit("a").alias("patient_id"))
    pred = result("a").predictions.with_columns(pl.lit("a").alias("patient_id"))
    with store.open_writer(tmp_path / "s.duckdb", live=False) as s:
        s.import_frames("imp", importances=imp, predictions=pred, metadata=pl.DataFrame({"patient_id": ["a"],
                                                                                          "sex": ["F"]}))
        s.import_frames("imp", importances=imp, predictions=pred)
        assert s.table_counts("imp") == {"patients": 1, "predictions": 4, "importances": ROWS_PER_PATIENT}
        assert s.run_info("imp")["report"]["uniqueness"]["duplicate_keys"] == 0


# ---------------------------------------------------------------------- readers (issue 12, item 3)


def test_patient_dice_view_is_the_mean_over_foreground_classes(writer: store.Store) -> None:
    writer.write_patient(RUN, result("p1"))
    dice = writer.patient_dice(RUN)
    assert dice["mean_dice"].item() == pytest.approx((0.8 + 0.9 + 0.7) / 3)


def test_lazy_importances_push_filters_and_columns_down_to_duckdb(tmp_path: Path, monkeypatch) -> None:
    with store.open_writer(tmp_path / "s.duckdb", live=False) as w:
        w.create_run(RUN, config={})
        w.register_patients(RUN, manifest(["p1", "p2"]))
        w.write_patient(RUN, result("p1"))
        w.write_patient(RUN, result("p2", seed=5))
    pushed: list[str] = []
    rel_cls = duckdb.DuckDBPyRelation
    real_filter, real_project = rel_cls.filter, rel_cls.project
    monkeypatch.setattr(rel_cls, "filter", lambda self, expr: (pushed.append(f"filter {expr}"), real_filter(self, expr))[1])
    monkeypatch.setattr(rel_cls, "project", lambda self, *a, **k: (pushed.append(f"project {a[0]}"),
                                                                   real_project(self, *a, **k))[1])
    with store.open(tmp_path / "s.duckdb") as s:
        lf = s.importances(RUN, lazy=True)
        assert isinstance(lf, pl.LazyFrame)
        out = lf.filter((pl.col("patient_id") == "p2") & (pl.col("target") == "heart")).select("roi", "value").collect()
        eager = s.importances(RUN).filter((pl.col("patient_id") == "p2") & (pl.col("target") == "heart"))
    assert out.height == eager.height == ROWS_PER_PATIENT // 3
    assert sorted(out["value"].to_list()) == sorted(eager["value"].to_list())
    assert any(p.startswith("filter") and "p2" in p and "heart" in p for p in pushed), pushed
    assert any(p.startswith("project") and "value" in p and "target" not in p.split("project", 1)[1].split(",")[0]
               for p in pushed), pushed


def test_sql_refuses_writes_with_one_line(writer: store.Store) -> None:
    with pytest.raises(QueryError, match="read-only"):
        writer.sql("DELETE FROM runs")
    with pytest.raises(QueryError, match="the query failed: .*nowhere"):
        writer.sql("SELECT * FROM nowhere")
    assert writer.sql("SELECT count(*) AS n FROM patients WHERE run_id = $r", {"r": RUN})["n"].item() == 3


def test_results_and_pipeline_do_not_import_duckdb() -> None:
    code = "import sys, engine.results, engine.pipeline; print('duckdb' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_store_imports_nothing_above_it() -> None:
    code = ("import sys, engine.store; print(sorted(m for m in sys.modules if m.startswith('engine.') "
            "and m not in ('engine.errors', 'engine.results', 'engine.store', 'engine.store_live', 'engine.vocabulary')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_prediction_wide_pivots_voxels_confidence_and_entropy_of_done_patients(writer: store.Store) -> None:
    import dataclasses

    r1 = result("p1")
    r1 = dataclasses.replace(r1, predictions=r1.predictions.with_columns(
        pl.Series("confidence", [0.99, 0.5, None, 0.7]), pl.Series("entropy", [0.01, 0.6, None, 0.4])))
    writer.write_patient(RUN, r1)
    writer.write_patient(RUN, result("p2"))  # written before confidence existed: nulls
    wide = writer.prediction_wide(RUN)
    assert wide["patient_id"].to_list() == ["p1", "p2"]
    row = wide.row(0, named=True)
    assert row["pred_voxels|heart"] == 20.0 and row["pred_confidence|aorta"] == 0.5
    assert row["pred_entropy|trachea"] == 0.4 and row["pred_confidence|heart"] is None
    assert wide.row(1, named=True)["pred_entropy|background"] is None
    assert wide.row(1, named=True)["pred_voxels|trachea"] == 30.0


def test_prediction_wide_holds_the_input_statistics_of_each_class(writer: store.Store) -> None:
    import dataclasses

    r1 = result("p1")
    r1 = dataclasses.replace(r1, predictions=r1.predictions.with_columns(
        pl.Series("input_mean", [0.1, 0.6, None, 0.3]), pl.Series("input_std", [0.01, 0.2, None, 0.05])))
    writer.write_patient(RUN, r1)
    row = writer.prediction_wide(RUN).row(0, named=True)
    classes = r1.predictions["class"].to_list()
    assert row[f"input_mean|{classes[1]}"] == 0.6 and row[f"input_std|{classes[3]}"] == 0.05
    assert row[f"input_mean|{classes[2]}"] is None


def test_prediction_wide_holds_the_local_contrast_of_each_class(writer: store.Store) -> None:
    import dataclasses

    r1 = result("p1")
    r1 = dataclasses.replace(r1, predictions=r1.predictions.with_columns(
        pl.Series("input_local", [0.2, 0.9, None, 0.4])))
    writer.write_patient(RUN, r1)
    row = writer.prediction_wide(RUN).row(0, named=True)
    classes = r1.predictions["class"].to_list()
    assert row[f"input_local|{classes[1]}"] == 0.9 and row[f"input_local|{classes[2]}"] is None


# ---------------------------------------------------------------------- Fig. 3's statistics, pushed down


def _box_store(tmp_path: Path) -> tuple[store.Store, pl.DataFrame]:
    """A run of 60 done patients and one failed one, values with outliers and a null; and every done row."""
    rng = np.random.default_rng(11)
    ids = [f"p{i:02d}" for i in range(61)]
    w = store.open_writer(tmp_path / "box.duckdb", live=False)
    w.create_run("r", config={})
    w.register_patients("r", manifest(ids))
    for i, pid in enumerate(ids[:60]):
        res = result(pid, seed=i)
        v = rng.lognormal(-3.0, 1.0, res.importances.height)
        v[rng.random(v.size) < 0.05] *= 40  # far outliers beyond the whiskers
        imp = res.importances.with_columns(pl.Series("value", v))
        if i == 5:
            imp = imp.with_columns(pl.when(pl.col("roi") == "heart").then(None).otherwise(pl.col("value")).alias("value"))
        w.write_patient("r", PatientResult(patient_id=pid, importances=imp, predictions=res.predictions))
    w.mark_failed("r", ids[60], error="unreadable")
    done = w.importances("r").filter(pl.col("patient_id").is_in(ids[:60]))
    return w, done


def test_the_stores_box_statistics_are_matplotlibs(tmp_path: Path) -> None:
    from matplotlib import cbook

    w, done = _box_store(tmp_path)
    with w:
        got = w.importance_box_stats("r", method="smoothgrad", sign="pos", stat="mass")
    want = done.filter((pl.col("sign") == "pos") & (pl.col("stat") == "mass")).drop_nulls("value")
    assert got.height == want.select("target", "roi").n_unique() == 12
    for row in got.iter_rows(named=True):
        v = want.filter((pl.col("target") == row["target"]) & (pl.col("roi") == row["roi"]))["value"].to_numpy()
        (ref,) = cbook.boxplot_stats(v)  # matplotlib's own definition, on the raw values
        assert row["n"] == v.size == (59 if row["roi"] == "heart" else 60)
        for key in ("q1", "med", "q3", "whislo", "whishi"):
            assert row[key] == pytest.approx(float(ref[key]), rel=1e-12), (row["target"], row["roi"], key)
        assert (row["vmin"], row["vmax"]) == (v.min(), v.max())
    assert (got["whishi"] < got["vmax"]).any()  # the outliers lie beyond the whiskers somewhere


def test_the_dots_are_the_same_drawn_patients_in_every_box(tmp_path: Path) -> None:
    w, _ = _box_store(tmp_path)
    with w:
        dots = w.importance_points("r", method="smoothgrad", patients=7, seed=3)
        again = w.importance_points("r", method="smoothgrad", patients=7, seed=3)
        other = w.importance_points("r", method="smoothgrad", patients=7, seed=4)
        everyone = w.importance_points("r", method="smoothgrad", patients=1000)
    drawn = set(dots["patient_id"])
    assert len(drawn) == 7 and "p60" not in drawn  # done patients only
    assert all(set(g["patient_id"]) == drawn for _, g in dots.group_by("target", "roi") if g.height == 7)
    assert dots.equals(again) and set(other["patient_id"]) != drawn
    assert everyone["patient_id"].n_unique() == 60


def test_an_eager_read_of_too_many_rows_says_to_read_lazily(writer: store.Store) -> None:
    """A notebook's ``importances(run)`` on a 100,000-patient run took 24 GB before the kernel killed it."""
    writer.write_patient(RUN, result("p1"))
    n = writer.table_counts(RUN)["importances"]
    assert n > 10
    with pytest.raises(store.StoreError, match=rf"run '{RUN}' holds {n:,} importance rows .* max_rows=10; "
                                               r"read it lazily and filter, e\.g\. importances\(run_id, lazy=True\)"):
        writer.importances(RUN, max_rows=10)
    with pytest.raises(store.StoreError, match="the store holds"):
        writer.importances(max_rows=10)
    assert writer.importances(RUN, max_rows=None).height == n == writer.importances(RUN, max_rows=n).height
    assert writer.importances(RUN, lazy=True, max_rows=10).collect().height == n  # lazy reads are not capped
