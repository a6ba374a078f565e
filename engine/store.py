"""The DuckDB store: schema, the single writer, read-only readers and Polars views.

Only this module speaks SQL to the database file. One process (the run's driver) holds the
read-write connection; every patient's rows go in within one transaction, deleting any earlier
rows for the same key first, so a retried or resumed patient can never leave duplicates.

While a run holds the file, DuckDB refuses other processes; readers then fall back to the
snapshot that the writer refreshes after commits (``<db>.snapshot.duckdb``), which always holds a
committed, consistent state.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from engine.errors import UserError

#: Default database file, relative to the working directory.
DEFAULT_DB = "agg2exp.duckdb"

SCHEMA_VERSION = 1

PATIENT_STATUSES = ("pending", "running", "done", "failed")
STATS = ("mass", "mean")
SIGNS = ("abs", "pos", "neg")

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,              -- 'engine' (computed here) or 'import' (reference CSV)
    job_name VARCHAR,
    config JSON,
    versions JSON,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    status VARCHAR NOT NULL,            -- running, done, partial, failed, interrupted
    report JSON
);
CREATE TABLE IF NOT EXISTS patients (
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    image_path VARCHAR,
    label_path VARCHAR,
    metadata JSON,
    status VARCHAR NOT NULL,
    error VARCHAR,
    traceback VARCHAR,
    attempts INTEGER DEFAULT 0,
    worker VARCHAR,
    seconds DOUBLE,
    timings JSON,
    updated_at TIMESTAMPTZ,
    PRIMARY KEY (run_id, patient_id)
);
CREATE TABLE IF NOT EXISTS predictions (
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    class VARCHAR NOT NULL,
    voxels BIGINT,
    dice DOUBLE,
    iou DOUBLE,
    PRIMARY KEY (run_id, patient_id, class)
);
CREATE TABLE IF NOT EXISTS importances (
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    method VARCHAR NOT NULL,
    target VARCHAR NOT NULL,
    roi VARCHAR NOT NULL,
    stat VARCHAR NOT NULL,
    sign VARCHAR NOT NULL,
    value DOUBLE,
    PRIMARY KEY (run_id, patient_id, method, target, roi, stat, sign)
);
CREATE TABLE IF NOT EXISTS anomaly_models (
    model_id VARCHAR PRIMARY KEY,
    run_id VARCHAR NOT NULL,            -- the run that was scored
    fit_run_id VARCHAR NOT NULL,        -- the run the forests were fitted on
    mode VARCHAR NOT NULL,              -- 'within-run' or 'reference'
    method VARCHAR NOT NULL,
    sign VARCHAR NOT NULL,
    seed BIGINT,
    params JSON,
    features JSON,
    spearman_dice DOUBLE,
    spearman_p DOUBLE,
    created_at TIMESTAMPTZ
);
CREATE TABLE IF NOT EXISTS anomaly_scores (
    model_id VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    target VARCHAR NOT NULL,            -- a class name, or '__mean__' for the mean over classes
    score DOUBLE,                       -- anomaly score, -score_samples: higher is more anomalous
    raw_score DOUBLE,                   -- scikit-learn score_samples
    decision DOUBLE,                    -- scikit-learn decision_function (= raw_score - offset)
    "offset" DOUBLE,
    PRIMARY KEY (model_id, patient_id, target)
);
"""

#: Column order and Polars dtypes of the importances table (the long format).
IMPORTANCE_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "patient_id": pl.String(),
    "method": pl.String(),
    "target": pl.String(),
    "roi": pl.String(),
    "stat": pl.String(),
    "sign": pl.String(),
    "value": pl.Float64(),
}

PREDICTION_SCHEMA: dict[str, pl.DataType] = {
    "run_id": pl.String(),
    "patient_id": pl.String(),
    "class": pl.String(),
    "voxels": pl.Int64(),
    "dice": pl.Float64(),
    "iou": pl.Float64(),
}



class StoreError(UserError):
    """A store problem the user can act on (missing file, unknown run, locked database)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def snapshot_path(path: str | os.PathLike[str]) -> Path:
    """Where the writer publishes consistent snapshots for live readers."""
    p = Path(path)
    return p.with_name(p.name + ".snapshot.duckdb")


@dataclass(frozen=True)
class PatientResult:
    """What one patient's processing sends back to the writer: small records only."""

    patient_id: str
    importances: pl.DataFrame  # method, target, roi, stat, sign, value
    predictions: pl.DataFrame  # class, voxels, dice, iou
    worker: str | None = None
    seconds: float | None = None
    timings: Mapping[str, float] | None = None


class Store:
    """A connection to one store file.

    ``read_only=True`` (the default for readers) never takes the write lock; when another
    process is writing, it transparently opens the latest snapshot instead and sets
    ``is_snapshot``.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = True) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.is_snapshot = False
        self._last_snapshot = 0.0
        self._last_snapshot_cost = 0.0
        if read_only:
            self.con = self._open_reader()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.con = duckdb.connect(str(self.path))
            except duckdb.IOException as exc:
                raise StoreError(
                    f"cannot open {self.path} for writing: {exc}. Another run may be writing to it; "
                    "wait for it to finish or pass a different --db"
                ) from exc
            self.con.execute(_DDL)
            self.con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    # ------------------------------------------------------------------ opening
    def _open_reader(self) -> duckdb.DuckDBPyConnection:
        if not self.path.exists():
            raise StoreError(
                f"no store at {self.path}; run `agg2exp demo` or `agg2exp run JOB.toml` first, "
                "or pass --db PATH"
            )
        try:
            return duckdb.connect(str(self.path), read_only=True)
        except (duckdb.IOException, duckdb.ConnectionException):
            snap = snapshot_path(self.path)
            if not snap.exists():
                raise StoreError(
                    f"{self.path} is locked by a running job and it has not published a snapshot "
                    "yet; try again in a few seconds"
                ) from None
            self.is_snapshot = True
            return duckdb.connect(str(snap), read_only=True)

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writer(self) -> None:
        if self.read_only:
            raise StoreError("this store was opened read-only; open it with read_only=False to write")

    # ------------------------------------------------------------------ writing helpers
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction on the writer: committed on success, rolled back on any error."""
        self._require_writer()
        self.con.begin()
        try:
            yield
        except BaseException:
            self.con.rollback()
            raise
        self.con.commit()

    def _append(self, table: str, frame: pl.DataFrame, *, columns: Sequence[str] | None = None,
                stamp: bool = False) -> None:
        """Insert a frame's rows through Arrow (in ``columns`` order), plus ``created_at`` when ``stamp``."""
        names = [f'"{c}"' for c in (columns or [])] + (["created_at"] if stamp and columns else [])
        target = f"{table} ({', '.join(names)})" if names else table
        self.con.register("_rows", frame.to_arrow())
        try:
            self.con.execute(f"INSERT INTO {target} SELECT *{', ?' if stamp else ''} FROM _rows",  # noqa: S608
                             [_now()] if stamp else []).fetchall()
        finally:
            self.con.unregister("_rows")

    @staticmethod
    def _long_rows(run_id: str, importances: pl.DataFrame, predictions: pl.DataFrame,
                   patient_id: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Importances and predictions in the tables' column order and types."""
        keys = [pl.lit(run_id).alias("run_id")]
        keys.append(pl.lit(patient_id).alias("patient_id") if patient_id is not None
                    else pl.col("patient_id").cast(pl.String))
        imp = importances.with_columns(keys).select(list(IMPORTANCE_SCHEMA)).cast(IMPORTANCE_SCHEMA)  # type: ignore[arg-type]
        pred = predictions.with_columns(keys)
        for col, dtype in (("voxels", pl.Int64), ("dice", pl.Float64), ("iou", pl.Float64)):
            if col not in pred.columns:
                pred = pred.with_columns(pl.lit(None, dtype=dtype).alias(col))
        pred = pred.select(list(PREDICTION_SCHEMA)).cast(PREDICTION_SCHEMA)  # type: ignore[arg-type]
        return imp, pred

    # ------------------------------------------------------------------ runs
    def create_run(
        self,
        run_id: str,
        *,
        config: Mapping[str, Any],
        versions: Mapping[str, str] | None = None,
        job_name: str | None = None,
        kind: str = "engine",
    ) -> bool:
        """Create a run, or mark an existing one running again; returns True if it was new."""
        self._require_writer()
        exists = self.con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchall()
        if exists:
            self.con.execute(
                "UPDATE runs SET status = 'running', finished_at = NULL WHERE run_id = ?", [run_id]
            )
            return False
        self.con.execute(
            "INSERT INTO runs (run_id, kind, job_name, config, versions, started_at, status) "
            "VALUES (?, ?, ?, ?, ?, ?, 'running')",
            [run_id, kind, job_name, json.dumps(config, default=str),
             json.dumps(dict(versions or {})), _now()],
        )
        return True

    def finish_run(self, run_id: str, *, status: str, report: Mapping[str, Any] | None = None) -> None:
        self._require_writer()
        self.con.execute(
            "UPDATE runs SET status = ?, finished_at = ?, report = ? WHERE run_id = ?",
            [status, _now(), json.dumps(report or {}, default=str), run_id],
        )
        self.publish_snapshot(force=True)

    def run_ids(self) -> list[str]:
        return [r[0] for r in self.con.execute("SELECT run_id FROM runs ORDER BY started_at").fetchall()]

    def latest_run(self) -> str:
        rows = self.con.execute(
            "SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1"
        ).fetchall()
        row = rows[0] if rows else None
        if row is None:
            raise StoreError(f"{self.path} holds no runs yet")
        return str(row[0])

    def require_run(self, run_id: str | None) -> str:
        """The given run id if it exists (the latest run when None); a clear error otherwise."""
        if run_id is None:
            return self.latest_run()
        if not self.con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).fetchall():
            known = ", ".join(self.run_ids()) or "none"
            raise StoreError(f"run {run_id!r} is not in {self.path}; known runs: {known}")
        return run_id

    def run_info(self, run_id: str) -> dict[str, Any]:
        rows = self.frame("SELECT * FROM runs WHERE run_id = ?", [run_id]).to_dicts()
        if not rows:
            raise StoreError(f"run {run_id!r} is not in {self.path}")
        out = rows[0]
        for key in ("config", "versions", "report"):
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    # ------------------------------------------------------------------ patients
    def register_patients(self, run_id: str, manifest: pl.DataFrame) -> int:
        """Add manifest rows as ``pending`` patients; existing patients keep their state.

        ``manifest`` needs ``patient_id`` and ``image_path``; ``label_path`` is optional and every
        other column is kept as metadata. Returns the number of newly added patients.
        """
        self._require_writer()
        meta_cols = [c for c in manifest.columns if c not in ("patient_id", "image_path", "label_path")]
        rows = []
        for rec in manifest.iter_rows(named=True):
            meta = {c: rec[c] for c in meta_cols}
            rows.append((
                run_id, str(rec["patient_id"]), str(rec.get("image_path") or ""),
                rec.get("label_path"), json.dumps(meta, default=str), "pending", _now(),
            ))
        before = self._count("patients", run_id)
        with self._transaction():
            self.con.executemany(
                "INSERT INTO patients (run_id, patient_id, image_path, label_path, metadata, status, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                rows,
            )
        return self._count("patients", run_id) - before

    def _count(self, table: str, run_id: str) -> int:
        assert table in ("patients", "importances", "predictions")
        return int(self.con.execute(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id]).fetchall()[0][0])  # noqa: S608

    def patient_ids(self, run_id: str, *, status: Sequence[str] | None = None) -> list[str]:
        if status is None:
            rows = self.con.execute(
                "SELECT patient_id FROM patients WHERE run_id = ? ORDER BY patient_id", [run_id]
            ).fetchall()
        else:
            rows = self.con.execute(
                "SELECT patient_id FROM patients WHERE run_id = ? AND list_contains(?, status) "
                "ORDER BY patient_id",
                [run_id, list(status)],
            ).fetchall()
        return [r[0] for r in rows]

    def status_counts(self, run_id: str) -> dict[str, int]:
        rows = self.con.execute(
            "SELECT status, count(*) FROM patients WHERE run_id = ? GROUP BY status", [run_id]
        ).fetchall()
        return {s: 0 for s in PATIENT_STATUSES} | {r[0]: int(r[1]) for r in rows}

    def write_patient(self, run_id: str, result: PatientResult) -> int:
        """Store one patient's rows in one transaction, replacing earlier rows for the same key.

        Returns the number of importance rows written.
        """
        self._require_writer()
        imp, pred = self._long_rows(run_id, result.importances, result.predictions, result.patient_id)
        methods = imp["method"].unique().to_list()
        with self._transaction():
            self.con.execute(
                "DELETE FROM importances WHERE run_id = ? AND patient_id = ? AND list_contains(?, method)",
                [run_id, result.patient_id, methods],
            )
            self.con.execute(
                "DELETE FROM predictions WHERE run_id = ? AND patient_id = ?", [run_id, result.patient_id]
            )
            self._append("importances", imp)
            self._append("predictions", pred)
            self.con.execute(
                "UPDATE patients SET status = 'done', error = NULL, traceback = NULL, worker = ?, "
                "seconds = ?, timings = ?, attempts = attempts + 1, updated_at = ? "
                "WHERE run_id = ? AND patient_id = ?",
                [result.worker, result.seconds, json.dumps(dict(result.timings or {})), _now(),
                 run_id, result.patient_id],
            )
        return imp.height

    def mark_failed(
        self, run_id: str, patient_id: str, *, error: str, traceback: str | None = None,
        worker: str | None = None,
    ) -> None:
        """Record a patient as failed with a readable reason; its earlier rows are kept."""
        self._require_writer()
        self.con.execute(
            "UPDATE patients SET status = 'failed', error = ?, traceback = ?, worker = ?, "
            "attempts = attempts + 1, updated_at = ? WHERE run_id = ? AND patient_id = ?",
            [error, traceback, worker, _now(), run_id, patient_id],
        )

    # ------------------------------------------------------------------ snapshots
    def publish_snapshot(self, *, force: bool = False, min_interval: float = 2.0) -> Path | None:
        """Publish a consistent copy for live readers.

        The copy is made by DuckDB itself (``COPY FROM DATABASE``) into a temporary file that is
        then renamed over the previous snapshot, so readers only ever see committed states. The
        main file is never opened by Python: closing any descriptor of it would drop DuckDB's
        POSIX lock. Copies are throttled to at most one per ``min_interval`` seconds, or ten
        times the last copy's duration when that is longer, so that a large store does not
        spend its time copying.
        """
        if self.read_only:
            return None
        now = time.monotonic()
        interval = max(min_interval, 10.0 * self._last_snapshot_cost)
        if not force and now - self._last_snapshot < interval:
            return None
        final = snapshot_path(self.path)
        tmp = final.with_name(final.name + f".{os.getpid()}.tmp")
        for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
            if leftover.exists():
                leftover.unlink()
        current = self.con.execute("SELECT current_database()").fetchall()[0][0]
        self.con.execute("ATTACH ? AS _snapshot", [str(tmp)])
        try:
            self.con.execute(f'COPY FROM DATABASE "{current}" TO _snapshot')
        finally:
            self.con.execute("DETACH _snapshot")
        os.replace(tmp, final)
        self._last_snapshot = time.monotonic()
        self._last_snapshot_cost = self._last_snapshot - now
        return final

    # ------------------------------------------------------------------ reading
    def frame(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pl.DataFrame:
        """Run a read query with bound parameters and return a Polars frame."""
        return self.con.sql(sql, params=params or None).pl()

    def importances(self, run_id: str | None = None, *, lazy: bool = False) -> pl.DataFrame | pl.LazyFrame:
        """The importances table (one run, or all), in the long format."""
        if run_id is None:
            df = self.frame("SELECT * FROM importances")
        else:
            df = self.frame("SELECT * FROM importances WHERE run_id = ?", [self.require_run(run_id)])
        return df.lazy() if lazy else df

    def predictions(self, run_id: str | None = None) -> pl.DataFrame:
        if run_id is None:
            return self.frame("SELECT * FROM predictions")
        return self.frame("SELECT * FROM predictions WHERE run_id = ?", [self.require_run(run_id)])

    def patients(self, run_id: str | None = None, *, unnest_metadata: bool = True) -> pl.DataFrame:
        """Patients with their status; manifest metadata unnested into columns."""
        if run_id is None:
            df = self.frame("SELECT * FROM patients ORDER BY run_id, patient_id")
        else:
            df = self.frame(
                "SELECT * FROM patients WHERE run_id = ? ORDER BY patient_id", [self.require_run(run_id)]
            )
        if unnest_metadata and df.height:
            meta = pl.DataFrame([json.loads(m or "{}") for m in df["metadata"].to_list()],
                                infer_schema_length=None)
            meta = meta.select([c for c in meta.columns if c not in df.columns])
            df = pl.concat([df.drop("metadata"), meta], how="horizontal")
        return df

    def anomaly_scores(self, run_id: str | None = None) -> pl.DataFrame:
        if run_id is None:
            return self.frame("SELECT * FROM anomaly_scores")
        return self.frame("SELECT * FROM anomaly_scores WHERE run_id = ?", [self.require_run(run_id)])

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pl.DataFrame:
        """Ad-hoc read-only SQL. Statements that would write are refused before they run."""
        check_read_only_sql(query)
        return self.frame(query, params)

    def table_counts(self, run_id: str) -> dict[str, int]:
        return {t: self._count(t, run_id) for t in ("patients", "predictions", "importances")}

    # ------------------------------------------------------------------ anomaly
    def write_anomaly(
        self, *, model: Mapping[str, Any], scores: pl.DataFrame
    ) -> None:
        """Store one anomaly model's description and its scores, replacing an earlier model_id."""
        self._require_writer()
        model_id = str(model["model_id"])
        cols = ["model_id", "run_id", "fit_run_id", "mode", "method", "sign", "seed", "params",
                "features", "spearman_dice", "spearman_p"]
        vals = [model.get(c) for c in cols]
        for i, c in enumerate(cols):
            if c in ("params", "features"):
                vals[i] = json.dumps(vals[i], default=str)
        out = scores.with_columns(pl.lit(model_id).alias("model_id")).select(
            "model_id", "run_id", "patient_id", "target", "score", "raw_score", "decision", "offset"
        )
        with self._transaction():
            self.con.execute("DELETE FROM anomaly_scores WHERE model_id = ?", [model_id])
            self.con.execute("DELETE FROM anomaly_models WHERE model_id = ?", [model_id])
            self.con.execute(
                f"INSERT INTO anomaly_models ({', '.join(cols)}, created_at) "
                f"VALUES ({', '.join('?' * len(cols))}, ?)",
                [*vals, _now()],
            )
            self._append("anomaly_scores", out)

    # ================================================================== analytics additions
    # Added for the analytics layer (reference import, named queries, audits, graph edges).
    # Tables created here are created on demand by the writer, so older stores keep working.
    _ANALYTICS_DDL = """
    CREATE TABLE IF NOT EXISTS audits (
        audit_id VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        model_id VARCHAR,                   -- anomaly model whose scores defined the outliers
        params JSON,
        "rank" BIGINT,
        "column" VARCHAR NOT NULL,
        family VARCHAR,                     -- 'outlier' or 'importance'
        target VARCHAR,
        roi VARCHAR,
        test VARCHAR,
        groups VARCHAR,
        n BIGINT,
        statistic DOUBLE,
        p_value DOUBLE,
        q_value DOUBLE,                     -- Benjamini-Hochberg within the column
        effect VARCHAR,
        effect_size DOUBLE,
        ci_low DOUBLE,
        ci_high DOUBLE,
        significant BOOLEAN,
        created_at TIMESTAMPTZ
    );
    CREATE TABLE IF NOT EXISTS graph_edges (
        graph_id VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        subgroup VARCHAR NOT NULL,          -- 'all', or a group of the --by column
        params JSON,
        source VARCHAR NOT NULL,            -- the RoI
        target VARCHAR NOT NULL,            -- the explained class
        weight DOUBLE,
        "rank" BIGINT,
        cumweight DOUBLE,
        created_at TIMESTAMPTZ
    );
    """

    def _ensure_analytics_tables(self) -> None:
        self._require_writer()
        self.con.execute(self._ANALYTICS_DDL).fetchall()

    def _has_table(self, name: str) -> bool:
        return bool(self.con.execute(
            "SELECT 1 FROM information_schema.tables WHERE table_name = ?", [name]
        ).fetchall())

    def import_frames(
        self,
        run_id: str,
        *,
        importances: pl.DataFrame,
        predictions: pl.DataFrame,
        metadata: pl.DataFrame | None = None,
        config: Mapping[str, Any] | None = None,
        kind: str = "import",
    ) -> dict[str, int]:
        """Store a whole run computed elsewhere (e.g. the reference CSV) in one transaction.

        ``importances``/``predictions`` are long frames with ``patient_id`` (no ``run_id``);
        ``metadata`` optionally gives ``patient_id`` plus metadata columns. Re-importing the same
        run id replaces its rows. Returns the table counts of the run.
        """
        self._require_writer()
        self.create_run(run_id, config=dict(config or {}), kind=kind)
        imp, pred = self._long_rows(run_id, importances, predictions)
        ids = sorted(set(imp["patient_id"].to_list()) | set(pred["patient_id"].to_list()))
        meta_by_id: dict[str, dict[str, Any]] = {}
        if metadata is not None:
            cols = [c for c in metadata.columns if c != "patient_id"]
            for rec in metadata.iter_rows(named=True):
                meta_by_id[str(rec["patient_id"])] = {c: rec[c] for c in cols}
        now = _now()
        rows = [(run_id, pid, "", None, json.dumps(meta_by_id.get(pid, {}), default=str), "done", 1, now)
                for pid in ids]
        with self._transaction():
            for table in ("importances", "predictions", "patients"):
                self.con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])  # noqa: S608
            self.con.executemany(
                "INSERT INTO patients (run_id, patient_id, image_path, label_path, metadata, status, "
                "attempts, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._append("importances", imp)
            self._append("predictions", pred)
        counts = self.table_counts(run_id)
        self.finish_run(run_id, status="done", report={"imported": counts})
        return counts

    def import_reference_csv(
        self,
        path: str | os.PathLike[str],
        *,
        run_id: str | None = None,
        method: str = "smoothgrad",
        metadata: pl.DataFrame | None = None,
    ) -> str:
        """Import the reference implementation's wide CSV as a run of kind 'import'.

        The run id defaults to ``import-<file stem>``; returns the run id.
        """
        from engine.analytics.reference import read_reference_csv

        data = read_reference_csv(path, method=method)
        rid = run_id or f"import-{Path(path).stem}"
        self.import_frames(
            rid, importances=data.importances, predictions=data.predictions, metadata=metadata,
            config={"source": str(Path(path).resolve()), "method": method, "format": "agg2exp-reference-csv"},
            kind="import",
        )
        return rid

    def run_named_query(self, sql: str, params: Mapping[str, Any] | None = None) -> pl.DataFrame:
        """Run a read-only query with DuckDB named parameters (``$name``) bound, never formatted."""
        from engine.errors import QueryError

        try:
            check_read_only_sql(sql)
        except StoreError as exc:
            raise QueryError(str(exc)) from None
        try:
            return self.con.sql(sql, params=dict(params) if params else None).pl()
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise QueryError(f"the query failed: {first}") from None

    def latest_anomaly_model(self, run_id: str) -> str | None:
        """The most recently created anomaly model that scored ``run_id`` (None if none)."""
        rows = self.con.execute(
            "SELECT model_id FROM anomaly_models WHERE run_id = ? ORDER BY created_at DESC LIMIT 1", [run_id]
        ).fetchall()
        return str(rows[0][0]) if rows else None

    def anomaly_model_scores(self, run_id: str, model_id: str | None = None) -> pl.DataFrame:
        """Scores of one model for a run (the latest model when ``model_id`` is None)."""
        run_id = self.require_run(run_id)
        if model_id is None:
            model_id = self.latest_anomaly_model(run_id)
            if model_id is None:
                return self.frame("SELECT * FROM anomaly_scores WHERE false")
        elif not self.con.execute(
            "SELECT 1 FROM anomaly_models WHERE model_id = ? AND run_id = ?", [model_id, run_id]
        ).fetchall():
            raise StoreError(f"anomaly model {model_id!r} did not score run {run_id!r}; "
                             f"run `agg2exp anomaly --run {run_id}` first")
        return self.frame("SELECT * FROM anomaly_scores WHERE model_id = ?", [model_id])

    def write_audit(
        self, *, audit_id: str, run_id: str, results: pl.DataFrame, model_id: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Store one audit's ranked results, replacing an earlier audit with the same id."""
        self._ensure_analytics_tables()
        cols = ["rank", "column", "family", "target", "roi", "test", "groups", "n", "statistic", "p_value",
                "q_value", "effect", "effect_size", "ci_low", "ci_high", "significant"]
        out = results.select(cols).with_columns(
            pl.lit(audit_id).alias("audit_id"), pl.lit(run_id).alias("run_id"),
            pl.lit(model_id, dtype=pl.String).alias("model_id"),
            pl.lit(json.dumps(dict(params or {}), default=str)).alias("params"),
        ).select("audit_id", "run_id", "model_id", "params", *cols)
        with self._transaction():
            self.con.execute("DELETE FROM audits WHERE audit_id = ?", [audit_id])
            self._append("audits", out, columns=out.columns, stamp=True)

    def audits(self, run_id: str | None = None) -> pl.DataFrame:
        """Stored audit results (empty when no audit was ever written)."""
        if not self._has_table("audits"):
            return pl.DataFrame()
        if run_id is None:
            return self.frame('SELECT * FROM audits ORDER BY audit_id, "column", "rank"')
        return self.frame('SELECT * FROM audits WHERE run_id = ? ORDER BY audit_id, "column", "rank"', [run_id])

    def write_graph(
        self, *, graph_id: str, run_id: str, edges: Mapping[str, pl.DataFrame],
        params: Mapping[str, Any] | None = None,
    ) -> int:
        """Store the kept edges of each subgroup under one graph id (replacing it); returns the count."""
        self._ensure_analytics_tables()
        frames = [
            e.select("source", "target", "weight", "rank", "cumweight").with_columns(
                pl.lit(group).alias("subgroup"))
            for group, e in edges.items()
        ]
        out = (pl.concat(frames) if frames else pl.DataFrame(
            schema={"source": pl.String, "target": pl.String, "weight": pl.Float64, "rank": pl.Int64,
                    "cumweight": pl.Float64, "subgroup": pl.String})).with_columns(
            pl.lit(graph_id).alias("graph_id"), pl.lit(run_id).alias("run_id"),
            pl.lit(json.dumps(dict(params or {}), default=str)).alias("params"),
        ).select("graph_id", "run_id", "subgroup", "params", "source", "target", "weight", "rank", "cumweight")
        with self._transaction():
            self.con.execute("DELETE FROM graph_edges WHERE graph_id = ?", [graph_id])
            self._append("graph_edges", out, columns=out.columns, stamp=True)
        return out.height

    def graph_edges(self, run_id: str | None = None) -> pl.DataFrame:
        """Stored graph edges (empty when no graph was ever saved)."""
        if not self._has_table("graph_edges"):
            return pl.DataFrame()
        if run_id is None:
            return self.frame('SELECT * FROM graph_edges ORDER BY graph_id, subgroup, target, "rank"')
        return self.frame('SELECT * FROM graph_edges WHERE run_id = ? ORDER BY graph_id, subgroup, target, "rank"',
                          [run_id])
    # ================================================================== end of analytics additions

    # ================================================================== evaluation additions
    # Added for ``agg2exp evaluate`` (engine.analytics.evaluate): benchmark rows of attribution
    # methods. The table is created on demand by the writer, so older stores keep working.
    _EVALUATION_DDL = """
    CREATE TABLE IF NOT EXISTS evaluations (
        run_id VARCHAR NOT NULL,            -- the evaluation's id (not a row of runs)
        patient_id VARCHAR NOT NULL,
        target VARCHAR NOT NULL,
        method VARCHAR NOT NULL,            -- a method, or 'A~B' for a pair (agreement)
        metric VARCHAR NOT NULL,
        value DOUBLE,
        params JSON,
        created_at TIMESTAMPTZ
    );
    """

    def write_evaluations(self, run_id: str, rows: pl.DataFrame, *, params: Mapping[str, Any] | None = None) -> int:
        """Store one evaluation's rows (patient_id, target, method, metric, value), replacing that run id.

        Returns the number of rows written.
        """
        self._require_writer()
        self.con.execute(self._EVALUATION_DDL).fetchall()
        out = rows.select(
            pl.lit(run_id).alias("run_id"), pl.col("patient_id").cast(pl.String), pl.col("target").cast(pl.String),
            pl.col("method").cast(pl.String), pl.col("metric").cast(pl.String), pl.col("value").cast(pl.Float64),
            pl.lit(json.dumps(dict(params or {}), default=str, sort_keys=True)).alias("params"),
        )
        with self._transaction():
            self.con.execute("DELETE FROM evaluations WHERE run_id = ?", [run_id]).fetchall()
            self._append("evaluations", out, stamp=True)
        return out.height

    def evaluations(self, run_id: str | None = None) -> pl.DataFrame:
        """Stored evaluation rows (empty when no evaluation was ever written)."""
        if not self._has_table("evaluations"):
            return pl.DataFrame()
        cols = "run_id, patient_id, target, method, metric, value, params, created_at"
        if run_id is None:
            return self.frame(f"SELECT {cols} FROM evaluations ORDER BY run_id, patient_id, method, target, metric")  # noqa: S608
        return self.frame(f"SELECT {cols} FROM evaluations WHERE run_id = ? "  # noqa: S608
                          "ORDER BY patient_id, method, target, metric", [run_id])
    # ================================================================== end of evaluation additions

    # ------------------------------------------------------------------ analytics readers
    # What the cohort analytics (engine.analytics) read: done patients only, filtered, pivoted and
    # aggregated here so that the long importances table never leaves DuckDB.

    #: Separator of target and RoI in ``importance_wide``'s column names.
    FEATURE_SEP = "\x1f"

    #: Columns of ``patients`` that are bookkeeping, not cohort metadata.
    BOOKKEEPING_COLUMNS = ("run_id", "image_path", "label_path", "status", "error", "traceback", "attempts",
                           "worker", "seconds", "timings", "updated_at", "finished_at")

    _DONE = "patient_id IN (SELECT patient_id FROM patients WHERE run_id = $run AND status = 'done')"

    def importance_methods(self, run_id: str) -> list[str]:
        """Attribution methods with importance rows of done patients."""
        rows = self.con.execute(
            f"SELECT DISTINCT method FROM importances WHERE run_id = $run AND {self._DONE} ORDER BY method",  # noqa: S608
            {"run": run_id},
        ).fetchall()
        return [r[0] for r in rows]

    def importance_wide(self, run_id: str, *, method: str, sign: str = "abs", stat: str = "mass") -> pl.DataFrame:
        """Done patients x (target, RoI) values of one method/sign/stat, pivoted by DuckDB.

        Columns: ``patient_id`` then ``f"{target}{FEATURE_SEP}{roi}"``; null where a patient has no row.
        """
        where = f"run_id = $run AND method = $method AND sign = $sign AND stat = $stat AND {self._DONE}"
        params = {"run": run_id, "method": method, "sign": sign, "stat": stat}
        features = self.con.execute(
            f"SELECT DISTINCT target, roi FROM importances WHERE {where} ORDER BY target, roi", params  # noqa: S608
        ).fetchall()
        if not features:
            return pl.DataFrame(schema={"patient_id": pl.String})
        import pyarrow as pa

        keys = pa.table({"target": [f[0] for f in features], "roi": [f[1] for f in features],
                         "idx": list(range(len(features)))})
        # PIVOT needs its IN list spelled out to accept bound parameters; the list is feature
        # indices (integers made here), never text from the data.
        in_list = ", ".join(str(i) for i in range(len(features)))
        self.con.register("_analytics_features", keys)
        try:
            wide = self.frame(
                "PIVOT (SELECT i.patient_id, k.idx, i.value FROM importances i "  # noqa: S608
                "JOIN _analytics_features k ON k.target = i.target AND k.roi = i.roi "
                "WHERE i.run_id = $run AND i.method = $method AND i.sign = $sign AND i.stat = $stat "
                f"AND i.{self._DONE}) "
                f"ON idx IN ({in_list}) USING avg(value) GROUP BY patient_id ORDER BY patient_id",
                params,
            )
        finally:
            self.con.unregister("_analytics_features")
        names = {str(i): f"{t}{self.FEATURE_SEP}{r}" for i, (t, r) in enumerate(features)}
        return wide.rename({c: names[c] for c in wide.columns if c in names})

    def importance_sums(
        self, run_id: str, *, method: str, sign: str = "abs", stat: str = "mass",
        patient_ids: Sequence[str] | None = None,
    ) -> pl.DataFrame:
        """Per (target, roi) over done patients: ``total`` (sum), ``n_values`` and ``n_patients``.

        ``n_patients`` counts the done patients with any row for the target, so that a mean over
        them counts a patient without a row for a RoI as 0 (an empty RoI has no mass).
        """
        where = f"run_id = $run AND method = $method AND sign = $sign AND stat = $stat AND {self._DONE}"
        params: dict[str, Any] = {"run": run_id, "method": method, "sign": sign, "stat": stat}
        if patient_ids is not None:
            where += " AND list_contains($ids, patient_id)"
            params["ids"] = [str(p) for p in patient_ids]
        return self.frame(
            f"WITH rows AS (SELECT target, roi, patient_id, value FROM importances WHERE {where}), "  # noqa: S608
            "per_target AS (SELECT target, count(DISTINCT patient_id) AS n_patients FROM rows GROUP BY target) "
            "SELECT r.target, r.roi, sum(r.value) AS total, count(r.value) AS n_values, "
            "any_value(t.n_patients) AS n_patients "
            "FROM rows r JOIN per_target t USING (target) GROUP BY r.target, r.roi ORDER BY r.target, r.roi",
            params,
        )

    def done_predictions(self, run_id: str) -> pl.DataFrame:
        """``patient_id, class, dice`` of the done patients."""
        return self.frame(
            f"SELECT patient_id, class, dice FROM predictions WHERE run_id = $run AND {self._DONE} "  # noqa: S608
            "ORDER BY patient_id, class",
            {"run": run_id},
        )

    _REASONS_DDL = """
    CREATE TABLE IF NOT EXISTS anomaly_reasons (
        model_id VARCHAR NOT NULL,
        run_id VARCHAR NOT NULL,
        patient_id VARCHAR NOT NULL,
        "rank" BIGINT,                      -- 1 = the feature furthest from the fit cohort
        target VARCHAR,                     -- the class whose explanation is unusual
        roi VARCHAR,                        -- where its mass is unusual
        value DOUBLE,
        median DOUBLE,                      -- the fit cohort's median of the feature
        z DOUBLE,                           -- robust z-score against the fit cohort
        class_score DOUBLE,                 -- the class forest's anomaly score of the patient
        class_decision DOUBLE               -- negative when the class forest flags the patient
    );
    """

    def write_anomaly_reasons(self, *, model_id: str, run_id: str, reasons: pl.DataFrame) -> int:
        """Store why each patient of an anomaly model scores as it does, replacing that model's reasons."""
        self._require_writer()
        self.con.execute(self._REASONS_DDL).fetchall()
        cols = ["patient_id", "rank", "target", "roi", "value", "median", "z", "class_score", "class_decision"]
        out = reasons.select(cols).with_columns(pl.lit(model_id).alias("model_id"), pl.lit(run_id).alias("run_id"))
        out = out.select("model_id", "run_id", *cols)
        with self._transaction():
            self.con.execute("DELETE FROM anomaly_reasons WHERE model_id = ?", [model_id]).fetchall()
            self._append("anomaly_reasons", out, columns=out.columns)
        return out.height

    def anomaly_reasons(self, run_id: str, model_id: str | None = None) -> pl.DataFrame:
        """Stored reasons of one model for a run (the run's latest model when ``model_id`` is None)."""
        if not self._has_table("anomaly_reasons"):
            return pl.DataFrame()
        model_id = model_id or self.latest_anomaly_model(run_id)
        return self.frame('SELECT * FROM anomaly_reasons WHERE run_id = ? AND model_id = ? '
                          'ORDER BY patient_id, "rank"', [run_id, model_id])

    def done_metadata(self, run_id: str) -> pl.DataFrame:
        """``patient_id`` and the manifest metadata of the done patients (bookkeeping columns left out)."""
        patients = self.patients(run_id)
        if patients.height == 0:
            return pl.DataFrame(schema={"patient_id": pl.String})
        patients = patients.filter(pl.col("status") == "done")
        return patients.select([c for c in patients.columns if c not in self.BOOKKEEPING_COLUMNS])


def check_read_only_sql(query: str) -> None:
    """Refuse SQL that would write, with a message that says where writes belong."""
    import re

    stripped = re.sub(r"--[^\n]*|/\*.*?\*/", " ", query, flags=re.S).strip().lower()
    statements = [s.strip() for s in stripped.split(";") if s.strip()]
    if len(statements) != 1:
        raise StoreError("give exactly one SQL statement (no ';'-separated scripts)")
    first = statements[0].split(None, 1)[0] if statements[0] else ""
    if first not in ("select", "with", "from", "describe", "show", "summarize", "explain", "values", "table"):
        raise StoreError(
            f"only read-only SQL is allowed here (got a {first.upper() or 'empty'} statement); "
            "the store is written by runs and analytics commands"
        )
    # The reader connection is opened read_only, so DuckDB itself refuses any write that slips
    # past this check; the check exists to give a clear message before anything runs.


def open(path: str | os.PathLike[str] = DEFAULT_DB) -> Store:  # noqa: A001 - mirrors duckdb.connect
    """Open a store read-only for exploration (notebooks, the CLI)."""
    return Store(path, read_only=True)


def open_writer(path: str | os.PathLike[str] = DEFAULT_DB) -> Store:
    """Open a store for writing; only one process may do so at a time."""
    return Store(path, read_only=False)


def rows_from_records(records: Iterable[Mapping[str, Any]], schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Build a frame with a fixed schema (empty input gives an empty, typed frame)."""
    return pl.DataFrame(list(records), schema=dict(schema))
