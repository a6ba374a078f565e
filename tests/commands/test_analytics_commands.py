"""The analytics commands, called in-process through ``engine.cli.main``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from engine import cli, store
from engine.analytics.graph import global_matrix, select_edges
from tests.analytics._store import RUN_ID, analytics_store, reference_csv  # noqa: F401 - fixture


@pytest.fixture()
def db(analytics_store: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A private copy of the shared test store (commands write to it)."""
    path = tmp_path / "copy.duckdb"
    shutil.copy(analytics_store, path)
    return path


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_import_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "new.duckdb"
    assert cli.main(["import-csv", str(reference_csv()), "--run-id", "tsv2", "--db", str(db)]) == 0
    assert "32 patients" in capsys.readouterr().out
    with store.open(db) as s:
        assert s.run_info("tsv2")["kind"] == "import"
    assert cli.main(["import-csv", str(tmp_path / "nope.csv"), "--db", str(db)]) == 2
    assert "no file" in _error(capsys)


def test_anomaly_audit_graph(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["anomaly", "--run", RUN_ID, "--seed", "3", "--n-estimators", "20", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "within-run" in out and "Spearman" in out and "blocks on mass+prediction+input" in out
    with store.open(db) as s:
        models = s.frame("SELECT * FROM anomaly_models WHERE seed = 3")
        assert models.height == 1 and models["spearman_dice"][0] is not None
        top = s.top_anomalies(RUN_ID, k=1)
        reasons = s.anomaly_reasons(RUN_ID).filter(pl.col("patient_id") == top["patient_id"][0]).sort("rank")
    first = reasons.row(0, named=True)  # the printed line of the top patient holds its score and first reason
    line = next(x for x in out.splitlines() if x.strip().startswith(f"{top['patient_id'][0]} "))
    assert first["kind"] == "mass_abs" and f"{top['score'][0]:.3f}" in line
    assert f"{top['score'][0]:.3f}  {first['target']} in {first['roi']} (z {first['z']:+.1f})" in line

    assert cli.main(["audit", "--run", RUN_ID, "--by", "sex,age", "--n-boot", "20", "--format", "csv", "--all",
                     "--out", str(tmp_path / "audit.csv"), "--db", str(db)]) == 0
    res = pl.read_csv(tmp_path / "audit.csv")
    assert set(res["column"]) == {"sex", "age"} and "outlier" in set(res["family"])
    with store.open(db) as s:
        assert s.audits(RUN_ID).height == 2 * (17 * 17 + 1)

    out_dir = tmp_path / "graph"
    assert cli.main(["graph", "--run", RUN_ID, "--rule", "cumulative", "--threshold", "0.35",
                     "--out", str(out_dir), "--save", "--db", str(db)]) == 0
    doc = json.loads((out_dir / "graph.json").read_text())
    with store.open(db) as s:
        expected = select_edges(global_matrix(s.importances(RUN_ID)), rule="cumulative", threshold=0.35)
        assert len(doc["edges"]) == expected.height > 0
        assert s.graph_edges(RUN_ID).height == expected.height
    assert (out_dir / "graph.graphml").exists() and (out_dir / "graph.png").exists()
    assert cli.main(["graph", "--run", RUN_ID, "--by", "sex", "--rule", "topk", "--k", "2",
                     "--figure-format", "svg", "--out", str(out_dir), "--db", str(db)]) == 0
    assert (out_dir / "graph_sex_F.svg").exists() and (out_dir / "graph_sex_M.json").exists()


def test_paper_settings_roi_sets_and_the_union_rule_from_the_command_line(
        db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["anomaly", "--run", RUN_ID, "--settings", "paper", "--n-estimators", "20", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "(z " in out  # the top patients' reasons are printed
    with store.open(db) as s:
        model = s.frame("SELECT * FROM anomaly_models WHERE seed = 123")
        params = json.loads(model["params"][0])
        assert params["settings"] == "paper" and params["rois"] == "parts" and params["dice_classes"] == "all"
        assert "heart" in params["spearman_per_class"]
        reasons = s.anomaly_reasons(RUN_ID, model["model_id"][0])
        assert reasons.height > 0 and set(reasons["rank"]) <= {1, 2, 3}
    assert cli.main(["audit", "--run", RUN_ID, "--by", "sex", "--outlier-rule", "union", "--n-boot", "5",
                     "--db", str(db)]) == 0
    with store.open(db) as s:
        params = json.loads(s.audits(RUN_ID)["params"][0])
        assert params["outlier_rule"] == "union" and params["rois"] == "parts" and params["missing"] == {"sex": 0}
    assert cli.main(["graph", "--run", RUN_ID, "--rois", "joined", "--out", str(tmp_path / "g"), "--db", str(db)]) == 0
    doc = json.loads((tmp_path / "g" / "graph.json").read_text())
    assert doc["params"]["rois"] == "joined"


def test_query_command_formats(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["query", "list", "--db", str(db)]) == 0
    assert "top_anomalies" in capsys.readouterr().out
    assert cli.main(["query", "top_anomalies", "--param", "k=4", "--format", "json", "--db", str(db)]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert cli.main(["query", "run_status", "--format", "csv", "--db", str(db)]) == 0
    assert capsys.readouterr().out.startswith("run_id,run_status,status")
    pq = tmp_path / "m.parquet"
    assert cli.main(["query", "global_matrix", "--format", "parquet", "--out", str(pq), "--db", str(db)]) == 0
    assert pl.read_parquet(pq).height == 17 * 17
    assert cli.main(["query", "self_importance", "--db", str(db)]) == 0
    assert "lung" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["query", "nope"], "unknown query 'nope'"),
        (["query", "top_anomalies", "-p", "k=many"], "must be an integer"),
        (["query", "subgroup_difference"], "needs parameter 'column'"),
        (["query", "global_matrix", "--format", "parquet"], "--out"),
        (["query", "run_status", "-p", "run_id=zzz"], "run 'zzz' is not in"),
        (["anomaly", "--run", "zzz"], "run 'zzz' is not in"),
        (["audit", "--run", RUN_ID, "--by", "scanner"], "column 'scanner' is not in"),
        (["audit", "--run", RUN_ID, "--by", "run_id"], "not in the patients' metadata"),
        (["graph", "--run", "zzz", "--out", "unused"], "run 'zzz' is not in"),
    ],
)
def test_user_errors_exit_2_on_one_line(db: Path, argv: list[str], message: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*argv, "--db", str(db)]) == 2
    assert message in _error(capsys)


def test_audit_single_group_column(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # among patients with a value, 'site' has groups a, b, c, d: fine; a constant column is refused
    with store.open_writer(db) as s:
        s.con.execute("UPDATE patients SET metadata = json_object('scanner', 'X') WHERE run_id = ?", [RUN_ID]).fetchall()
    assert cli.main(["audit", "--run", RUN_ID, "--by", "scanner", "--n-boot", "5", "--db", str(db)]) == 2
    assert "single group" in _error(capsys)


def test_sql_command(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["sql", "SELECT count(*) AS n FROM patients", "--format", "csv", "--db", str(db)]) == 0
    assert capsys.readouterr().out.split() == ["n", "35"]
    assert cli.main(["sql", "DROP TABLE runs", "--db", str(db)]) == 2
    assert "read-only" in _error(capsys)
    assert cli.main(["sql", "SELECT 1; SELECT 2", "--db", str(db)]) == 2
    assert "one SQL statement" in _error(capsys)
    assert cli.main(["sql", "SELECT * FROM nowhere", "--db", str(db)]) == 2
    assert "the query failed" in _error(capsys)


def test_the_demo_printout_shows_each_top_patients_reasons_under_its_score(
        db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.commands.demo import print_top_anomalies

    print_top_anomalies(db, RUN_ID, k=2)
    lines = capsys.readouterr().out.splitlines()
    with store.open(db) as s:
        top = s.top_anomalies(RUN_ID, k=2)
        reasons = s.anomaly_reasons(RUN_ID)
    for pid in top["patient_id"]:
        i = next(n for n, x in enumerate(lines) if x.strip().startswith(f"{pid}  score"))
        first = reasons.filter(pl.col("patient_id") == pid).sort("rank").row(0, named=True)
        assert lines[i + 1].strip().startswith(f"why: {first['target']} in {first['roi']} (z {first['z']:+.1f})")


def test_a_runs_anomaly_table_chooses_the_scorer_feature_set_and_reasons(db: Path) -> None:
    from engine.jobs import JobSpec
    from engine.runtime.runner import _score_anomalies

    spec = JobSpec.from_dict({"job": {"name": "j"}, "cohort": {"phantoms": 2}, "model": {"kind": "demo"},
                              "attribution": {"method": "smoothgrad"},
                              "anomaly": {"scorer": "forest", "feature_set": "mass", "top_k_reasons": 2,
                                          "seed": 5, "n_estimators": 10}})
    with store.open_writer(db, live=False) as s:
        model_id = _score_anomalies(s, spec, RUN_ID)
        model = s.anomaly_model(model_id)
        reasons = s.anomaly_reasons(RUN_ID, model_id)
    assert (model["scorer"], model["feature_set"], model["seed"]) == ("forest", "mass", 5)
    assert model["params"]["scorer_params"] == {"n_estimators": 10, "seed": 5}
    assert set(reasons["rank"]) == {1, 2} and set(reasons["kind"]) == {"mass_abs"}


def test_the_anomaly_commands_help_names_the_scoring_modules_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from engine.analytics.scoring import DEFAULT_SETTING, FEATURE_SETS, SCORERS

    with pytest.raises(SystemExit):
        cli.main(["anomaly", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"default '{DEFAULT_SETTING[0]}'" in text and f"default '{DEFAULT_SETTING[1]}'" in text
    assert all(name in text for name in (*SCORERS, *FEATURE_SETS))


def test_a_misspelt_scorer_on_the_command_line_is_one_line_with_a_suggestion(
        db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["anomaly", "--run", RUN_ID, "--scorer", "neighbors", "--db", str(db)]) == 2
    assert "did you mean 'neighbours'" in _error(capsys)


def test_auditing_a_bf16_run_says_borderline_tests_can_change(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # an exact run gets no note
    assert cli.main(["audit", "--run", RUN_ID, "--by", "sex", "--n-boot", "5", "--db", str(db)]) == 0
    assert "autocast" not in capsys.readouterr().out
    # the same run recorded as computed under bf16 autocast
    with store.open_writer(db) as s:
        config = s.run_info(RUN_ID)["config"] or {}
        config["explainer"] = {**(config.get("explainer") or {}), "autocast": "bfloat16"}
        s.con.execute("UPDATE runs SET config = ? WHERE run_id = ?", [json.dumps(config), RUN_ID])
    assert cli.main(["audit", "--run", RUN_ID, "--by", "sex", "--n-boot", "5", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "computed under bfloat16 autocast" in out and "rerun the job without `autocast`" in out
