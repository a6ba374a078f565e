"""Anomaly detection measured on anomaly kinds the scorer was not tuned on.

Cohorts come from the phantom generator: per cohort seed, ``--normals`` normal patients and
``--per-kind`` patients of every kind of the anomaly library (:mod:`engine.corruptions`: acquisition
faults, pathology, devices, anatomical variants, wrong inputs), each a fresh patient. Every patient
goes through the real engine path (``PatientProcessor``: NIfTI read, MONAI preprocessing, the demo
UNet, SmoothGrad with the demo job's settings, RoI aggregation), plus one extra sliding-window forward
pass for the softmax confidence and entropy of each predicted class (the store's ``predictions`` table
holds voxels and Dice only). Each patient's features are cached (Parquet, one folder per settings
hash), so the scorers can be re-run in seconds.

Evaluation, per cohort seed and kind k: the cohort is the normals plus the anomalies of kind k; each
(scorer, feature set) is fitted on that cohort and scores it (within-run, as ``agg2exp`` does). Held-out
selection: for every kind k the setting with the best mean ROC AUC on the *other* kinds is chosen and
measured on k. Reported per kind and overall, for every setting and for the held-out choice: ROC AUC,
average precision, recall at the top 10% (``sklearn.metrics``) and each kind's median rank (1 = most
anomalous) over its patients and seeds, with the cohort size.

    python benchmarks/anomaly_detection.py --seeds 0 1 2 --normals 30 --per-kind 2 --json out.json
    python benchmarks/anomaly_detection.py --quick --json quick.json        # seconds; used by the tests
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine import corruptions, phantoms  # noqa: E402
from engine.jobs import JobSpec, read_job_file  # noqa: E402
from engine.labels import JOINED_ROIS  # noqa: E402

META_COLUMNS = ("patient_id", "cohort_seed", "index", "kind", "family", "is_anomaly", "detail")


# ----------------------------------------------------------------------------- features through the engine


def job_spec(n_samples: int | None = None) -> JobSpec:
    """The demo job's model, preprocessing, attribution and RoI settings (``n_samples`` overridable)."""
    data = read_job_file(ROOT / "jobs" / "demo.toml")
    data.pop("anomaly", None)
    if n_samples is not None:
        data["attribution"]["n_samples"] = int(n_samples)
    data["cohort"] = {"manifest": "unused.csv"}
    return JobSpec.from_dict(data, base_dir=ROOT / "jobs")


def settings_key(spec: JobSpec, shape: Sequence[int], spacing: Sequence[float]) -> tuple[str, dict[str, Any]]:
    """A short hash of everything that changes a patient's features, and the settings it hashes."""
    a = spec.attribution
    settings = {
        "shape": list(shape), "spacing": list(spacing), "method": a.method, "n_samples": a.n_samples,
        "sigma": a.sigma, "target": a.target, "overlap": a.overlap, "blend": a.blend, "seed": a.seed,
        "preprocess": dict(spec.preprocess), "model": dict(spec.model), "rois": dict(spec.rois),
        "features": 1,
    }
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12], settings


def cohort_plan(seed: int, n_normals: int, per_kind: int, kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Patients of one cohort: normals are indices 0..n-1, then ``per_kind`` fresh patients per kind."""
    plan = [{"cohort_seed": seed, "index": i, "kind": "none", "family": "none"} for i in range(n_normals)]
    for j, kind in enumerate(kinds):
        fam = corruptions.KINDS[kind].family
        for r in range(per_kind):
            plan.append({"cohort_seed": seed, "index": n_normals + j * per_kind + r, "kind": kind, "family": fam})
    return plan


def _prediction_features(proc: Any, case: Any) -> dict[str, float]:
    """Per predicted class: mean softmax confidence and mean entropy (nats) over its predicted voxels."""
    import torch
    from monai.inferers import sliding_window_inference

    a = proc.spec.attribution
    with torch.no_grad():
        logits = sliding_window_inference(case.image[None].to(proc.device), proc.loaded.roi_size, 1, proc.model,
                                          overlap=a.overlap, mode=a.blend)
        p = torch.softmax(logits.float(), dim=1)[0]
        pred = p.argmax(0)
        conf = p.max(0).values
        ent = -(p * torch.log(p.clamp_min(1e-12))).sum(0)
    out: dict[str, float] = {}
    for c, name in enumerate(proc.loaded.class_names):
        m = pred == c
        if bool(m.any()):
            out[f"pred_confidence|{name}"] = float(conf[m].mean())
            out[f"pred_entropy|{name}"] = float(ent[m].mean())
    return out


def patient_features(proc: Any, record: dict[str, Any]) -> dict[str, float]:
    """One patient's feature row through the engine: RoI importances, predicted volumes, confidence."""
    from engine.pipeline import Failure

    case = proc.load(record)
    res = proc.compute(case)
    if isinstance(res, Failure):  # pragma: no cover - compute raises rather than returns failures
        raise RuntimeError(res.error)
    joined = set(JOINED_ROIS)
    imp = res.importances.filter(~pl.col("roi").is_in(list(joined)))
    row: dict[str, float] = {}
    for t, roi, stat, sign, v in imp.select("target", "roi", "stat", "sign", "value").iter_rows():
        if v is not None:
            row[f"{stat}_{sign}|{t}|{roi}"] = float(v)
    for cls, vox in res.predictions.select("class", "voxels").iter_rows():
        row[f"pred_voxels|{cls}"] = float(vox)
    row.update(_prediction_features(proc, case))
    return row


def extract(
    *,
    seeds: Sequence[int],
    n_normals: int,
    per_kind: int,
    kinds: Sequence[str],
    cache_dir: Path,
    shape: Sequence[int] = phantoms.DEFAULT_SHAPE,
    spacing: Sequence[float] = phantoms.DEFAULT_SPACING,
    n_samples: int | None = None,
    threads: int = 1,
    log: bool = True,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Feature rows of every planned patient, computed once per settings and cached as Parquet."""
    import torch

    from engine.pipeline import PatientProcessor

    torch.set_num_threads(threads)
    spec = job_spec(n_samples)
    key, settings = settings_key(spec, shape, spacing)
    folder = cache_dir / f"features-{key}"
    (folder / "patients").mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(settings, indent=1, default=str))
    proc = None
    frames, seconds = [], []
    plan = [p for s in seeds for p in cohort_plan(s, n_normals, per_kind, kinds)]
    for n, p in enumerate(plan):
        name = f"s{p['cohort_seed']}-i{p['index']:04d}-{p['kind']}"
        part = folder / "patients" / f"{name}.parquet"
        if not part.is_file():
            proc = proc or PatientProcessor(spec, worker_name="benchmark")
            t0 = time.perf_counter()
            ph = phantoms.make_phantom(p["index"], seed=p["cohort_seed"], shape=shape, spacing=spacing,
                                       corruption=None if p["kind"] == "none" else p["kind"])
            with tempfile.TemporaryDirectory() as tmp:
                ipath, lpath = Path(tmp) / "image.nii.gz", Path(tmp) / "label.nii.gz"
                phantoms._save_nifti(ipath, ph.image.astype(np.int16), ph.affine)
                phantoms._save_nifti(lpath, ph.labels, ph.affine)
                record = {"patient_id": name, "image_path": str(ipath), "label_path": str(lpath)}
                feats = patient_features(proc, record)
            meta = {"patient_id": name, **p, "is_anomaly": p["kind"] != "none",
                    "detail": str(ph.metadata.get("anomaly_detail", ""))}
            pl.DataFrame([{**meta, **feats}]).write_parquet(part)
            seconds.append(time.perf_counter() - t0)
            if log:
                print(f"[features] {n + 1}/{len(plan)} {name} {seconds[-1]:.1f}s", flush=True)
        frames.append(pl.read_parquet(part))
    df = pl.concat(frames, how="diagonal_relaxed")
    df.write_parquet(folder / "features.parquet")
    info = {"settings_key": key, "settings": settings, "cache": str(folder), "patients": len(plan),
            "computed": len(seconds), "median_seconds_per_patient": float(np.median(seconds)) if seconds else None}
    return df, info


# ----------------------------------------------------------------------------- CLI (evaluation added below)


def parse_args(argv: Iterable[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="cohort seeds")
    ap.add_argument("--normals", type=int, default=30, help="normal patients per cohort")
    ap.add_argument("--per-kind", type=int, default=2, help="patients of each anomaly kind per cohort")
    ap.add_argument("--kinds", nargs="+", default=None, help="anomaly kinds (default: all of engine.corruptions)")
    ap.add_argument("--n-samples", type=int, default=None, help="SmoothGrad samples (default: the demo job's)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "agg2exp" / "anomaly_benchmark", help="feature cache folder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--extract-only", action="store_true", help="compute and cache features, no evaluation")
    ap.add_argument("--quick", action="store_true", help="tiny cohort for the tests (seconds)")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    return ap.parse_args(list(argv) if argv is not None else None)


def main(argv: Iterable[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    kinds = list(args.kinds or corruptions.KINDS)
    if args.quick:
        args.seeds, args.normals, args.per_kind, args.n_samples = [0], 4, 1, 1
        kinds = list(args.kinds or ["missing_rescale", "situs_inversus"])
    t0 = time.perf_counter()
    df, info = extract(seeds=args.seeds, n_normals=args.normals, per_kind=args.per_kind, kinds=kinds,
                       cache_dir=args.cache, n_samples=args.n_samples, threads=args.threads, log=not args.quick)
    result: dict[str, Any] = {"features": info, "extract_seconds": time.perf_counter() - t0}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
