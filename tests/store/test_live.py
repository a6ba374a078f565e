"""Live reads while a writer holds the store: consistency, the read-only guard, the token, loopback, crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.flight as flight
import pytest

from engine import store
from engine.errors import QueryError
from engine.store_live import LiveError, check_read_only, live_path
from tests.store._rows import ROWS_PER_PATIENT, manifest, result

RUN = "live"
ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture()
def live_writer(tmp_path: Path):
    w = store.open_writer(tmp_path / "s.duckdb")
    w.create_run(RUN, config={})
    w.register_patients(RUN, manifest([f"p{i}" for i in range(40)]))
    w.write_patient(RUN, result("p0"))
    yield w
    w.close()


# ---------------------------------------------------------------------- what may run


REFUSED = {
    "INSERT INTO runs VALUES ('x')": "INSERT statement",
    "UPDATE patients SET status = 'done'": "UPDATE statement",
    "DELETE FROM importances": "DELETE statement",
    "DROP TABLE runs": "DROP statement",
    "CREATE TABLE t (a INT)": "CREATE statement",
    "ALTER TABLE runs ADD COLUMN x INT": "ALTER statement",
    "ATTACH '/tmp/other.duckdb' AS o": "ATTACH statement",
    "DETACH o": "DETACH statement",
    "COPY importances TO '/tmp/out.csv'": "COPY statement",
    "EXPORT DATABASE '/tmp/out'": "EXPORT statement",
    "INSTALL httpfs": "LOAD statement",
    "LOAD httpfs": "LOAD statement",
    "SET threads = 1": "SET statement",
    "RESET threads": "SET statement",
    "PRAGMA threads = 1": "SET statement",
    "PRAGMA enable_profiling": "read-only PRAGMAs",
    "CHECKPOINT": "CALL statement",
    "BEGIN TRANSACTION": "TRANSACTION statement",
    "VACUUM": "VACUUM statement",
    "SELECT 1; SELECT 2": "exactly one SQL statement",
    "SELECT * FROM read_csv('/etc/passwd')": "read_csv() is refused",
    "SELECT * FROM read_csv_auto('/etc/passwd')": "read_csv_auto() is refused",
    "SELECT * FROM read_parquet('/tmp/x.parquet')": "read_parquet() is refused",
    "SELECT * FROM read_json('/tmp/x.json')": "read_json() is refused",
    "SELECT * FROM read_text('/etc/passwd')": "read_text() is refused",
    "SELECT * FROM glob('/etc/*')": "glob() is refused",
    "SELECT * FROM runs WHERE run_id IN (SELECT * FROM glob('/etc/*'))": "glob() is refused",
    "WITH x AS (SELECT * FROM read_parquet('/tmp/x.parquet')) SELECT * FROM x": "read_parquet() is refused",
    "SELECT * FROM '/etc/passwd'": "looks like a file",
    "SELECT * FROM query('SELECT 1')": "query() is refused",
    "EXPLAIN ANALYZE DELETE FROM runs": "DELETE statement",
}

ALLOWED = [
    "SELECT count(*) FROM importances",
    "WITH x AS (SELECT 1 AS a) SELECT * FROM x",
    "FROM runs",
    "DESCRIBE importances",
    "SHOW TABLES",
    "SUMMARIZE patients",
    "SELECT * FROM range(3)",
    "SELECT * FROM duckdb_tables()",
    "EXPLAIN SELECT * FROM runs",
    "PRAGMA table_info('runs')",
]


@pytest.mark.parametrize("query", sorted(REFUSED))
def test_the_guard_refuses_each_statement_kind_on_one_line(query: str) -> None:
    with pytest.raises(LiveError, match=REFUSED[query].replace("(", r"\(").replace(")", r"\)")) as err:
        check_read_only(query)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("query", ALLOWED)
def test_the_guard_lets_reads_through(query: str) -> None:
    check_read_only(query)


def test_the_live_endpoint_refuses_every_statement_kind_and_answers_reads(live_writer: store.Store) -> None:
    reader = store.Store.__new__(store.Store)  # a reader bound to the endpoint, as another process would be
    from engine.store_live import LiveClient

    reader.path, reader.read_only, reader.con, reader._server = live_writer.path, True, None, None
    reader._client = LiveClient(live_writer.path)
    try:
        for query, message in REFUSED.items():
            with pytest.raises(QueryError, match=message.replace("(", r"\(").replace(")", r"\)")):
                reader.sql(query)
        for query in ALLOWED:
            reader.sql(query)
        assert reader.sql("SELECT count(*) AS n FROM importances")["n"].item() == ROWS_PER_PATIENT
    finally:
        reader.close()
    # and DuckDB itself refuses file access on the writer's database
    with pytest.raises(Exception, match="disabled by configuration"):
        live_writer.con.execute("SELECT * FROM read_csv('/etc/passwd')").fetchall()


# ---------------------------------------------------------------------- token, loopback, endpoint file


def test_the_endpoint_answers_nothing_without_its_token(live_writer: store.Store) -> None:
    host, port = live_writer.live_endpoint
    client = flight.FlightClient(f"grpc+tcp://{host}:{port}")
    ticket = flight.Ticket(json.dumps({"sql": "SELECT * FROM runs"}).encode())
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(ticket).read_all()
    wrong = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer not-the-token")])
    with pytest.raises(flight.FlightUnauthenticatedError):
        client.do_get(ticket, wrong).read_all()
    with pytest.raises(flight.FlightUnauthenticatedError):
        list(client.list_flights())
    token = json.loads(live_path(live_writer.path).read_text())["token"]
    right = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
    assert client.do_get(ticket, right).read_all().num_rows == 1
    client.close()


def _non_loopback_address() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))
            addr = s.getsockname()[0]
    except OSError:
        return None
    return None if addr.startswith("127.") else addr


def test_the_endpoint_listens_on_loopback_only(live_writer: store.Store) -> None:
    host, port = live_writer.live_endpoint
    assert host == "127.0.0.1"
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    other = _non_loopback_address()
    if other is None:
        pytest.skip("this machine has no non-loopback address to try")
    with pytest.raises(OSError):
        socket.create_connection((other, port), timeout=2).close()


def test_the_endpoint_file_is_private_and_removed_on_close(tmp_path: Path) -> None:
    w = store.open_writer(tmp_path / "s.duckdb")
    path = live_path(w.path)
    info = json.loads(path.read_text())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert info["host"] == "127.0.0.1" and info["pid"] == os.getpid() and len(info["token"]) >= 32
    w.close()
    assert not path.exists()


def test_another_process_reads_through_the_endpoint(live_writer: store.Store) -> None:
    out = _python(f"""
        import json
        import polars as pl
        from engine import store
        with store.open({str(live_writer.path)!r}) as s:
            lazy = s.importances({RUN!r}, lazy=True).filter(pl.col("target") == "heart").collect()
            print(json.dumps({{"live": s.is_live, "done": s.patient_ids({RUN!r}, status=["done"]),
                               "lazy": lazy.height, "meta": s.patient_metadata({RUN!r}).columns}}))
    """)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen == {"live": True, "done": ["p0"], "lazy": ROWS_PER_PATIENT // 3, "meta": ["patient_id"]}


def test_the_analytics_commands_run_in_another_process_while_a_run_writes(tmp_path: Path) -> None:
    """graph, report, show, anomaly and audit on a store a run is writing: each reads the committed
    patients through the endpoint (graph and show failed with an internal error before); anomaly, audit
    and graph --save show what they computed and say it was not stored."""
    db = tmp_path / "s.duckdb"
    ids = [f"p{i}" for i in range(24)]
    with store.open_writer(db) as w:
        w.create_run(RUN, config={})
        w.register_patients(RUN, manifest(ids, site=["A", "B"] * 12))
        for i, pid in enumerate(ids[:20]):
            w.write_patient(RUN, result(pid, seed=i))
        out = _python(f"""
            from engine.cli import main
            db, out = {str(db)!r}, {str(tmp_path)!r}
            for argv in (["graph", "--out", out + "/graph", "--save"], ["anomaly"], ["audit", "--by", "site"],
                         ["show", "p3", "--target", "heart", "--out", out + "/p3.png"],
                         ["report", "--out", out + "/report", "--no-maps"]):
                print("exit", argv[0], main([argv[0], "--run", {RUN!r}, *argv[1:], "--db", db]), flush=True)
        """, timeout=300)
        assert out.returncode == 0, out.stderr
        assert all(f"exit {c} 0" in out.stdout for c in ("graph", "anomaly", "audit", "report")), \
            out.stdout + out.stderr
        assert "internal error" not in out.stderr
        # show read what it needs through the endpoint; this run names no model to recompute maps with
        assert "exit show 2" in out.stdout and "cannot recompute maps for run 'live'" in out.stderr
        assert "20 patients scored" in out.stdout
        assert out.stdout.count("not stored: a run is writing") == 3  # graph --save, anomaly and audit
        assert (tmp_path / "report" / f"report-{RUN}.html").is_file() and (tmp_path / "graph").is_dir()
        # nothing was written beside the run: the commands could not, and did not try
        assert w.sql("SELECT count(*) AS n FROM anomaly_models").item() == 0
        assert w.sql("SELECT count(*) AS n FROM audits").item() == 0
        assert w.sql("SELECT count(*) AS n FROM graph_edges").item() == 0
    # once the run has ended, the same command stores its scores
    out = _python(f"""
        from engine.cli import main
        print("exit", main(["anomaly", "--run", {RUN!r}, "--db", {str(db)!r}]))
    """)
    assert out.returncode == 0 and "exit 0" in out.stdout and "not stored" not in out.stdout, out.stdout + out.stderr
    with store.open(db) as s:
        assert s.sql("SELECT count(*) AS n FROM anomaly_models").item() == 1


def test_lazy_frames_over_the_endpoint_send_their_filters_to_the_writer(live_writer: store.Store,
                                                                       monkeypatch) -> None:
    import polars as pl

    from engine.store_live import LiveClient

    live_writer.write_patient(RUN, result("p1", seed=4))
    sent: list[str] = []
    real = LiveClient.reader
    monkeypatch.setattr(LiveClient, "reader", lambda self, q, p=None: (sent.append(q), real(self, q, p))[1])
    with store.open(live_writer.path) as s:
        assert s.is_live
        lf = s.importances(RUN, lazy=True)
        out = lf.filter((pl.col("target") == "heart") & (pl.col("patient_id") == "p1")).select("roi", "value").collect()
        odd = lf.filter(pl.col("roi").str.contains("ea") & (pl.col("stat") == "mass")).collect()
    eager = live_writer.importances(RUN)
    assert out.height == eager.filter((pl.col("target") == "heart") & (pl.col("patient_id") == "p1")).height
    assert out.columns == ["roi", "value"]
    assert odd.height == eager.filter(pl.col("roi").str.contains("ea") & (pl.col("stat") == "mass")).height > 0
    lazy = [q.rsplit(") WHERE ", 1)[1] for q in sent if q.startswith("SELECT") and ") WHERE " in q]
    assert any("'heart'" in w and "'p1'" in w for w in lazy), sent
    assert any("'mass'" in w and "ea" not in w for w in lazy), sent  # the part SQL can say goes
    assert all(q.startswith("SELECT \"") and "value" in q.split(" FROM ")[0] and "sign" not in q.split(" FROM ")[0]
               for q in sent if "'heart'" in q), sent  # and only the columns asked for


def test_the_cli_reads_a_store_this_process_is_writing(live_writer: store.Store, capsys) -> None:
    from engine import cli

    assert cli.main(["sql", "SELECT count(*) AS n FROM patients WHERE status = 'done'", "--format", "csv",
                     "--db", str(live_writer.path)]) == 0
    assert capsys.readouterr().out.split() == ["n", "1"]
    live_writer.write_patient(RUN, result("p1"))
    assert cli.main(["query", "run_status", "--format", "csv", "--db", str(live_writer.path)]) == 0
    assert "done" in capsys.readouterr().out
    assert cli.main(["sql", "DELETE FROM runs", "--db", str(live_writer.path)]) == 2
    assert "read-only" in capsys.readouterr().err


def test_a_locked_store_without_endpoint_or_with_a_stale_one_says_so(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    store.open_writer(db, live=False).close()
    holder = subprocess.Popen([sys.executable, "-c", f"import duckdb, time; c = duckdb.connect({str(db)!r}); "
                               "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        with pytest.raises(store.StoreError, match="serves no live reads"):
            store.open(db)
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        live_path(db).write_text(json.dumps({"host": "127.0.0.1", "port": 1, "token": "x",
                                             "pid": int(dead.stdout)}))
        with pytest.raises(store.StoreError, match=r"is stale \(process \d+ is gone\)"):
            store.open(db)
    finally:
        holder.kill()
        holder.wait()


# ---------------------------------------------------------------------- consistency and crashes


def test_a_reader_during_writes_never_sees_half_a_patient(live_writer: store.Store) -> None:
    reader = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import json, time
        from engine import store
        seen = []
        deadline = time.time() + 8
        while time.time() < deadline:
            with store.open({str(live_writer.path)!r}) as s:
                done = s.sql("SELECT patient_id FROM patients WHERE run_id = '{RUN}' AND status = 'done'")
                # one statement, one snapshot: statuses and row counts from the same committed state
                both = s.sql("SELECT (SELECT list(patient_id ORDER BY patient_id) FROM patients "
                             "WHERE run_id = '{RUN}' AND status = 'done') AS done, "
                             "(SELECT list(n ORDER BY patient_id) FROM (SELECT patient_id, count(*) AS n "
                             "FROM importances WHERE run_id = '{RUN}' GROUP BY ALL)) AS counts, "
                             "(SELECT list(DISTINCT patient_id ORDER BY patient_id) FROM importances "
                             "WHERE run_id = '{RUN}') AS with_rows").row(0, named=True)
                seen.append({{"live": s.is_live, **both}})
            time.sleep(0.05)
        print(json.dumps(seen))
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    i = 1
    while reader.poll() is None and i < 40:
        live_writer.write_patient(RUN, result(f"p{i}", seed=i))
        i += 1
        time.sleep(0.1)
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    seen = json.loads(out)
    assert len(seen) >= 5 and all(v["live"] for v in seen)
    assert len({len(v["done"]) for v in seen}) > 1  # patients appeared while the reader read
    for v in seen:
        assert v["with_rows"] == v["done"]  # rows exactly for the done patients
        assert set(v["counts"]) == {ROWS_PER_PATIENT}  # each with a full set


def test_a_writer_killed_mid_transaction_loses_nothing_committed(tmp_path: Path) -> None:
    db = tmp_path / "s.duckdb"
    proc = _python(f"""
        import os, signal
        from engine import store
        from tests.store._rows import manifest, result
        w = store.open_writer({str(db)!r})
        w.create_run("crash", config={{}})
        w.register_patients("crash", manifest(["a", "b", "c", "d"]))
        for pid in ("a", "b", "c"):
            w.write_patient("crash", result(pid))
        real = w._append
        def append_then_die(table, frame, **kw):
            real(table, frame, **kw)
            if table == "predictions":  # rows of 'd' are in, its status not yet: die inside the transaction
                os.kill(os.getpid(), signal.SIGKILL)
        w._append = append_then_die
        w.write_patient("crash", result("d"))
    """)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert live_path(db).exists()  # left behind by the killed writer; harmless once the file is unlocked
    with store.open(db) as s:
        assert not s.is_live
        assert s.patient_ids("crash", status=["done"]) == ["a", "b", "c"]
        assert s.table_counts("crash") == {"patients": 4, "predictions": 12, "importances": 3 * ROWS_PER_PATIENT}
    with store.open_writer(db) as w:  # the run resumes: the lost patient is written once
        w.write_patient("crash", result("d"))
        w.finish_run("crash", status="done")
        assert w.table_counts("crash")["importances"] == 4 * ROWS_PER_PATIENT
        assert w.run_info("crash")["report"]["uniqueness"]["duplicate_keys"] == 0
    assert not live_path(db).exists()
