"""``agg2exp show PATIENT [--target aorta]``: one patient's attribution on three slices (Fig. 2).

Without ``--target`` the class behind the patient's top anomaly reason (the run's latest anomaly
model) is shown.

The map is recomputed with the run's model and configuration from the patient's stored image
path, rendered to PNG and, with ``--nifti DIR``, exported on the CT grid for 3D Slicer / ITK-SNAP.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.commands.query import add_db_argument
from engine.errors import UserError


def handle(args: argparse.Namespace) -> int:
    from engine import store
    from engine.report import figures
    from engine.report.maps import MapRecomputer, MapsUnavailable
    from engine.report.nifti import export_explanation, safe_filename

    with store.open(args.db) as s:
        run_id = s.require_run(args.run)
        info = s.run_info(run_id)
        records = s.manifest_records(run_id, [args.patient])
        if args.patient not in records:
            known = s.patient_ids(run_id)
            shown = ", ".join(known[:8]) + (f", ... ({len(known)} in all)" if len(known) > 8 else "")
            raise UserError(f"patient {args.patient!r} is not in run {run_id!r}; its patients are: {shown or 'none'} "
                            f"(list them with `agg2exp sql \"SELECT patient_id FROM patients WHERE run_id = "
                            f"'{run_id}'\"`)")
        imp_methods = s.importance_methods(run_id)
        config = dict(info.get("config") or {})
        class_names = list(config.get("class_names") or [])
        if args.target is None:
            explained = list((config.get("attribution") or {}).get("targets") or class_names)
            args.target = _target_of_top_reason(s, run_id, args.patient, explained or None)
    if class_names and args.target not in class_names:
        raise UserError(f"unknown target {args.target!r}; the run's classes are: {', '.join(class_names)}")
    record = records[args.patient]
    if not record.get("image_path"):
        raise UserError(f"patient {args.patient!r} of run {run_id!r} has no stored image path (an imported run?); "
                        "`show` needs a run computed by this engine, with images it can read")
    try:
        recomputer = MapRecomputer(config, device=args.device)
    except MapsUnavailable as exc:
        raise UserError(f"cannot recompute maps for run {run_id!r}: {exc}") from None
    if args.target not in recomputer.class_names:
        raise UserError(f"unknown target {args.target!r}; the model's classes are: {', '.join(recomputer.class_names)}")
    method = args.method or recomputer.spec.attribution.method
    pm = recomputer.compute(record, [args.target], method=method)
    if args.method and imp_methods and args.method not in imp_methods:
        print(f"note: run {run_id} stored importances for {imp_methods}; showing {args.method} anyway")
    maps = pm.explanation.maps or {}
    if args.target not in maps:
        voxels = pm.explanation.voxels()
        predicted = [n for n, v in voxels.items() if v > 0 and n != "background"]
        raise UserError(f"{args.target!r} is not predicted in patient {args.patient!r}, so it has no attribution; "
                        f"predicted classes: {', '.join(predicted) or 'none'}")
    out = args.out or Path(f"{safe_filename(args.patient)}_{safe_filename(args.target)}_{safe_filename(method)}.png")
    fig = figures.slice_overlay(
        pm.case.image, maps[args.target], pm.explanation.prediction, args.target, class_names=pm.class_names,
        title=f"{args.patient} ({run_id}): {method} attribution of {args.target}",
    )
    print(figures.save_png(fig, out))
    if args.nifti is not None:
        for p in export_explanation(pm.case, pm.explanation, args.nifti):
            print(p)
    return 0


def _target_of_top_reason(s: Any, run_id: str, patient_id: str, class_names: list[str] | None) -> str:
    """The class behind the patient's top stored anomaly reason (one with an attribution map)."""
    from engine.analytics.anomaly import reason_text, top_reason_target

    model_id = s.latest_anomaly_model(run_id)
    reasons = s.anomaly_reasons(run_id, model_id) if model_id else None
    target = top_reason_target(reasons, patient_id, classes=class_names) if reasons is not None else None
    if target is None:
        raise UserError(f"no --target given and patient {patient_id!r} has no stored anomaly reason naming a class "
                        f"of run {run_id!r}; pass --target CLASS (or run `agg2exp anomaly --run {run_id}` first)")
    first = reasons.filter((reasons["patient_id"] == patient_id) & (reasons["target"] == target)).sort("rank").row(
        0, named=True)
    print(f"target {target}: behind {patient_id}'s top anomaly reason, {reason_text(first)} (model {model_id})")
    return target


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "show", help="recompute one patient's attribution map and render it on three slices (Fig. 2)",
        description=("Recompute the attribution of one class (default: the class behind the patient's top anomaly "
                     "reason) for one patient with the run's model and settings, "
                     "render sagittal/coronal/axial slices through the class to PNG, and optionally export the "
                     "maps and prediction as NIfTI on the CT grid."),
    )
    p.add_argument("patient", help="patient id")
    p.add_argument("--target", default=None,
                   help="class to explain, e.g. aorta (default: the class behind the patient's top anomaly reason "
                        "in the run's latest anomaly model)")
    p.add_argument("--run", default=None, help="run (default the latest run)")
    p.add_argument("--method", default=None, help="attribution method (default the run's)")
    p.add_argument("--out", type=Path, default=None, help="PNG path (default PATIENT_TARGET_METHOD.png)")
    p.add_argument("--nifti", type=Path, default=None, help="also write NIfTI maps and prediction to this folder")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="device (default cpu)")
    add_db_argument(p)
    p.set_defaults(handler=handle)


__all__ = ["handle", "register"]
