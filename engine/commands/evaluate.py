"""``agg2exp evaluate JOB.toml``: the paper's benchmark of attribution methods on a cohort.

The job file is a normal job (``[job]``, ``[cohort]``, ``[model]``, ``[preprocess]``; the window
settings and the objective come from ``[attribution]``, through the same explainer as a run) plus an ``[evaluate]`` section
with the fields of :class:`engine.analytics.evaluate.EvaluateSpec`. ``[model] kind = "demo"`` with
``weights = "untrained"`` uses the untrained demo UNet (for trying the command without weights).
Rows go into the store's ``evaluations`` table; the paper's table is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engine.commands.query import add_db_argument
from engine.errors import JobSpecError


def load_evaluation(path: str | Path) -> tuple[Any, Any]:
    """(JobSpec, EvaluateSpec) from a job file with an ``[evaluate]`` section."""
    from engine.jobs import JobSpec, read_job_file

    p = Path(path)
    data = read_job_file(p, example="engine/resources/jobs/evaluate_demo.toml")
    model = dict(data.get("model", {}))
    untrained = model.get("kind", "demo") == "demo" and model.get("weights") == "untrained"
    if untrained:
        model.pop("weights")
        data["model"] = model
    data.setdefault("evaluate", {})
    job = JobSpec.from_dict(data, base_dir=p.parent.resolve())
    spec = job.evaluate
    return (job, untrained), spec


def _patients(job: Any, limit: int | None, loaded: Any, preprocess: Any) -> Iterator[tuple[str, Any]]:
    """(patient_id, preprocessed image (C, X, Y, Z)) of the job's cohort, read as ``agg2exp run`` reads it."""
    from engine import cohorts, volumes

    manifest = cohorts.resolve_cohort(job, progress=False)
    if limit is not None:
        manifest = manifest.head(limit)
    for record in manifest.iter_rows(named=True):
        if loaded.case_loader is not None:  # nnU-Net: its own preprocessor
            case = loaded.case_loader(record)
        else:
            case = volumes.load_case(record, preprocess=preprocess)
        yield case.patient_id, case.image


def handle(args: argparse.Namespace) -> int:
    import torch

    from engine import models, store
    from engine.analytics.evaluate import ModelSetup, evaluate_cohort, format_report
    from engine.job_setup import build_model, explainer_for, preprocess_for, resolve_device

    (job, untrained), spec = load_evaluation(args.job)
    if args.paper_defaults:
        spec = spec.with_paper_defaults()
    if args.seed is not None:
        from dataclasses import replace

        spec = replace(spec, seed=args.seed)
    if args.patients is not None and args.patients < 1:
        raise JobSpecError(f"--patients must be at least 1, got {args.patients}")
    loaded = models.demo_model(weights=None) if untrained else build_model(job)
    if untrained:
        models.validate_model(loaded)
    device = resolve_device(job.runtime.device)
    threads = args.threads if args.threads is not None else job.runtime.threads_per_worker
    if threads < 1:
        raise JobSpecError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    model = loaded.module.to(device).eval()
    a = job.attribution
    pre = preprocess_for(job, loaded)
    explainer = explainer_for(job, loaded, device, pre)
    setup = ModelSetup(class_names=tuple(loaded.class_names), explainer=explainer, input_range=(pre.b_min, pre.b_max))
    unknown = [t for t in spec.targets if t not in setup.class_names]
    if unknown:
        raise JobSpecError(f"[evaluate] targets {unknown} are not classes of the model; "
                           f"classes are {list(setup.class_names)}")
    sigma_abs = spec.smoothgrad_sigma * (pre.b_max - pre.b_min)
    sigma = {"smoothgrad_sigma_abs": sigma_abs,
             "smoothgrad_sigma_hu": spec.smoothgrad_sigma * (pre.a_max - pre.a_min)}
    params = {"job": job.name, "model": loaded.source, "evaluate": spec.to_dict(), "overlap": a.overlap,
              "blend": a.blend, "objective": a.objective, "roi_size": list(loaded.roi_size), **sigma,
              "cohort": json.loads(json.dumps(job.to_dict()["cohort"])), "patients": args.patients}
    run_id = args.run_id or f"evaluate-{job.name}-" + hashlib.sha256(
        json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:10]
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.verbose else None
    t0 = time.perf_counter()
    rows = evaluate_cohort(model, _patients(job, args.patients, loaded, pre), setup=setup, spec=spec, log=log)
    seconds = time.perf_counter() - t0
    if rows.height == 0:
        raise JobSpecError("no patient had any of the target classes in its prediction; nothing was evaluated")
    with store.open_writer(args.db) as s:
        n = s.write_evaluations(run_id, rows, params={**params, "seconds": round(seconds, 2)})
    n_patients = rows["patient_id"].n_unique()
    print(f"evaluation {run_id}: {n_patients} patient(s), {len(spec.methods)} method(s), {n} rows in {args.db} "
          f"({seconds:.1f}s; model {loaded.source})")
    print(format_report(rows, methods=spec.methods, targets=spec.targets, threshold=spec.stability_threshold))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "evaluate", help="benchmark attribution methods (faithfulness, sensitivity, complexity, cost)",
        description="Evaluate attribution methods on a cohort with the paper's metrics (faithfulness "
                    "correlation, average sensitivity, effective complexity), their cost, the agreement of "
                    "their RoI importances and SmoothGrad's stability; rows go to the evaluations table.",
    )
    p.add_argument("job", metavar="JOB.toml", help="job file with an [evaluate] section (see engine/resources/jobs/evaluate_demo.toml)")
    p.add_argument("--patients", type=int, default=None, help="evaluate only the first N patients")
    p.add_argument("--paper-defaults", action="store_true",
                   help="the paper's parameters: 100 faithfulness runs of 0.3%% of the volume (the paper's 50,176 "
                        "voxels of a CT), 3 perturbations, 20 SmoothGrad samples, IG with 20 evenly spaced steps, "
                        "KernelSHAP with 200/1,000 samples and 8 cubes per axis, clean segments under perturbation")
    p.add_argument("--seed", type=int, default=None, help="override [evaluate] seed")
    p.add_argument("--run-id", default=None, help="id of the stored evaluation (default from the job and parameters)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default [runtime] threads_per_worker; 1 is fastest on a busy machine)")
    p.add_argument("--verbose", "-v", action="store_true", help="log progress to stderr")
    add_db_argument(p)
    p.set_defaults(handler=handle)
