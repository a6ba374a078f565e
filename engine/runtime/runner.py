"""The driver: registers the cohort, feeds actors through a bounded queue, and is the one writer.

Flow: resolve the cohort (manifest or phantoms) → register every patient as ``pending`` (a
resumed run keeps what is ``done``) → validate the model once on the driver, before any patient
→ start actors → keep at most ``in_flight`` patients per actor → write each result in its own
transaction as it arrives → re-queue patients whose worker died (up to ``max_attempts``) →
anomaly scoring → run report (JSON, stored with the run).
"""

from __future__ import annotations

import collections
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
from engine.pipeline import Failure, build_model
from engine.runtime.cluster import RayContext, connect, disconnect
from engine.runtime.progress import Progress
from engine.store import PatientResult, Store

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

    @property
    def exit_code(self) -> int:
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


def _worker_plan(spec: JobSpec, ctx: RayContext, workers: int | None) -> tuple[int, dict[str, float]]:
    """How many actors and what each reserves: one per GPU when there are GPUs, else CPU slots."""
    rt = spec.runtime
    use_gpu = rt.device != "cpu" and ctx.n_gpus > 0
    if use_gpu:
        n = max(1, int(ctx.n_gpus / rt.gpus_per_worker))
        if workers is not None:
            n = min(n, workers)
        return n, {"num_gpus": rt.gpus_per_worker, "num_cpus": 1}
    if rt.device == "cuda":
        raise UserError("[runtime] device = 'cuda' but the Ray cluster has no GPUs")
    n = workers or rt.workers or max(1, ctx.n_cpus // rt.threads_per_worker)
    return n, {"num_cpus": rt.threads_per_worker}


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
    status)`` is called after each patient is committed (tests use it to interrupt runs).
    """
    t_start = time.perf_counter()
    run_id = run_id or spec.default_run_id()
    db_path = Path(db)
    # Validate the model before any patient is processed (and before Ray starts).
    loaded = build_model(spec)
    class_names = list(loaded.class_names)
    explainer = explainer_record(spec, loaded.roi_size)  # resolved settings, SmoothGrad's σ included
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
        stats = _Dispatch(spec, writer, run_id, records, address=address, workers=workers, progress=progress,
                          on_result=on_result).run() if records else {"devices": [], "writer_seconds": 0.0,
                                                                        "timings": {}, "requeued": 0}
        counts = writer.status_counts(run_id)
        anomaly_model = None
        if spec.anomaly.enabled and counts.get("done", 0) >= 2:
            anomaly_model = _score_anomalies(writer, spec, run_id)
        report = {
            "run_id": run_id,
            "versions": versions(),
            "devices": stats["devices"],
            "configuration": config,
            "counts": counts,
            "computed": len(records),
            "skipped_done": len(already),
            "requeued_after_worker_loss": stats["requeued"],
            "seconds": round(time.perf_counter() - t_start, 3),
            "writer_seconds": round(stats["writer_seconds"], 3),
            "dispatch_seconds": round(stats.get("dispatch_seconds", 0.0), 3),
            "ray": stats.get("ray"),
            "timings": stats["timings"],
            "anomaly_model": anomaly_model,
        }
        status = "done" if counts.get("failed", 0) == 0 and counts.get("pending", 0) == 0 else "partial"
        writer.finish_run(run_id, status=status, report=report)
        rows = writer.table_counts(run_id)
    finally:
        writer.close()
    return RunSummary(
        run_id=run_id, db=db_path, counts=counts, computed=len(records), skipped_done=len(already), rows=rows,
        seconds=time.perf_counter() - t_start, report=report, anomaly_model=anomaly_model,
    )


def _score_anomalies(writer: Store, spec: JobSpec, run_id: str) -> str | None:
    from engine.analytics import anomaly

    model, scores = anomaly.score_run(
        writer, run_id=run_id, reference_run_id=spec.anomaly.reference_run, seed=spec.anomaly.seed,
        n_estimators=spec.anomaly.n_estimators, method=spec.attribution.method,
    )
    writer.write_anomaly(model=model, scores=scores)
    if model.get("reasons") is not None:
        writer.write_anomaly_reasons(model_id=model["model_id"], run_id=run_id, reasons=model["reasons"])
    return str(model["model_id"])


class _Dispatch:
    """Bounded, fault-tolerant dispatch of patients to actors, with the driver as the writer."""

    def __init__(
        self, spec: JobSpec, writer: Store, run_id: str, records: list[Mapping[str, Any]], *,
        address: str | None, workers: int | None, progress: bool,
        on_result: Callable[[str, str], None] | None,
    ) -> None:
        self.spec, self.writer, self.run_id = spec, writer, run_id
        self.records = records
        self.address, self.workers, self.progress = address, workers, progress
        self.on_result = on_result

    def run(self) -> dict[str, Any]:
        import ray
        from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

        ctx = connect(self.address, num_cpus=None)
        try:
            n_actors, resources = _worker_plan(self.spec, ctx, self.workers)
            n_actors = min(n_actors, len(self.records))
            actor_cls = remote_worker_class_for(self.spec)
            spec_dict = self.spec.to_sections()
            actors = [
                actor_cls.options(**resources).remote(spec_dict, self.spec.base_dir, self.spec.runtime.threads_per_worker, i)
                for i in range(n_actors)
            ]
            devices = ray.get([a.info.remote() for a in actors])
            queue: collections.deque[tuple[dict[str, Any], int]] = collections.deque(
                (dict(r), 0) for r in self.records
            )
            inflight: dict[Any, tuple[int, dict[str, Any], int]] = {}
            pings: dict[Any, int] = {}  # health pings of actors that are restarting
            unavailable: set[int] = set()
            load = [0] * n_actors
            bar = Progress(total=len(self.records), enabled=self.progress)
            t_dispatch = time.perf_counter()  # actors are up and the model loaded: throughput starts here
            writer_seconds = 0.0
            requeued = 0
            stage_totals: dict[str, list[float]] = collections.defaultdict(list)
            limit = self.spec.runtime.in_flight

            def start_actor(i: int) -> Any:
                return actor_cls.options(**resources).remote(
                    spec_dict, self.spec.base_dir, self.spec.runtime.threads_per_worker, i
                )

            def actor_lost(i: int) -> None:
                if i not in unavailable:
                    unavailable.add(i)
                    pings[actors[i].pid.remote()] = i

            while queue or inflight:
                for i, actor in enumerate(actors):
                    while queue and load[i] < limit and i not in unavailable:
                        record, attempts = queue.popleft()
                        inflight[actor.process.remote(record)] = (i, record, attempts)
                        load[i] += 1
                bar.set_in_flight(len(inflight))
                ready, _ = ray.wait([*inflight, *pings], num_returns=1, timeout=1.0)
                for ref in ready:
                    if ref in pings:
                        i = pings.pop(ref)
                        try:
                            ray.get(ref)
                            unavailable.discard(i)  # restarted and serving again
                        except ActorDiedError:
                            log.warning("worker %d is gone for good; starting a replacement", i)
                            actors[i] = start_actor(i)
                            pings[actors[i].pid.remote()] = i
                        except RayActorError:
                            time.sleep(0.5)  # still restarting
                            pings[actors[i].pid.remote()] = i
                        continue
                    i, record, attempts = inflight.pop(ref)
                    load[i] -= 1
                    pid = str(record["patient_id"])
                    try:
                        outcome = ray.get(ref)
                    except (RayActorError, RayTaskError) as exc:
                        actor_lost(i)
                        if attempts + 1 < self.spec.runtime.max_attempts:
                            queue.appendleft((record, attempts + 1))
                            requeued += 1
                            log.warning("worker lost while processing %s; re-queued (attempt %d)", pid, attempts + 2)
                            continue
                        outcome = Failure(pid, f"worker died {attempts + 1} times while processing this patient "
                                               f"(last: {type(exc).__name__}); check memory and the volume",
                                          str(exc)[-4000:], "driver")
                    t0 = time.perf_counter()
                    if isinstance(outcome, PatientResult):
                        self.writer.write_patient(self.run_id, outcome)
                        for k, v in (outcome.timings or {}).items():
                            stage_totals[k].append(float(v))
                        status = "done"
                    else:
                        self.writer.mark_failed(self.run_id, pid, error=outcome.error, traceback=outcome.traceback,
                                                worker=outcome.worker)
                        status = "failed"
                    writer_seconds += time.perf_counter() - t0
                    bar.update(status, pid=pid, error=None if status == "done" else outcome.error)  # type: ignore[union-attr]
                    if self.on_result is not None:
                        self.on_result(pid, status)
            bar.close()
            timings = {
                k: {"total": round(sum(v), 3), "median": round(sorted(v)[len(v) // 2], 4)}
                for k, v in stage_totals.items()
            }
            for a in actors:
                ray.kill(a)
            return {"devices": devices, "writer_seconds": writer_seconds, "timings": timings, "requeued": requeued,
                    "dispatch_seconds": time.perf_counter() - t_dispatch,
                    "ray": {"address": ctx.address, "started_locally": ctx.started, "resources": ctx.resources}}
        finally:
            disconnect(ctx)


def remote_worker_class_for(spec: JobSpec) -> Any:
    from engine.runtime.worker import remote_worker_class

    return remote_worker_class(max_restarts=max(0, spec.runtime.max_attempts))

