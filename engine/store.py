"""The DuckDB store: one schema, the single writer, readers, and live reads while a run writes.

Only this module (and its live endpoint, :mod:`engine.store_live`) speaks SQL to the database
file. One process holds the read-write connection; each patient's rows go in within one
transaction together with the patient's new status, so a reader never sees half a patient and a
crash loses nothing committed. Rows exist only for patients whose status is ``done``: a patient
that is computed again, or fails after having been done, has its earlier rows deleted in the
same transaction, and a patient that was never done is simply appended (no scan, no key index).

While a run holds the file DuckDB refuses other processes, so the writer serves read-only SQL
from its own database (:class:`engine.store_live.LiveServer`); :func:`open` uses it when the
file is locked and opens the file directly otherwise. Either way a reader sees every committed
patient.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from engine.errors import QueryError, UserError
from engine.results import PatientResult
from engine.store_live import DEFAULT_HOST, LiveClient, LiveError, LiveServer, check_read_only
from engine.vocabulary import DEFAULT_DB, PREDICTION_FEATURES, SIGNS, STATS  # one owner for the names

#: Version of the schema below; a store of another version is refused with a one-line reason.
SCHEMA_VERSION = 5

PATIENT_STATUSES = ("pending", "running", "done", "failed")

#: Columns of ``patients`` that the store keeps for itself; everything else a manifest gives
#: lives in ``metadata`` (JSON) and is read back by :meth:`Store.patient_metadata`.
BOOKKEEPING_COLUMNS = ("run_id", "patient_id", "image_path", "label_path", "metadata", "status", "error",
                       "traceback", "attempts", "worker", "seconds", "timings", "updated_at", "finished_at")

#: Every connection refuses file access and Python-object scans (defence in depth for read-only SQL),
#: and caps DuckDB's memory (it spills larger work to ``<db>.tmp``) so that a long run's cache
#: does not grow with the store: ``$AGG2EXP_DUCKDB_MEMORY`` (default 2GB).
_CONFIG = {"enable_external_access": False, "memory_limit": os.environ.get("AGG2EXP_DUCKDB_MEMORY", "2GB")}
#: The most importance rows :meth:`Store.importances` reads into one frame unless told otherwise (~1.6 GB).
EAGER_ROWS = 20_000_000

# Layout choices, measured (BENCHMARKS.md, "Store at scale"): no key index on the long tables
# (a 7-column text key cost ~220 B/row); ``stat`` and ``sign`` as ENUMs, and each patient's rows
# sorted by (method, stat, sign, target, roi) so that DuckDB stores them run-length encoded and the
# values of one kind sit together for ALP compression.
SCHEMA = f"""
CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TYPE importance_stat AS ENUM ({", ".join(f"'{s}'" for s in STATS)});
CREATE TYPE importance_sign AS ENUM ({", ".join(f"'{s}'" for s in SIGNS)});
CREATE TABLE runs (
    run_id VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL,              -- 'engine' (computed here) or 'import' (reference CSV)
    job_name VARCHAR,
    config JSON,
    versions JSON,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    status VARCHAR NOT NULL,            -- running, done, partial
    report JSON
);
CREATE TABLE patients (
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    image_path VARCHAR,
    label_path VARCHAR,
    metadata JSON,                      -- every other manifest column
    status VARCHAR NOT NULL,            -- pending, done, failed
    error VARCHAR,
    traceback VARCHAR,
    attempts INTEGER DEFAULT 0,
    worker VARCHAR,
    seconds DOUBLE,
    timings JSON,
    updated_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,            -- when the patient last ended (done or failed), UTC
    PRIMARY KEY (run_id, patient_id)
);
-- DuckDB scans a compound key sequentially; this single-column index is what makes the writer's
-- per-patient status lookup and UPDATE a point access (2 ms -> 0.5 ms at 100,000 patients).
CREATE INDEX patients_patient_id ON patients (patient_id);
CREATE TABLE predictions (
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    class VARCHAR NOT NULL,
    voxels BIGINT,
    dice DOUBLE,
    iou DOUBLE,
    confidence DOUBLE,                  -- mean softmax maximum over the class's predicted voxels
    entropy DOUBLE,                     -- mean softmax entropy (nats) over them; NULL: class not predicted
    input_mean DOUBLE,                  -- mean of the model's (preprocessed) input over them
    input_std DOUBLE,                   -- its standard deviation over them
    input_local DOUBLE                  -- 99.9th percentile over them of |input - its 3x3x3 mean|
);
CREATE TABLE importances (
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    method VARCHAR NOT NULL,
    target VARCHAR NOT NULL,
    roi VARCHAR NOT NULL,
    stat importance_stat NOT NULL,
    sign importance_sign NOT NULL,
    value DOUBLE                        -- NULL: a mean over an empty RoI
);
CREATE TABLE anomaly_models (
    model_id VARCHAR PRIMARY KEY,
    run_id VARCHAR NOT NULL,            -- the run that was scored
    fit_run_id VARCHAR NOT NULL,        -- the run the forests were fitted on
    mode VARCHAR NOT NULL,              -- 'within-run' or 'reference'
    method VARCHAR NOT NULL,
    sign VARCHAR NOT NULL,
    seed BIGINT,
    params JSON,
    features JSON,
    scorer VARCHAR,                     -- 'paper' (per-class forests), 'forest', 'neighbours', ...
    feature_set VARCHAR,                -- 'mass', 'mass+prediction', ... (engine.analytics.scoring)
    spearman_dice DOUBLE,
    spearman_p DOUBLE,
    created_at TIMESTAMPTZ
);
CREATE TABLE anomaly_scores (
    model_id VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    target VARCHAR NOT NULL,            -- a class name, or '__mean__' for the mean over classes
    score DOUBLE,                       -- anomaly score, -score_samples: higher is more anomalous
    raw_score DOUBLE,                   -- scikit-learn score_samples
    decision DOUBLE,                    -- scikit-learn decision_function (= raw_score - offset)
    "offset" DOUBLE
);
CREATE TABLE anomaly_reasons (
    model_id VARCHAR NOT NULL,
    run_id VARCHAR NOT NULL,
    patient_id VARCHAR NOT NULL,
    "rank" BIGINT,                      -- 1 = the feature furthest from the fit cohort
    target VARCHAR,                     -- the class whose explanation is unusual
    roi VARCHAR,                        -- where its mass is unusual
    value DOUBLE,
    median DOUBLE,                      -- the fit cohort's median of the feature
    z DOUBLE,                           -- robust z-score against the fit cohort
    class_score DOUBLE,                 -- the class's anomaly score (forest) or RMS robust z of its features
    class_decision DOUBLE,              -- negative when the class forest flags the patient (forests only)
    feature VARCHAR,                    -- the feature's name, e.g. 'mass_abs|heart|aorta', 'pred_entropy|liver'
    kind VARCHAR                        -- 'mass_abs', 'pred_confidence', ... (the part before the first '|')
);
CREATE TABLE audits (
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
CREATE TABLE graph_edges (
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
CREATE TABLE evaluations (
    run_id VARCHAR NOT NULL,            -- the evaluation's id (not a row of runs)
    patient_id VARCHAR NOT NULL,
    target VARCHAR NOT NULL,
    method VARCHAR NOT NULL,            -- a method, or 'A~B' for a pair (agreement)
    metric VARCHAR NOT NULL,
    value DOUBLE,
    params JSON,
    created_at TIMESTAMPTZ
);
-- Mean Dice over a patient's foreground classes (background excluded, classes without a label skipped).
CREATE VIEW patient_dice AS
SELECT run_id, patient_id, avg(dice) AS mean_dice, count(dice) AS n_classes
FROM predictions
WHERE class <> 'background' AND dice IS NOT NULL
GROUP BY run_id, patient_id;
INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');
"""

#: In-place upgrades: version -> the statements that take a store of that version to the next.
#: Each only adds (columns, indexes), so every row already stored keeps its meaning.
_UPGRADES: dict[int, tuple[str, ...]] = {
    3: ("ALTER TABLE predictions ADD COLUMN input_mean DOUBLE",
        "ALTER TABLE predictions ADD COLUMN input_std DOUBLE",
        "CREATE INDEX IF NOT EXISTS patients_patient_id ON patients (patient_id)"),
    4: ("ALTER TABLE predictions ADD COLUMN input_local DOUBLE",),
}

#: Column order and Polars dtypes of the importances table (the long format), as readers return it.
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
    "confidence": pl.Float64(),
    "entropy": pl.Float64(),
    "input_mean": pl.Float64(),
    "input_std": pl.Float64(),
    "input_local": pl.Float64(),
}

_KEY = ("method", "target", "roi", "stat", "sign")
_IMPORTANCE_SELECT = ("run_id, patient_id, method, target, roi, stat::VARCHAR AS stat, sign::VARCHAR AS sign, "
                      "value")


class StoreError(UserError):
    """A store problem the user can act on (missing file, unknown run, locked database)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _predicate_sql(predicate: pl.Expr | None, schema: Mapping[str, pl.DataType]) -> tuple[str | None, pl.Expr | None]:
    """Split a Polars filter into SQL for the live endpoint and what Polars must still apply.

    Uses DuckDB's own Polars-to-SQL translation (``duckdb.polars_io``, the same one behind
    ``relation.pl(lazy=True)``): conjuncts it translates go to the writer, and the whole
    predicate is applied again locally whenever one does not, so the result is always exact.
    """
    if predicate is None:
        return None, None
    try:
        from duckdb import polars_io as pio

        tree, dynamic = pio._strip_dynamic_predicates(json.loads(predicate.meta.serialize(format="json")))
        if tree is None:
            return None, None
        conjuncts = pio._conjuncts(tree)
        parts = [pio._tree_to_sql_expression(c, dict(schema)) for c in conjuncts]
        pushed = [str(p) for p in parts if p is not None]
        local = None
        if len(pushed) < len(conjuncts):
            local = pio._expression_from_tree(tree) if dynamic else predicate
        return (" AND ".join(f"({p})" for p in pushed) or None), local
    except Exception:  # noqa: BLE001 - a private helper that moved: filter everything locally
        return None, predicate


class Store:
    """A connection to one store file.

    ``read_only=True`` (the default for readers) never takes the write lock: the file is opened
    directly when no process holds it, and otherwise queries go to the live endpoint of the
    process that writes it (``is_live``). A writer (``read_only=False``) serves that endpoint
    on ``live_host`` (loopback by default) unless ``live=False``.
    """

    def __init__(self, path: str | os.PathLike[str], *, read_only: bool = True, live: bool = True,
                 live_host: str = DEFAULT_HOST) -> None:
        self.path = Path(path)
        self.read_only = read_only
        self.con: duckdb.DuckDBPyConnection | None = None
        self._client: LiveClient | None = None
        self._server: LiveServer | None = None
        if read_only:
            self._open_reader()
        else:
            self._open_writer()
        try:
            self._check_schema()
            if not read_only and live:
                self._server = LiveServer(self.con, self.path, host=live_host)  # type: ignore[arg-type]
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening
    @property
    def is_live(self) -> bool:
        """True when this reader queries a running writer through its live endpoint."""
        return self._client is not None

    @property
    def is_snapshot(self) -> bool:
        """Same as :attr:`is_live`: what a reader sees of a running job is its last committed state."""
        return self.is_live

    @property
    def live_endpoint(self) -> tuple[str, int] | None:
        """(host, port) this writer serves live reads on, or None."""
        return (self._server.host, self._server.port) if self._server is not None else None

    def _open_reader(self) -> None:
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}; run `agg2exp demo` or `agg2exp run JOB.toml` first, "
                             "or pass --db PATH")
        try:
            self.con = duckdb.connect(str(self.path), read_only=True, config=_CONFIG)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            # "lock": another process writes; "different configuration": this process does
            text = str(exc).lower()
            if "lock" not in text and "different configuration" not in text:
                raise StoreError(f"cannot open {self.path}: {_first_line(exc)}") from None
            try:
                self._client = LiveClient(self.path)
            except LiveError as err:
                raise StoreError(str(err)) from None

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.con = duckdb.connect(str(self.path), config=_CONFIG)
        except (duckdb.IOException, duckdb.ConnectionException) as exc:
            raise StoreError(f"cannot open {self.path} for writing: {_first_line(exc)}. Another run may be writing "
                             "to it; wait for it to finish or pass a different --db") from None

    def _check_schema(self) -> None:
        tables = {r[0] for r in self._rows(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'")}
        if not tables and not self.read_only:
            with self._transaction():
                self.con.execute(SCHEMA)  # type: ignore[union-attr]
            return
        if "meta" not in tables:
            raise StoreError(f"{self.path} is not an agg2exp store (it has no meta table); pass the --db of a store, "
                             "or a new file name to create one")
        rows = self._rows("SELECT value FROM meta WHERE key = 'schema_version'")
        found = int(rows[0][0]) if rows and str(rows[0][0]).isdigit() else 0
        if found in _UPGRADES and not self.read_only:
            with self._transaction():
                for version in range(found, SCHEMA_VERSION):
                    for statement in _UPGRADES[version]:
                        self._exec(statement)
                self._exec("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
            found = SCHEMA_VERSION
        if found != SCHEMA_VERSION:
            if found in _UPGRADES:
                what = ("open it once for writing to upgrade it in place (any command that writes, e.g. "
                        f"`agg2exp anomaly --db {self.path}`); the upgrade only adds what is new")
            elif found < SCHEMA_VERSION:
                what = "re-run the job (or `agg2exp import-csv`) into a new --db; this engine does not migrate stores this old"
            else:
                what = "upgrade the engine to read it"
            raise StoreError(f"{self.path} holds store schema {found or 'unknown'}, this engine reads schema "
                             f"{SCHEMA_VERSION}: {what}")

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.con is not None:
            self.con.close()
            self.con = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_writer(self) -> None:
        if self.read_only:
            raise StoreError("this store was opened read-only; open it with read_only=False to write")

    # ------------------------------------------------------------------ the one way reads run
    def _table(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pa.Table:
        """Run a query the store itself wrote (no guard) and return an Arrow table."""
        if self._client is not None:
            try:
                return self._client.query(query, params)
            except LiveError as exc:
                raise StoreError(str(exc)) from None
        return self.con.sql(query, params=params or None).to_arrow_table()  # type: ignore[union-attr]

    def _frame(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pl.DataFrame:
        out = pl.from_arrow(self._table(query, params))
        assert isinstance(out, pl.DataFrame)
        return out

    def _rows(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> list[tuple[Any, ...]]:
        if self._client is not None:
            t = self._table(query, params)
            return list(zip(*(c.to_pylist() for c in t.columns))) if t.num_columns else []
        return self.con.execute(query, params or None).fetchall()  # type: ignore[union-attr]

    def sql(self, query: str, params: Sequence[Any] | Mapping[str, Any] | None = None) -> pl.DataFrame:
        """Ad-hoc read-only SQL with bound parameters (``?`` or ``$name``), as a Polars frame.

        Only one statement that reads is accepted (DuckDB parses it; see
        :func:`engine.store_live.check_read_only`); anything else is refused on one line.
        """
        try:
            if self._client is None:
                check_read_only(query)
            return self._frame(query, params)
        except LiveError as exc:
            raise QueryError(str(exc)) from None
        except StoreError as exc:  # refusals from the live endpoint
            raise QueryError(str(exc)) from None
        except duckdb.Error as exc:
            raise QueryError(f"the query failed: {_first_line(exc)}") from None

    #: Older name of :meth:`sql`, kept for notebooks and scripts.
    frame = sql

    def run_named_query(self, query: str, params: Mapping[str, Any] | None = None) -> pl.DataFrame:
        """Run a named query's SQL with DuckDB named parameters (``$name``) bound, never formatted."""
        return self.sql(query, dict(params) if params else None)

    # ------------------------------------------------------------------ writing helpers
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction on the writer: committed on success, rolled back on any error."""
        self._require_writer()
        self.con.begin()  # type: ignore[union-attr]
        try:
            yield
        except BaseException:
            self.con.rollback()  # type: ignore[union-attr]
            raise
        self.con.commit()  # type: ignore[union-attr]

    def _exec(self, query: str, params: Sequence[Any] | None = None) -> list[tuple[Any, ...]]:
        return self.con.execute(query, params or None).fetchall()  # type: ignore[union-attr]

    def _append(self, table: str, frame: pl.DataFrame, *, columns: Sequence[str] | None = None,
                stamp: bool = False) -> None:
        """Insert a frame's rows through Arrow (in ``columns`` order), plus ``created_at`` when ``stamp``."""
        names = [f'"{c}"' for c in (columns or [])] + (["created_at"] if stamp and columns else [])
        target = f"{table} ({', '.join(names)})" if names else table
        self.con.register("_rows", frame.to_arrow())  # type: ignore[union-attr]
        try:
            self._exec(f"INSERT INTO {target} SELECT *{', ?' if stamp else ''} FROM _rows",  # noqa: S608
                       [_now()] if stamp else [])
        finally:
            self.con.unregister("_rows")  # type: ignore[union-attr]

    @staticmethod
    def _long_rows(run_id: str, importances: pl.DataFrame, predictions: pl.DataFrame,
                   patient_id: str | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Importances and predictions in the tables' column order and types, importances sorted for storage.

        One lazy plan per frame (a single collect): the writer runs this for every patient, and each
        eager Polars call costs ~0.1-0.3 ms of overhead at ~2,000 rows.
        """
        keys = [pl.lit(run_id).alias("run_id")]
        keys.append(pl.lit(patient_id).alias("patient_id") if patient_id is not None
                    else pl.col("patient_id").cast(pl.String))
        imp = (importances.lazy().with_columns(keys)
               .select([pl.col(c).cast(d) for c, d in IMPORTANCE_SCHEMA.items()])
               .sort("patient_id", "method", "stat", "sign", "target", "roi")
               .collect())
        missing = [pl.lit(None, dtype=d).alias(c) for c, d in PREDICTION_SCHEMA.items()
                   if c not in predictions.columns and c not in ("run_id", "patient_id")]
        pred = (predictions.lazy().with_columns(keys).with_columns(missing)
                .select([pl.col(c).cast(d) for c, d in PREDICTION_SCHEMA.items()])
                .collect())
        return imp, pred

    @staticmethod
    def _check_rows(imp: pl.DataFrame, pred: pl.DataFrame, what: str) -> None:
        """Refuse rows the tables must not hold, naming the first offending key.

        The common case (nothing wrong) is one pass: ``imp`` comes sorted by its whole key from
        :meth:`_long_rows`, so a duplicated key is two equal neighbours. The naming work below runs
        only when something is wrong.
        """
        key = ["patient_id", *_KEY]
        adjacent = pl.all_horizontal([pl.col(c) == pl.col(c).shift(1) for c in key]).fill_null(False)
        bad_stat, bad_sign, dup_imp = imp.select(
            (~pl.col("stat").is_in(list(STATS))).any(), (~pl.col("sign").is_in(list(SIGNS))).any(),
            adjacent.any()).row(0)
        dup_pred = pred.select(pl.struct("patient_id", "class").is_duplicated().any()).item()
        if not (bad_stat or bad_sign or dup_imp or dup_pred):
            return
        for col, allowed in (("stat", STATS), ("sign", SIGNS)):
            bad = imp.filter(~pl.col(col).is_in(list(allowed)))[col].unique().to_list()
            if bad:
                raise StoreError(f"{what}: unknown {col} value(s) {bad}; {col} must be one of {list(allowed)}")
        dup = imp.group_by(key).len().filter(pl.col("len") > 1)
        if dup.height:
            row = dup.sort(key).row(0, named=True)
            shown = ", ".join(f"{k}={row[k]!r}" for k in key)
            raise StoreError(f"{what}: the importance key ({shown}) appears {row['len']} times "
                             f"({dup.height} duplicated key(s) in all); each key may appear once — are two RoIs or "
                             "classes given the same name?")
        dup = pred.group_by("patient_id", "class").len().filter(pl.col("len") > 1)
        if dup.height:
            row = dup.sort("patient_id", "class").row(0, named=True)
            raise StoreError(f"{what}: class {row['class']!r} of patient {row['patient_id']!r} appears {row['len']} "
                             "times in the predictions; each class may appear once")

    def _delete_patient_rows(self, run_id: str, patient_id: str, methods: Sequence[str] | None = None) -> None:
        if methods is None:
            self._exec("DELETE FROM importances WHERE run_id = ? AND patient_id = ?", [run_id, patient_id])
        else:
            self._exec("DELETE FROM importances WHERE run_id = ? AND patient_id = ? AND list_contains(?, method)",
                       [run_id, patient_id, list(methods)])
        self._exec("DELETE FROM predictions WHERE run_id = ? AND patient_id = ?", [run_id, patient_id])

    def _patient_status(self, run_id: str, patient_id: str) -> str:
        rows = self._exec("SELECT status FROM patients WHERE run_id = ? AND patient_id = ?", [run_id, patient_id])
        if not rows:
            raise StoreError(f"patient {patient_id!r} is not registered in run {run_id!r}; register it with "
                             "register_patients before writing its results")
        return str(rows[0][0])

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
        if self._exec("SELECT 1 FROM runs WHERE run_id = ?", [run_id]):
            self._exec("UPDATE runs SET status = 'running', finished_at = NULL WHERE run_id = ?", [run_id])
            return False
        self._exec(
            "INSERT INTO runs (run_id, kind, job_name, config, versions, started_at, status) "
            "VALUES (?, ?, ?, ?, ?, ?, 'running')",
            [run_id, kind, job_name, json.dumps(config, default=str), json.dumps(dict(versions or {})), _now()],
        )
        return True

    def verify_unique(self, run_id: str) -> dict[str, Any]:
        """Check once that no (patient, method, target, roi, stat, sign) of the run appears twice.

        One GROUP BY over a 64-bit hash of the key (2.7x faster than over the six columns); hashes
        seen twice, if any, are then confirmed on the columns themselves, so a collision never
        reports a false duplicate. Returns ``{"rows", "duplicate_keys", "first", "seconds"}``.
        """
        t0 = time.perf_counter()
        key = "hash(patient_id, method, target, roi, stat, sign)"
        dups: list[tuple[Any, ...]] = []
        if self._rows(f"SELECT 1 FROM importances WHERE run_id = ? GROUP BY {key} HAVING count(*) > 1 LIMIT 1",  # noqa: S608
                      [run_id]):
            dups = self._rows(
                "SELECT patient_id, method, target, roi, stat::VARCHAR, sign::VARCHAR, count(*) FROM importances "
                f"WHERE run_id = ? AND {key} IN (SELECT {key} FROM importances WHERE run_id = ? "  # noqa: S608
                f"GROUP BY {key} HAVING count(*) > 1) GROUP BY ALL HAVING count(*) > 1 ORDER BY ALL",
                [run_id, run_id])
        first = dict(zip(("patient_id", *_KEY, "count"), dups[0])) if dups else None
        return {"rows": self._count("importances", run_id), "duplicate_keys": len(dups), "first": first,
                "seconds": round(time.perf_counter() - t0, 3)}

    def finish_run(self, run_id: str, *, status: str, report: Mapping[str, Any] | None = None) -> None:
        """Mark a run finished, after checking once that its importance keys are unique.

        The check is stored in the run report (``uniqueness``); duplicates raise a :class:`StoreError`
        naming the first duplicated key (the run is then marked ``duplicates``).
        """
        self._require_writer()
        check = self.verify_unique(run_id)
        full = dict(report or {}) | {"uniqueness": check}
        if check["duplicate_keys"]:
            status = "duplicates"
        self._exec("UPDATE runs SET status = ?, finished_at = ?, report = ? WHERE run_id = ?",
                   [status, _now(), json.dumps(full, default=str), run_id])
        if check["duplicate_keys"]:
            f = check["first"]
            raise StoreError(f"run {run_id!r} holds {check['duplicate_keys']} duplicated importance key(s), e.g. "
                             f"patient {f['patient_id']!r}, {f['method']}/{f['target']}/{f['roi']}/{f['stat']}/"
                             f"{f['sign']} x{f['count']}; re-run those patients into a new --db and report this")

    # ------------------------------------------------------------------ patients
    def register_patients(self, run_id: str, manifest: pl.DataFrame) -> int:
        """Add manifest rows as ``pending`` patients; returns how many were new.

        ``manifest`` needs ``patient_id`` and ``image_path``; ``label_path`` is optional and every
        other column is kept as metadata (JSON). A patient registered again keeps its status and
        results but takes the manifest's paths and metadata.
        """
        self._require_writer()
        if "patient_id" not in manifest.columns:
            raise StoreError("the manifest has no patient_id column")
        ids = manifest["patient_id"].cast(pl.String)
        if ids.is_duplicated().any():
            dup = ids.filter(ids.is_duplicated()).unique().sort().to_list()
            raise StoreError(f"the manifest lists patient(s) {dup[:5]} more than once; patient ids must be unique")
        meta_cols = [c for c in manifest.columns if c not in ("patient_id", "image_path", "label_path")]
        metadata = [json.dumps({c: rec[c] for c in meta_cols}, default=str)
                    for rec in manifest.select(meta_cols).iter_rows(named=True)] if meta_cols else ["{}"] * manifest.height
        now = _now()
        rows = pl.DataFrame({
            "run_id": [run_id] * manifest.height,
            "patient_id": ids,
            "image_path": (manifest["image_path"].cast(pl.String).fill_null("") if "image_path" in manifest.columns
                           else pl.Series([""] * manifest.height, dtype=pl.String)),
            "label_path": (manifest["label_path"].cast(pl.String) if "label_path" in manifest.columns
                           else pl.Series([None] * manifest.height, dtype=pl.String)),
            "metadata": pl.Series(metadata, dtype=pl.String),
        })
        before = self._count("patients", run_id)
        with self._transaction():
            self.con.register("_rows", rows.to_arrow())  # type: ignore[union-attr]
            try:
                self._exec(
                    "INSERT INTO patients (run_id, patient_id, image_path, label_path, metadata, status, updated_at) "
                    "SELECT run_id, patient_id, image_path, label_path, metadata, 'pending', ? FROM _rows "
                    "ON CONFLICT (run_id, patient_id) DO UPDATE SET image_path = excluded.image_path, "
                    "label_path = excluded.label_path, metadata = excluded.metadata",
                    [now])
            finally:
                self.con.unregister("_rows")  # type: ignore[union-attr]
        return self._count("patients", run_id) - before

    def write_patient(self, run_id: str, result: PatientResult) -> int:
        """Store one patient's rows and its ``done`` status in one transaction.

        Earlier rows of the patient are deleted first only when it was ``done`` before (the only
        state in which it has rows); a duplicated key inside the result is refused, naming it.
        Returns the number of importance rows written.
        """
        self._require_writer()
        imp, pred = self._long_rows(run_id, result.importances, result.predictions, result.patient_id)
        self._check_rows(imp, pred, f"patient {result.patient_id!r} of run {run_id!r}")
        with self._transaction():
            if self._patient_status(run_id, result.patient_id) == "done":
                self._delete_patient_rows(run_id, result.patient_id, imp["method"].unique().to_list())
            self._append("importances", imp)
            self._append("predictions", pred)
            now = _now()
            self._exec(
                "UPDATE patients SET status = 'done', error = NULL, traceback = NULL, worker = ?, seconds = ?, "
                "timings = ?, attempts = attempts + 1, updated_at = ?, finished_at = ? "
                "WHERE run_id = ? AND patient_id = ?",
                [result.worker, result.seconds, json.dumps(dict(result.timings or {})), now, now,
                 run_id, result.patient_id],
            )
        return imp.height

    def mark_failed(
        self, run_id: str, patient_id: str, *, error: str, traceback: str | None = None,
        worker: str | None = None,
    ) -> None:
        """Record a patient as failed with a readable reason; rows of an earlier success are deleted with it."""
        self._require_writer()
        with self._transaction():
            if self._patient_status(run_id, patient_id) == "done":
                self._delete_patient_rows(run_id, patient_id)
            now = _now()
            self._exec(
                "UPDATE patients SET status = 'failed', error = ?, traceback = ?, worker = ?, "
                "attempts = attempts + 1, updated_at = ?, finished_at = ? WHERE run_id = ? AND patient_id = ?",
                [error, traceback, worker, now, now, run_id, patient_id],
            )

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
        imp, pred = self._long_rows(run_id, importances, predictions)
        self._check_rows(imp, pred, f"run {run_id!r}")
        self.create_run(run_id, config=dict(config or {}), kind=kind)
        ids = sorted(set(imp["patient_id"].to_list()) | set(pred["patient_id"].to_list()))
        meta_by_id: dict[str, dict[str, Any]] = {}
        if metadata is not None:
            cols = [c for c in metadata.columns if c != "patient_id"]
            for rec in metadata.iter_rows(named=True):
                meta_by_id[str(rec["patient_id"])] = {c: rec[c] for c in cols}
        now = _now()
        rows = [(run_id, pid, "", None, json.dumps(meta_by_id.get(pid, {}), default=str), "done", 1, now, now)
                for pid in ids]
        with self._transaction():
            for table in ("importances", "predictions", "patients"):
                self._exec(f"DELETE FROM {table} WHERE run_id = ?", [run_id])  # noqa: S608
            self.con.executemany(  # type: ignore[union-attr]
                "INSERT INTO patients (run_id, patient_id, image_path, label_path, metadata, status, "
                "attempts, updated_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            self._append("importances", imp)
            self._append("predictions", pred)
        counts = self.table_counts(run_id)
        self.finish_run(run_id, status="done", report={"imported": counts})
        return counts

    # ------------------------------------------------------------------ readers: runs
    def run_ids(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT run_id FROM runs ORDER BY started_at")]

    def latest_run(self) -> str:
        rows = self._rows("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")
        if not rows:
            raise StoreError(f"{self.path} holds no runs yet")
        return str(rows[0][0])

    def require_run(self, run_id: str | None) -> str:
        """The given run id if it exists (the latest run when None); a clear error otherwise."""
        if run_id is None:
            return self.latest_run()
        if not self._rows("SELECT 1 FROM runs WHERE run_id = ?", [run_id]):
            known = ", ".join(self.run_ids()) or "none"
            raise StoreError(f"run {run_id!r} is not in {self.path}; known runs: {known}")
        return run_id

    def run_info(self, run_id: str) -> dict[str, Any]:
        rows = self._frame("SELECT * FROM runs WHERE run_id = ?", [run_id]).to_dicts()
        if not rows:
            raise StoreError(f"run {run_id!r} is not in {self.path}")
        out = rows[0]
        for key in ("config", "versions", "report"):
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    def _count(self, table: str, run_id: str) -> int:
        assert table in ("patients", "importances", "predictions")
        return int(self._rows(f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id])[0][0])  # noqa: S608

    def table_counts(self, run_id: str) -> dict[str, int]:
        return {t: self._count(t, run_id) for t in ("patients", "predictions", "importances")}

    # ------------------------------------------------------------------ readers: patients
    def patient_ids(self, run_id: str, *, status: Sequence[str] | None = None) -> list[str]:
        if status is None:
            rows = self._rows("SELECT patient_id FROM patients WHERE run_id = ? ORDER BY patient_id", [run_id])
        else:
            rows = self._rows("SELECT patient_id FROM patients WHERE run_id = ? AND list_contains(?, status) "
                              "ORDER BY patient_id", [run_id, list(status)])
        return [r[0] for r in rows]

    def status_counts(self, run_id: str) -> dict[str, int]:
        rows = self._rows("SELECT status, count(*) FROM patients WHERE run_id = ? GROUP BY status", [run_id])
        return {s: 0 for s in PATIENT_STATUSES} | {r[0]: int(r[1]) for r in rows}

    def _patient_rows(self, run_id: str | None, *, status: Sequence[str] | None = None,
                      patient_ids: Sequence[str] | None = None) -> pl.DataFrame:
        where, params = [], []
        if run_id is not None:
            where.append("run_id = ?")
            params.append(self.require_run(run_id))
        if status is not None:
            where.append("list_contains(?, status)")
            params.append(list(status))
        if patient_ids is not None:
            where.append("list_contains(?, patient_id)")
            params.append([str(p) for p in patient_ids])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        return self._frame(f"SELECT * FROM patients {clause} ORDER BY run_id, patient_id", params)  # noqa: S608

    @staticmethod
    def _metadata_frame(metadata: Sequence[str | None]) -> pl.DataFrame:
        records = [json.loads(m) if m else {} for m in metadata]
        if not any(records):
            return pl.DataFrame(schema={})
        return pl.DataFrame(records, infer_schema_length=None)

    def patient_metadata(self, run_id: str | None = None, *, status: Sequence[str] | None = ("done",)) -> pl.DataFrame:
        """``patient_id`` and the manifest's metadata columns, under the manifest's own names.

        The one reader of patients' metadata: bookkeeping columns never appear, so a metadata
        column may be called ``status`` or ``seconds``. ``status=None`` gives every patient.
        """
        rows = self._patient_rows(run_id, status=status)
        meta = self._metadata_frame(rows["metadata"].to_list()) if rows.height else pl.DataFrame(schema={})
        ids = rows.select(pl.col("patient_id").cast(pl.String))
        return pl.concat([ids, meta], how="horizontal") if meta.width else ids

    def patients(self, run_id: str | None = None, *, unnest_metadata: bool = True) -> pl.DataFrame:
        """Patients with their status; with ``unnest_metadata`` the metadata become columns.

        A metadata column named like a bookkeeping column (``status``, ``seconds``, ...) is
        shown as ``meta_<name>``; :meth:`patient_metadata` gives metadata under their own names.
        """
        df = self._patient_rows(run_id)
        if unnest_metadata and df.height:
            meta = self._metadata_frame(df["metadata"].to_list())
            renames = {}
            for c in meta.columns:
                new = c
                while new in df.columns or new in renames.values() or (new != c and new in meta.columns):
                    new = f"meta_{new}"
                if new != c:
                    renames[c] = new
            df = pl.concat([df.drop("metadata"), meta.rename(renames)], how="horizontal")
        return df

    def manifest_records(self, run_id: str, patient_ids: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """Each patient's manifest record (``patient_id``, ``image_path``, ``label_path`` and metadata), by id."""
        rows = self._patient_rows(run_id, patient_ids=patient_ids)
        out: dict[str, dict[str, Any]] = {}
        for r in rows.iter_rows(named=True):
            rec = dict(json.loads(r["metadata"]) if r["metadata"] else {})
            rec.update(patient_id=str(r["patient_id"]), image_path=r["image_path"] or None,
                       label_path=r["label_path"] or None)
            out[str(r["patient_id"])] = rec
        return out

    def failed_patients(self, run_id: str) -> pl.DataFrame:
        """``patient_id``, ``error`` of the run's failed patients."""
        return self._frame("SELECT patient_id, error FROM patients WHERE run_id = ? AND status = 'failed' "
                           "ORDER BY patient_id", [run_id])

    # ------------------------------------------------------------------ readers: results
    def importances(self, run_id: str | None = None, *, lazy: bool = False,
                    max_rows: int | None = EAGER_ROWS) -> pl.DataFrame | pl.LazyFrame:
        """The importances of one run (or all), in the long format.

        ``lazy=True`` returns a Polars LazyFrame over a DuckDB relation: filters and column
        selections are pushed down to DuckDB, so only the rows asked for are read. An eager read of
        more than ``max_rows`` rows is refused with what to do instead (a frame takes ~80 B a row and
        twice that while it is read: a 100,000-patient run, 194 M rows, took 24 GB before it was
        killed); ``max_rows=None`` reads whatever there is.
        """
        query = f"SELECT {_IMPORTANCE_SELECT} FROM importances"
        params: list[Any] = []
        if run_id is not None:
            query += " WHERE run_id = ?"
            params.append(self.require_run(run_id))
        if not lazy:
            if max_rows is not None:
                (n,) = self._rows(f"SELECT count(*) FROM ({query})", params)[0]  # noqa: S608
                if n > max_rows:
                    what = f"run {run_id!r}" if run_id is not None else "the store"
                    raise StoreError(
                        f"{what} holds {n:,} importance rows (about {n * 80 / 2**30:.0f} GB as one frame, twice that while "
                        f"it is read), more than "
                        f"max_rows={max_rows:,}; read it lazily and filter, e.g. importances(run_id, lazy=True)"
                        ".filter(pl.col('target') == 'heart').collect(), or pass max_rows=None to load it whole")
            return self._frame(query, params).cast(IMPORTANCE_SCHEMA)  # type: ignore[arg-type]
        if self._client is None:
            return self.con.cursor().sql(query, params=params or None).pl(lazy=True)  # type: ignore[union-attr]
        return self._remote_lazy(query, params, IMPORTANCE_SCHEMA)

    def _remote_lazy(self, query: str, params: list[Any], schema: Mapping[str, pl.DataType]) -> pl.LazyFrame:
        """A LazyFrame over the live endpoint: columns and row limits go to the writer, batches stream back."""
        from polars.io.plugins import register_io_source

        client = self._client
        assert client is not None

        def source(with_columns: list[str] | None, predicate: pl.Expr | None, n_rows: int | None,
                   batch_size: int | None) -> Iterator[pl.DataFrame]:
            pushed, local = _predicate_sql(predicate, schema)
            # the predicate may need columns the projection drops: filter first, then project
            cols = ", ".join(f'"{c}"' for c in with_columns) if with_columns and local is None else "*"
            sql = f"SELECT {cols} FROM ({query})"  # noqa: S608
            if pushed:
                sql += f" WHERE {pushed}"
            if n_rows is not None and local is None:
                sql += f" LIMIT {int(n_rows)}"
            try:
                reader = client.reader(sql, params)
            except LiveError as exc:
                raise StoreError(str(exc)) from None
            for batch in reader:
                df = pl.from_arrow(batch)
                assert isinstance(df, pl.DataFrame)
                if local is not None:
                    df = df.filter(local)
                    if with_columns:
                        df = df.select(with_columns)
                yield df

        return register_io_source(source, schema=pl.Schema(dict(schema)))

    def predictions(self, run_id: str | None = None) -> pl.DataFrame:
        if run_id is None:
            return self._frame("SELECT * FROM predictions")
        return self._frame("SELECT * FROM predictions WHERE run_id = ?", [self.require_run(run_id)])

    def patient_dice(self, run_id: str) -> pl.DataFrame:
        """``patient_id``, ``mean_dice`` (mean over foreground classes; the ``patient_dice`` view)."""
        return self._frame("SELECT patient_id, mean_dice FROM patient_dice WHERE run_id = ? ORDER BY patient_id",
                           [run_id])

    # ------------------------------------------------------------------ anomaly
    def anomaly_scores(self, run_id: str | None = None) -> pl.DataFrame:
        if run_id is None:
            return self._frame("SELECT * FROM anomaly_scores")
        return self._frame("SELECT * FROM anomaly_scores WHERE run_id = ?", [self.require_run(run_id)])

    def latest_anomaly_model(self, run_id: str) -> str | None:
        """The most recently created anomaly model that scored ``run_id`` (None if none)."""
        rows = self._rows("SELECT model_id FROM anomaly_models WHERE run_id = ? ORDER BY created_at DESC LIMIT 1",
                          [run_id])
        return str(rows[0][0]) if rows else None

    def anomaly_model(self, model_id: str) -> dict[str, Any]:
        """One anomaly model's description (``params`` and ``features`` decoded)."""
        rows = self._frame("SELECT * FROM anomaly_models WHERE model_id = ?", [model_id]).to_dicts()
        if not rows:
            raise StoreError(f"anomaly model {model_id!r} is not in {self.path}")
        out = rows[0]
        for key in ("params", "features"):
            if isinstance(out.get(key), str):
                out[key] = json.loads(out[key])
        return out

    def anomaly_model_scores(self, run_id: str, model_id: str | None = None) -> pl.DataFrame:
        """Scores of one model for a run (the latest model when ``model_id`` is None)."""
        run_id = self.require_run(run_id)
        if model_id is None:
            model_id = self.latest_anomaly_model(run_id)
            if model_id is None:
                return self._frame("SELECT * FROM anomaly_scores WHERE false")
        elif not self._rows("SELECT 1 FROM anomaly_models WHERE model_id = ? AND run_id = ?", [model_id, run_id]):
            raise StoreError(f"anomaly model {model_id!r} did not score run {run_id!r}; "
                             f"run `agg2exp anomaly --run {run_id}` first")
        return self._frame("SELECT * FROM anomaly_scores WHERE model_id = ?", [model_id])

    def top_anomalies(self, run_id: str, *, k: int = 5, target: str = "__mean__") -> pl.DataFrame:
        """The ``k`` highest scores of the run's latest anomaly model for ``target``, with each patient's metadata.

        Columns: ``patient_id``, ``score`` and the metadata (as :meth:`patient_metadata` names them).
        """
        model_id = self.latest_anomaly_model(run_id)
        if model_id is None:
            return pl.DataFrame(schema={"patient_id": pl.String, "score": pl.Float64})
        top = self._frame("SELECT patient_id, score FROM anomaly_scores WHERE model_id = ? AND target = ? "
                          "ORDER BY score DESC, patient_id LIMIT ?", [model_id, target, k])
        meta = self.patient_metadata(run_id, status=None)
        return top.join(meta, on="patient_id", how="left", maintain_order="left")

    def write_anomaly(self, *, model: Mapping[str, Any], scores: pl.DataFrame) -> None:
        """Store one anomaly model's description and its scores, replacing an earlier model_id."""
        self._require_writer()
        model_id = str(model["model_id"])
        cols = ["model_id", "run_id", "fit_run_id", "mode", "method", "sign", "seed", "params",
                "features", "scorer", "feature_set", "spearman_dice", "spearman_p"]
        vals = [model.get(c) for c in cols]
        for i, c in enumerate(cols):
            if c in ("params", "features"):
                vals[i] = json.dumps(vals[i], default=str)
        out = scores.with_columns(pl.lit(model_id).alias("model_id")).select(
            "model_id", "run_id", "patient_id", "target", "score", "raw_score", "decision", "offset"
        )
        with self._transaction():
            self._exec("DELETE FROM anomaly_scores WHERE model_id = ?", [model_id])
            self._exec("DELETE FROM anomaly_models WHERE model_id = ?", [model_id])
            self._exec(
                f"INSERT INTO anomaly_models ({', '.join(cols)}, created_at) "
                f"VALUES ({', '.join('?' * len(cols))}, ?)",
                [*vals, _now()],
            )
            self._append("anomaly_scores", out)

    # ------------------------------------------------------------------ audits and graphs
    def write_audit(
        self, *, audit_id: str, run_id: str, results: pl.DataFrame, model_id: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Store one audit's ranked results, replacing an earlier audit with the same id."""
        cols = ["rank", "column", "family", "target", "roi", "test", "groups", "n", "statistic", "p_value",
                "q_value", "effect", "effect_size", "ci_low", "ci_high", "significant"]
        out = results.select(cols).with_columns(
            pl.lit(audit_id).alias("audit_id"), pl.lit(run_id).alias("run_id"),
            pl.lit(model_id, dtype=pl.String).alias("model_id"),
            pl.lit(json.dumps(dict(params or {}), default=str)).alias("params"),
        ).select("audit_id", "run_id", "model_id", "params", *cols)
        with self._transaction():
            self._exec("DELETE FROM audits WHERE audit_id = ?", [audit_id])
            self._append("audits", out, columns=out.columns, stamp=True)

    def audits(self, run_id: str | None = None) -> pl.DataFrame:
        """Stored audit results (empty when no audit was ever written)."""
        if run_id is None:
            return self._frame('SELECT * FROM audits ORDER BY audit_id, "column", "rank"')
        return self._frame('SELECT * FROM audits WHERE run_id = ? ORDER BY audit_id, "column", "rank"', [run_id])

    def write_graph(
        self, *, graph_id: str, run_id: str, edges: Mapping[str, pl.DataFrame],
        params: Mapping[str, Any] | None = None,
    ) -> int:
        """Store the kept edges of each subgroup under one graph id (replacing it); returns the count."""
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
            self._exec("DELETE FROM graph_edges WHERE graph_id = ?", [graph_id])
            self._append("graph_edges", out, columns=out.columns, stamp=True)
        return out.height

    def graph_edges(self, run_id: str | None = None) -> pl.DataFrame:
        """Stored graph edges (empty when no graph was ever saved)."""
        if run_id is None:
            return self._frame('SELECT * FROM graph_edges ORDER BY graph_id, subgroup, target, "rank"')
        return self._frame('SELECT * FROM graph_edges WHERE run_id = ? ORDER BY graph_id, subgroup, target, "rank"',
                          [run_id])
    def write_evaluations(self, run_id: str, rows: pl.DataFrame, *, params: Mapping[str, Any] | None = None) -> int:
        """Store one evaluation's rows (patient_id, target, method, metric, value), replacing that run id.

        Returns the number of rows written.
        """
        self._require_writer()
        out = rows.select(
            pl.lit(run_id).alias("run_id"), pl.col("patient_id").cast(pl.String), pl.col("target").cast(pl.String),
            pl.col("method").cast(pl.String), pl.col("metric").cast(pl.String), pl.col("value").cast(pl.Float64),
            pl.lit(json.dumps(dict(params or {}), default=str, sort_keys=True)).alias("params"),
        )
        with self._transaction():
            self._exec("DELETE FROM evaluations WHERE run_id = ?", [run_id])
            self._append("evaluations", out, stamp=True)
        return out.height

    def evaluations(self, run_id: str | None = None) -> pl.DataFrame:
        """Stored evaluation rows (empty when no evaluation was ever written)."""
        cols = "run_id, patient_id, target, method, metric, value, params, created_at"
        if run_id is None:
            return self._frame(f"SELECT {cols} FROM evaluations ORDER BY run_id, patient_id, method, target, metric")  # noqa: S608
        return self._frame(f"SELECT {cols} FROM evaluations WHERE run_id = ? "  # noqa: S608
                          "ORDER BY patient_id, method, target, metric", [run_id])

    # ------------------------------------------------------------------ analytics readers
    # What the cohort analytics (engine.analytics) read: done patients only, filtered, pivoted and
    # aggregated here so that the long importances table never leaves DuckDB.

    #: Separator of target and RoI in ``importance_wide``'s column names.
    FEATURE_SEP = "\x1f"

    #: Columns of ``patients`` that are bookkeeping, not cohort metadata.
    BOOKKEEPING_COLUMNS = ("run_id", "image_path", "label_path", "status", "error", "traceback", "attempts",
                           "worker", "seconds", "timings", "updated_at", "finished_at")

    _DONE = "patient_id IN (SELECT patient_id FROM patients WHERE run_id = $run AND status = 'done')"
    #: The rows of one method/sign/stat of a run's done patients (``_selection``'s parameters).
    _SELECTION = f"run_id = $run AND method = $method AND sign = $sign AND stat = $stat AND {_DONE}"

    @staticmethod
    def _selection(run_id: str, method: str, sign: str, stat: str) -> dict[str, Any]:
        """The bound parameters of :attr:`_SELECTION`."""
        return {"run": run_id, "method": method, "sign": sign, "stat": stat}

    def importance_methods(self, run_id: str) -> list[str]:
        """Attribution methods with importance rows of done patients."""
        rows = self._rows(
            f"SELECT DISTINCT method FROM importances WHERE run_id = $run AND {self._DONE} ORDER BY method",  # noqa: S608
            {"run": run_id},
        )
        return [r[0] for r in rows]

    def importance_wide(self, run_id: str, *, method: str, sign: str = "abs", stat: str = "mass") -> pl.DataFrame:
        """Done patients x (target, RoI) values of one method/sign/stat, pivoted by DuckDB.

        Columns: ``patient_id`` then ``f"{target}{FEATURE_SEP}{roi}"``; null where a patient has no row.
        """
        where, params = self._SELECTION, self._selection(run_id, method, sign, stat)
        features = self._rows(
            f"SELECT DISTINCT target, roi FROM importances WHERE {where} ORDER BY target, roi", params  # noqa: S608
        )
        if not features:
            return pl.DataFrame(schema={"patient_id": pl.String})
        # The (target, roi) -> index table travels as bound lists (a registered table would not reach a
        # live writer's endpoint). PIVOT needs its IN list spelled out to accept bound parameters; the
        # list is feature indices (integers made here), never text from the data.
        keys = {"k_target": [str(f[0]) for f in features], "k_roi": [str(f[1]) for f in features],
                "k_idx": list(range(len(features)))}
        in_list = ", ".join(str(i) for i in range(len(features)))
        wide = self._frame(
            "PIVOT (SELECT i.patient_id, k.idx, i.value FROM importances i "  # noqa: S608
            "JOIN (SELECT unnest($k_target) AS target, unnest($k_roi) AS roi, unnest($k_idx) AS idx) k "
            "ON k.target = i.target AND k.roi = i.roi "
            "WHERE i.run_id = $run AND i.method = $method AND i.sign = $sign AND i.stat = $stat "
            f"AND i.{self._DONE}) "
            f"ON idx IN ({in_list}) USING avg(value) GROUP BY patient_id ORDER BY patient_id",
            params | keys,
        )
        names = {str(i): f"{t}{self.FEATURE_SEP}{r}" for i, (t, r) in enumerate(features)}
        return wide.rename({c: names[c] for c in wide.columns if c in names})

    def prediction_wide(self, run_id: str) -> pl.DataFrame:
        """Done patients x what the model predicted, pivoted by DuckDB.

        Columns: ``patient_id`` then ``pred_voxels|<class>``, ``pred_confidence|<class>`` and
        ``pred_entropy|<class>`` (the names :mod:`engine.analytics.scoring` uses); null where a patient
        has no row or the value was not computed.
        """
        params = {"run": run_id}
        classes = [r[0] for r in self._rows(
            f"SELECT DISTINCT class FROM predictions WHERE run_id = $run AND {self._DONE} ORDER BY class",  # noqa: S608
            params)]
        if not classes:
            return pl.DataFrame(schema={"patient_id": pl.String})
        # One aggregate per (what, class), the class bound as a parameter; the aliases are indices made here.
        cols, names = [], {}
        for what, kind in PREDICTION_FEATURES:
            for c in classes:
                i = len(cols)
                params[f"c{i}"] = c
                cols.append(f"first(CAST({what} AS DOUBLE)) FILTER (WHERE class = $c{i}) AS f{i}")
                names[f"f{i}"] = f"{kind}|{c}"
        wide = self.frame(
            f"SELECT patient_id, {', '.join(cols)} FROM predictions "  # noqa: S608
            f"WHERE run_id = $run AND {self._DONE} GROUP BY patient_id ORDER BY patient_id", params)
        return wide.rename(names)

    def importance_box_stats(self, run_id: str, *, method: str, sign: str = "abs", stat: str = "mass") -> pl.DataFrame:
        """Box-plot statistics per (target, roi) over done patients, as matplotlib's ``boxplot_stats`` defines
        them: ``n``, quartiles ``q1, med, q3`` (linear interpolation), whiskers ``whislo, whishi`` (the furthest
        values within 1.5 IQR of the box, never inside it), ``vmin, vmax``. Null values are left out."""
        where = f"{self._SELECTION} AND value IS NOT NULL"
        return self._frame(
            # v is read twice (the quartiles, then the whiskers against them) rather than held: at 100,000
            # patients it is 32 M values
            f"WITH v AS NOT MATERIALIZED (SELECT target, roi, value FROM importances WHERE {where}), "  # noqa: S608
            "qs AS (SELECT target, roi, count(*) AS n, quantile_cont(value, [0.25, 0.5, 0.75]) AS qs, min(value) AS vmin, "
            "max(value) AS vmax FROM v GROUP BY target, roi), "
            "q AS (SELECT target, roi, n, qs[1] AS q1, qs[2] AS med, qs[3] AS q3, vmin, vmax FROM qs), "
            "w AS (SELECT v.target, v.roi, "
            "min(v.value) FILTER (WHERE v.value >= q.q1 - 1.5 * (q.q3 - q.q1)) AS lo, "
            "max(v.value) FILTER (WHERE v.value <= q.q3 + 1.5 * (q.q3 - q.q1)) AS hi "
            "FROM v JOIN q ON v.target = q.target AND v.roi = q.roi GROUP BY v.target, v.roi) "
            "SELECT CAST(q.target AS VARCHAR) AS target, CAST(q.roi AS VARCHAR) AS roi, q.n, q.q1, q.med, q.q3, "
            "CASE WHEN w.lo IS NULL OR w.lo > q.q1 THEN q.q1 ELSE w.lo END AS whislo, "
            "CASE WHEN w.hi IS NULL OR w.hi < q.q3 THEN q.q3 ELSE w.hi END AS whishi, q.vmin, q.vmax "
            "FROM q JOIN w ON q.target = w.target AND q.roi = w.roi ORDER BY 1, 2",
            self._selection(run_id, method, sign, stat),
        )

    def importance_points(
        self, run_id: str, *, method: str, sign: str = "abs", stat: str = "mass", patients: int = 400, seed: int = 0,
    ) -> pl.DataFrame:
        """``target, roi, patient_id, value`` of at most ``patients`` done patients (all when fewer), the same
        patients for every (target, roi), drawn by a hash seeded with ``seed``: the dots of a strip plot."""
        return self._frame(
            "WITH chosen AS (SELECT patient_id FROM patients WHERE run_id = $run AND status = 'done' "
            "ORDER BY hash(concat(patient_id, ':', $seed)), patient_id LIMIT $patients) "
            "SELECT CAST(target AS VARCHAR) AS target, CAST(roi AS VARCHAR) AS roi, CAST(patient_id AS VARCHAR) "
            "AS patient_id, value FROM importances WHERE run_id = $run AND method = $method AND sign = $sign "
            "AND stat = $stat AND value IS NOT NULL AND patient_id IN (SELECT patient_id FROM chosen) "
            "ORDER BY target, roi, patient_id",
            self._selection(run_id, method, sign, stat) | {"patients": int(patients), "seed": int(seed)},
        )

    def importance_sums(
        self, run_id: str, *, method: str, sign: str = "abs", stat: str = "mass",
        patient_ids: Sequence[str] | None = None,
    ) -> pl.DataFrame:
        """Per (target, roi) over done patients: ``total`` (sum), ``n_values`` and ``n_patients``.

        ``n_patients`` counts the done patients with any row for the target, so that a mean over
        them counts a patient without a row for a RoI as 0 (an empty RoI has no mass).
        """
        where, params = self._SELECTION, self._selection(run_id, method, sign, stat)
        if patient_ids is not None:
            # a hash semi-join on the unnested list: at 100,000 patients in three groups `graph --by site`
            # took 8.5 s against 15.6 s with list_contains per row (the same edges)
            where += " AND patient_id IN (SELECT unnest($ids))"
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

    def write_anomaly_reasons(self, *, model_id: str, run_id: str, reasons: pl.DataFrame) -> int:
        """Store why each patient of an anomaly model scores as it does, replacing that model's reasons."""
        self._require_writer()
        cols = ["patient_id", "rank", "target", "roi", "value", "median", "z", "class_score", "class_decision",
                "feature", "kind"]
        for col in ("feature", "kind"):
            if col not in reasons.columns:
                reasons = reasons.with_columns(pl.lit(None, dtype=pl.String).alias(col))
        out = reasons.select(cols).with_columns(pl.lit(model_id).alias("model_id"), pl.lit(run_id).alias("run_id"))
        out = out.select("model_id", "run_id", *cols)
        with self._transaction():
            self.con.execute("DELETE FROM anomaly_reasons WHERE model_id = ?", [model_id]).fetchall()
            self._append("anomaly_reasons", out, columns=out.columns)
        return out.height

    def anomaly_reasons(self, run_id: str, model_id: str | None = None) -> pl.DataFrame:
        """Stored reasons of one model for a run (the run's latest model when ``model_id`` is None)."""
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
    """Refuse SQL that does not only read (one line, :class:`QueryError`); see :func:`engine.store_live.check_read_only`."""
    try:
        check_read_only(query)
    except LiveError as exc:
        raise QueryError(str(exc)) from None


def open(path: str | os.PathLike[str] = DEFAULT_DB) -> Store:  # noqa: A001 - mirrors duckdb.connect
    """Open a store read-only for exploration (notebooks, the CLI), live while a run writes it."""
    return Store(path, read_only=True)


def open_writer(path: str | os.PathLike[str] = DEFAULT_DB, *, live: bool = True,
                live_host: str = DEFAULT_HOST) -> Store:
    """Open a store for writing; only one process may do so at a time. It serves live reads on ``live_host``."""
    return Store(path, read_only=False, live=live, live_host=live_host)


def open_writer_or_live(path: str | os.PathLike[str] = DEFAULT_DB) -> Store:
    """A writer when no other process writes the store; while a run writes it, a read-only view of the
    run's committed patients through its live endpoint (``read_only`` is then True: results computed on
    it cannot be stored until the run ends). For the analytics commands, which store what they compute
    but can still show it mid-run."""
    try:
        return open_writer(path)
    except StoreError as locked:
        try:
            reader = open(path)
        except StoreError:
            raise locked from None
        if not reader.is_live:  # the lock had another cause; say that one
            reader.close()
            raise locked from None
        return reader


def rows_from_records(records: Iterable[Mapping[str, Any]], schema: Mapping[str, pl.DataType]) -> pl.DataFrame:
    """Build a frame with a fixed schema (empty input gives an empty, typed frame)."""
    return pl.DataFrame(list(records), schema=dict(schema))


__all__ = ["DEFAULT_DB", "SCHEMA_VERSION", "PatientResult", "Store", "StoreError", "open", "open_writer",
           "open_writer_or_live"]
