"""Scaling of cohort runs and the writer's ingest rate (issue: cohort runs on Ray).

1. Throughput: the same phantom cohort with 1 and then 2 CPU workers (one torch thread each),
   patients per second from the first dispatch to the last commit (Ray start-up and model
   loading excluded, reported separately); prints the ratio (goal on 2 cores: >= 1.7).
2. Writer: the single writer's sustained ingest rate (rows/s) for realistic per-patient results
   (17 targets x 19 RoIs x 2 stats x 3 signs), one transaction per patient, against what N GPUs would produce at a given seconds-per-patient.

    python benchmarks/scaling.py --patients 16 --method smoothgrad --samples 2 --json scaling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import polars as pl


def run_cohort(manifest: Path, workers: int, *, method: str, samples: int, db: Path) -> dict[str, float]:
    from engine.jobs import JobSpec
    from engine.runtime import run_job

    attribution = {"method": method, **({"n_samples": samples} if method == "smoothgrad" else {})}
    spec = JobSpec.from_dict({
        "job": {"name": f"scale-{workers}"},
        "cohort": {"manifest": str(manifest)},
        "model": {"kind": "demo"},
        "attribution": attribution,
        "runtime": {"workers": workers, "threads_per_worker": 1, "in_flight": 2},
        "anomaly": {"enabled": False},
    })
    summary = run_job(spec, db=db, run_id=f"w{workers}", progress=False, workers=workers)
    n = summary.counts["done"]
    dispatch = float(summary.report["dispatch_seconds"])
    return {"workers": workers, "patients": n, "dispatch_seconds": dispatch,
            "total_seconds": summary.seconds, "patients_per_second": n / dispatch}


def ingest_rate(n_patients: int, db: Path) -> dict[str, float]:
    """Rows per second through Store.write_patient, realistic row counts."""
    from engine import store
    from engine.labels import THORAX_CLASSES

    rois = [*THORAX_CLASSES, "lung", "lung_left"]
    rows = [(t, r, st, sg) for t in THORAX_CLASSES for r in rois for st in ("mass", "mean") for sg in ("abs", "pos", "neg")]
    base = pl.DataFrame(rows, schema=["target", "roi", "stat", "sign"], orient="row")
    preds = pl.DataFrame({"class": list(THORAX_CLASSES), "voxels": [1000] * 17})
    times = []
    with store.open_writer(db) as w:
        w.create_run("ingest", config={})
        w.register_patients("ingest", pl.DataFrame({"patient_id": [f"p{i:06d}" for i in range(n_patients)],
                                                    "image_path": ["x"] * n_patients}))
        for i in range(n_patients):
            imp = base.with_columns(pl.lit("smoothgrad").alias("method"), pl.lit(float(i)).alias("value"))
            t0 = time.perf_counter()
            w.write_patient("ingest", store.PatientResult(f"p{i:06d}", imp, preds))
            times.append(time.perf_counter() - t0)
    sustained = sum(times) / len(times)
    return {"rows_per_patient": base.height, "median_seconds_per_patient": statistics.median(times),
            "mean_seconds_per_patient": sustained, "rows_per_second": base.height / sustained,
            "patients_per_second": 1 / sustained}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=16)
    p.add_argument("--method", default="smoothgrad")
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--ingest-patients", type=int, default=300)
    p.add_argument("--gpu-seconds-per-patient", type=float, default=5.0,
                   help="seconds one GPU needs per patient; 5 s is deliberately fast for the paper's setting "
                        "(Swin UNETR, SmoothGrad 20, 17 classes, a whole chest CT), so the GPU count is conservative")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()

    from engine import phantoms

    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if not args.skip_scaling:
            phantoms.generate_cohort(tmp_path / "cohort", n_patients=args.patients, seed=0)
            manifest_path = tmp_path / "cohort" / "manifest.csv"
            one = run_cohort(manifest_path, 1, method=args.method, samples=args.samples, db=tmp_path / "w1.duckdb")
            two = run_cohort(manifest_path, 2, method=args.method, samples=args.samples, db=tmp_path / "w2.duckdb")
            ratio = two["patients_per_second"] / one["patients_per_second"]
            out["scaling"] = {"one_worker": one, "two_workers": two, "throughput_ratio": ratio}
            print(f"1 worker : {one['patients_per_second']:.3f} patients/s ({one['dispatch_seconds']:.1f} s dispatch, "
                  f"{one['total_seconds']:.1f} s total)")
            print(f"2 workers: {two['patients_per_second']:.3f} patients/s ({two['dispatch_seconds']:.1f} s dispatch, "
                  f"{two['total_seconds']:.1f} s total)")
            print(f"throughput ratio 2/1 workers: {ratio:.2f}x (goal >= 1.7x on 2 cores)")
        ingest = ingest_rate(args.ingest_patients, tmp_path / "ingest.duckdb")
        per_gpu_rows = ingest["rows_per_patient"] / args.gpu_seconds_per_patient
        gpus = ingest["rows_per_second"] / per_gpu_rows
        ingest["gpus_saturating_writer"] = gpus
        out["ingest"] = ingest
        print(f"writer: {ingest['rows_per_second']:.0f} rows/s sustained ({ingest['patients_per_second']:.1f} patients/s; "
              f"mean {1000 * ingest['mean_seconds_per_patient']:.1f} ms, median "
              f"{1000 * ingest['median_seconds_per_patient']:.1f} ms per patient)")
        print(f"one GPU at {args.gpu_seconds_per_patient:.0f} s/patient produces {per_gpu_rows:.0f} rows/s; "
              f"the writer keeps up with {gpus:.0f} GPUs (goal: >= 64)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
