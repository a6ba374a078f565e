"""The driver: registers the cohort, feeds actors through a bounded queue, and is the one writer.

Flow: resolve the cohort (manifest or phantoms) → register every patient as ``pending`` (a
resumed run keeps what is ``done``) → validate the model once on the driver, before any patient
→ start or join Ray → dispatch to a pool of actors that follows the cluster, with the results
committed one transaction per patient by a writer thread (``engine.runtime.dispatch``) → anomaly
scoring (skipped when the run stopped before finishing) → run report (JSON, stored with the run).
"""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from engine import store as store_mod
from engine.cohorts import resolve_cohort
from engine.errors import UserError
from engine.job_setup import explainer_record
from engine.jobs import JobSpec
from engine.pipeline import build_model
from engine.runtime.cluster import RayContext, connect, disconnect
from engine.runtime.dispatch import ResultWriter, Scheduler
from engine.runtime.progress import Progress
from engine.store import Store

log = logging.getLogger("engine.runtime")


@dataclass
class RunSummary:
    """What a run did; ``exit_code`` is 0 when every patient is done, 1 when some failed."""

    run_id: str
    db: Path
    counts: dict[str, int]
    computed: int
    skipped_done: int
    rows: dict[str, int]
    seconds: float
    report: dict[str, Any] = field(default_factory=dict)
    anomaly_model: str | None = None
    stopped: str | None = None  # why the run stopped before finishing (no worker, cluster lost)

    @property
    def exit_code(self) -> int:
        """0: every patient done; 1: some failed; 3: the run stopped by itself (rerun resumes)."""
        if self.stopped:
            return 3
        return 1 if self.counts.get("failed", 0) else 0


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour decides the numbers."""
    out = {"python": platform.python_version()}
    for name in ("engine", "torch", "monai", "captum", "ray", "duckdb", "polars", "sklearn", "numpy"):
        try:
            mod = __import__(name)
            out[name] = str(getattr(mod, "__version__", "?"))
        except ImportError:
            continue
    return out




def run_job(
    spec: JobSpec,
    *,
    db: str | os.PathLike[str] = store_mod.DEFAULT_DB,
    run_id: str | None = None,
    resume: bool = True,
    address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    on_result: Callable[[str, str], None] | None = None,
) -> RunSummary:
    """Run a job on Ray and stream its rows into the store at ``db``.

    ``resume`` (default) continues an existing run with the same id, computing only patients that
    are not ``done``; ``resume=False`` refuses to touch an existing run. ``on_result(patient_id,
    status)`` is called on this thread after each patient is committed (tests use it to interrupt
    runs); it holds up dispatch while it runs, so keep it short.
    """
    t_start = time.perf_counter()
    run_id = run_id or spec.default_run_id()
    db_path = Path(db)
    # Validate the model before any patient is processed (and before Ray starts).
    loaded = build_model(spec)
    class_names = list(loaded.class_names)
    explainer = explainer_record(spec, loaded)  # resolved settings, SmoothGrad's σ included
    del loaded
    manifest = resolve_cohort(spec, progress=progress)
    writer = store_mod.open_writer(db_path)
    try:
        existed = run_id in writer.run_ids()
        if existed and not resume:
            raise UserError(f"run {run_id!r} already exists in {db_path}; pass --resume to continue it or a new --run-id")
        config = spec.to_dict() | {"class_names": class_names, "explainer": explainer}
        writer.create_run(run_id, config=config, versions=versions(), job_name=spec.name)
        writer.register_patients(run_id, manifest)
        already = set(writer.patient_ids(run_id, status=["done"]))
        records = [r for r in manifest.iter_rows(named=True) if str(r["patient_id"]) not in already]
        if existed:
            print(f"resuming run {run_id}: {len(already)} of {manifest.height} patients already done; "
                  f"computing {len(records)}", file=sys.stderr)
        stats: dict[str, Any] = {"devices": [], "writer_seconds": 0.0, "timings": {}}
        if records:
            stats = _dispatch(spec, writer, run_id, records, address=address, workers=workers, progress=progress,
                              on_result=on_result)
        stopped = stats.get("stopped")
        counts = writer.status_counts(run_id)
        anomaly_model = None
        if spec.anomaly.enabled and counts.get("done", 0) >= 2 and not stopped:
            anomaly_model = _score_anomalies(writer, spec, run_id)
        report = {
            "run_id": run_id,
            "versions": versions(),
            "devices": stats["devices"],
            "configuration": config,
            "counts": counts,
            "computed": len(records),
            "skipped_done": len(already),
            "seconds": round(time.perf_counter() - t_start, 3),
            **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in stats.items() if k != "devices"},
            "stopped": stopped,
            "anomaly_model": anomaly_model,
        }
        status = "done" if counts.get("failed", 0) == 0 and counts.get("pending", 0) == 0 else "partial"
        writer.finish_run(run_id, status=status, report=report)
        rows = writer.table_counts(run_id)
    finally:
        writer.close()
    return RunSummary(
        run_id=run_id, db=db_path, counts=counts, computed=len(records), skipped_done=len(already), rows=rows,
        seconds=time.perf_counter() - t_start, report=report, anomaly_model=anomaly_model, stopped=stopped,
    )


def _score_anomalies(writer: Store, spec: JobSpec, run_id: str) -> str | None:
    from engine.analytics import anomaly

    model, scores = anomaly.score_run(
        writer, run_id=run_id, reference_run_id=spec.anomaly.reference_run, seed=spec.anomaly.seed,
        n_estimators=spec.anomaly.n_estimators, method=spec.attribution.method, scorer=spec.anomaly.scorer,
        feature_set=spec.anomaly.feature_set, reasons=spec.anomaly.top_k_reasons,
    )
    writer.write_anomaly(model=model, scores=scores)
    if model.get("reasons") is not None:
        writer.write_anomaly_reasons(model_id=model["model_id"], run_id=run_id, reasons=model["reasons"])
    return str(model["model_id"])


def _worker_plan(spec: JobSpec, ctx: RayContext, workers: int | None) -> tuple[int | None, dict[str, float]]:
    """At most how many actors (None: as many as the cluster offers, nodes that join included)
    and what each reserves: ``threads_per_worker`` CPUs, plus ``gpus_per_worker`` GPUs when
    the cluster has GPUs (Ray then sets each actor's ``CUDA_VISIBLE_DEVICES`` to its own)."""
    rt = spec.runtime
    cap = workers or rt.workers
    reserve: dict[str, float] = {"num_cpus": rt.threads_per_worker}
    if rt.device != "cpu" and ctx.n_gpus > 0:
        reserve["num_gpus"] = rt.gpus_per_worker
    elif rt.device == "cuda":
        raise UserError("[runtime] device = 'cuda' but the Ray cluster has no GPUs")
    return cap, reserve


def _dispatch(
    spec: JobSpec, writer: Store, run_id: str, records: list[Mapping[str, Any]], *, address: str | None,
    workers: int | None, progress: bool, on_result: Callable[[str, str], None] | None,
) -> dict[str, Any]:
    """Start or join Ray, run the scheduler and the writer over ``records``, and report."""
    rt = spec.runtime
    local_cpus = max(os.cpu_count() or 1, (workers or rt.workers or 0) * rt.threads_per_worker)
    ctx = connect(address, num_cpus=local_cpus, timeout_s=rt.worker_timeout_s)
    try:
        cap, reserve = _worker_plan(spec, ctx, workers)
        spec_dict = spec.to_sections()
        bar = Progress(total=len(records), enabled=progress)
        result_writer = ResultWriter(writer, run_id, bar, on_result)
        scheduler = Scheduler(
            ctx=ctx, actor_cls=remote_worker_class_for(spec),
            actor_args=(spec_dict, spec.base_dir, rt.threads_per_worker), reserve=reserve, records=records,
            writer=result_writer, bar=bar, in_flight=rt.in_flight, max_attempts=rt.max_attempts,
            max_workers=cap, worker_timeout_s=rt.worker_timeout_s, patient_timeout_s=rt.patient_timeout_s,
        )
        try:
            scheduler.run()
        finally:
            scheduler.shutdown()
            result_writer.close()  # commit everything that was computed, whatever happened
            bar.close()
        result_writer.run_callbacks()
        result_writer.raise_error()
        t_first = scheduler.t_first_ready
        return {
            **scheduler.report(),
            "devices": [a.info for a in scheduler.actors if a.info],
            "writer_seconds": result_writer.seconds,
            "writer_backlog_max": result_writer.max_backlog,
            "timings": result_writer.timings(),
            "dispatch_seconds": time.perf_counter() - t_first if t_first else 0.0,
            "ray": {"address": ctx.address, "started_locally": ctx.started, "resources": ctx.resources,
                    "reserve_per_worker": reserve, "max_workers": cap},
        }
    finally:
        disconnect(ctx)


def remote_worker_class_for(spec: JobSpec) -> Any:
    from engine.runtime.worker import remote_worker_class

    return remote_worker_class()

