"""Named queries: headers, parameter binding, and every query run against a real store."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from engine import queries, store
from engine.errors import QueryError, UserError
from tests.analytics._store import RUN_ID, analytics_store  # noqa: F401 - fixture

PARAMS: dict[str, dict[str, str]] = {
    "top_anomalies": {"k": "5"},
    "self_importance": {},
    "global_matrix": {},
    "high_dice_anomalies": {"min_dice": "0.9", "min_percentile": "0.5"},
    "subgroup_difference": {"column": "sex", "group_a": "F", "group_b": "M"},
    "run_status": {},
}


def test_required_queries_exist_with_headers() -> None:
    qs = queries.load_queries()
    assert set(PARAMS) <= set(qs)
    for q in qs.values():
        assert q.answers and q.path is not None and q.path.suffix == ".sql"
        assert "$" not in q.answers
    top = qs["top_anomalies"]
    assert [(p.name, p.type, p.default) for p in top.params] == [("run_id", "string", "latest run"),
                                                                 ("k", "integer", 10)]
    assert [p.name for p in qs["subgroup_difference"].params if p.required] == ["column", "group_a", "group_b"]


@pytest.mark.parametrize("name", sorted(queries.load_queries()))
def test_every_query_runs_on_the_store(name: str, analytics_store: Path) -> None:  # noqa: F811
    with store.open(analytics_store) as s:
        df = queries.run_query(s, name, PARAMS.get(name, {}))
    assert df.height > 0, name


def test_query_results_are_right(analytics_store: Path) -> None:  # noqa: F811
    with store.open(analytics_store) as s:
        top = queries.run_query(s, "top_anomalies", {"k": 3, "run_id": RUN_ID})
        scores = s.anomaly_model_scores(RUN_ID).filter(pl.col("target") == "__mean__").sort(
            ["score", "patient_id"], descending=[True, False])
        assert top["patient_id"].to_list() == scores["patient_id"][:3].to_list()
        assert top["rank"].to_list() == [1, 2, 3] and '"sex"' in top["metadata"][0]
        reasons = s.anomaly_reasons(RUN_ID)
        for pid, text in zip(top["patient_id"], top["reasons"]):
            mine = reasons.filter(pl.col("patient_id") == pid).sort("rank")
            if mine.height == 0:
                assert text is None
            else:  # the stored reasons, in rank order, as "<target> in <roi> (z <signed z>)"
                first = mine.row(0, named=True)
                assert text.startswith(f"{first['target']} in {first['roi']} (z {first['z']:+.1f})")
                assert text.count(" in ") == mine.height

        diff = queries.run_query(s, "subgroup_difference", PARAMS["subgroup_difference"])
        imp = s.importances(RUN_ID).filter((pl.col("sign") == "abs") & (pl.col("stat") == "mass"))
        sex = s.patients(RUN_ID).select("patient_id", "sex")
        means = imp.join(sex, on="patient_id").group_by("target", "roi", "sex").agg(pl.col("value").mean())
        row = diff.row(0, named=True)
        get = lambda g: means.filter((pl.col("target") == row["target"]) & (pl.col("roi") == row["roi"])  # noqa: E731
                                     & (pl.col("sex") == g))["value"].item()
        assert row["mean_a"] == pytest.approx(get("F")) and row["mean_b"] == pytest.approx(get("M"))
        assert row["n_a"] == 17 and row["n_b"] == 17  # 16 + 1 synthetic each
        assert diff.height == 17 * 17

        status = queries.run_query(s, "run_status", {})
        counts = dict(zip(status["status"], status["patients"]))
        assert counts == {"done": 34, "failed": 1}
        failed = status.filter(pl.col("status") == "failed")["failures"].item()
        assert failed.startswith("syn3: VolumeError")

        selfimp = queries.run_query(s, "self_importance", {})
        assert selfimp.height == 17 and (selfimp["q25"] <= selfimp["median"]).all()
        gm = queries.run_query(s, "global_matrix", {"stat": "mean"})
        assert gm.height == 17 * 17

        hd = queries.run_query(s, "high_dice_anomalies", {"min_dice": 0.95, "min_percentile": 0.0, "k": 100})
        assert (hd["mean_dice"] >= 0.95).all()
        assert hd["score"].to_list() == sorted(hd["score"].to_list(), reverse=True)


def test_parameter_errors(analytics_store: Path) -> None:  # noqa: F811
    with store.open(analytics_store) as s:
        with pytest.raises(QueryError, match="unknown query 'nope'; known queries: .*top_anomalies"):
            queries.run_query(s, "nope")
        with pytest.raises(QueryError, match="needs parameter 'column'"):
            queries.run_query(s, "subgroup_difference", {"group_a": "F", "group_b": "M"})
        with pytest.raises(QueryError, match="'k' must be an integer"):
            queries.run_query(s, "top_anomalies", {"k": "ten"})
        with pytest.raises(QueryError, match="'k' must be an integer"):
            queries.run_query(s, "top_anomalies", {"k": 2.5})
        with pytest.raises(QueryError, match="no parameter"):
            queries.run_query(s, "top_anomalies", {"kk": "1"})
        with pytest.raises(UserError, match="run 'missing' is not in"):
            queries.run_query(s, "run_status", {"run_id": "missing"})
        with pytest.raises(QueryError, match="read-only"):
            s.run_named_query("DELETE FROM runs")
        # an injection attempt stays a value: the bound string is compared, nothing executes
        assert queries.run_query(s, "subgroup_difference",
                                 {"column": "sex'); DROP TABLE runs; --", "group_a": "F", "group_b": "M"}).height == 0
        assert s.run_ids()


def test_coercion_and_assignments() -> None:
    p = queries.QueryParam(name="x", type="boolean")
    assert queries.coerce(p, "yes") is True and queries.coerce(p, "0") is False
    assert queries.coerce(queries.QueryParam(name="f", type="float"), "0.5") == 0.5
    with pytest.raises(QueryError, match="a float"):
        queries.coerce(queries.QueryParam(name="f", type="float"), "half")
    assert queries.parse_assignments(["k=10", "column=a=b"]) == {"k": "10", "column": "a=b"}
    with pytest.raises(QueryError, match="NAME=VALUE"):
        queries.parse_assignments(["k"])


def test_custom_folder_and_header_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "one.sql").write_text(
        "-- name: one\n-- answers: A constant,\n--   continued.\n-- params: n (integer, default 3), s (string)\n"
        "SELECT $n AS n, $s AS s, '$.not_a_param' AS literal\n"
    )
    monkeypatch.setenv(queries.QUERIES_ENV, str(tmp_path))
    q = queries.get_query("one")
    assert q.answers == "A constant, continued."
    assert queries.bind_params(q, {"s": "x"}) == {"n": 3, "s": "x"}
    (tmp_path / "two.sql").write_text("-- name: two\n-- answers: x\n-- params: n (integer)\nSELECT $m\n")
    with pytest.raises(QueryError, match="undeclared parameters"):
        queries.load_queries()
    (tmp_path / "two.sql").write_text("-- name: two\n-- answers: x\n-- params: n (number)\nSELECT $n\n")
    with pytest.raises(QueryError, match="needs a type"):
        queries.load_queries()
    (tmp_path / "two.sql").write_text("SELECT 1\n")
    with pytest.raises(QueryError, match="name:"):
        queries.load_queries()
