"""A worker node lost mid-run on a multi-node Ray cluster on this machine: how long until its
patients run elsewhere, and how long the dispatch loop is ever busy between two waits.

Builds a ``ray.cluster_utils.Cluster`` (head with no CPUs, two worker nodes of one CPU each, all on
127.0.0.1), runs ``--patients`` phantoms (saliency, one torch thread per actor) and SIGKILLs one
worker node's processes right after the first patient is committed. Reported:

- ``loss_to_restart_s``: from the kill to the moment each of the lost node's patients started
  loading on the surviving node (the worker's own ``loading`` marker), one value per patient;
- ``loss_to_detect_s``: from the kill to the driver re-queueing them;
- ``dispatch_max_gap_ms``: the longest the driver's loop was busy between two ``ray.wait``
  calls after the first dispatch (writes run on the writer thread), and the writer's mean
  per-patient commit time it no longer waits for.

    python benchmarks/node_loss.py --patients 8 --json node_loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--patients", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from engine import phantoms
    from engine.jobs import JobSpec
    from engine.runtime import run_job

    ray_constants.ENABLE_RAY_CLUSTER = False
    node_args = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = phantoms.generate_cohort(Path(tmp) / "cohort", n_patients=args.patients, seed=1)
        manifest.write_csv(Path(tmp) / "m.csv")
        spec = JobSpec.from_dict({
            "job": {"name": "node-loss"}, "cohort": {"manifest": str(Path(tmp) / "m.csv")},
            "model": {"kind": "demo"}, "attribution": {"method": "saliency"},
            "runtime": {"threads_per_worker": 1, "in_flight": 2, "worker_timeout_s": 60},
            "anomaly": {"enabled": False},
        })
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **node_args})
        try:
            victim = cluster.add_node(num_cpus=1, **node_args)
            cluster.add_node(num_cpus=1, **node_args)
            killed: list[float] = []

            def kill(pid: str, status: str) -> None:
                if not killed:
                    killed.append(time.time())
                    cluster.remove_node(victim, allow_graceful=False)

            summary = run_job(spec, db=Path(tmp) / "r.duckdb", run_id="r", address=cluster.address,
                              progress=False, on_result=kill)
        finally:
            if ray.is_initialized():
                ray.shutdown()
            cluster.shutdown()
    rep = summary.report
    requeues = rep["requeues"]
    out = {
        "patients": args.patients, "done": summary.counts["done"], "failed": summary.counts["failed"],
        "exit_code": summary.exit_code, "attempts_charged": summary.report["attempts_charged"],
        "loss_to_detect_s": [round(r["lost_at"] - killed[0], 3) for r in requeues],
        "loss_to_restart_s": [round(r["restarted_at"] - killed[0], 3) for r in requeues],
        "dispatch_max_gap_ms": rep["dispatch_max_gap_ms"],
        "writer_mean_ms_per_patient": round(1000 * rep["writer_seconds"] / max(1, summary.counts["done"]), 2),
        "writer_backlog_max": rep["writer_backlog_max"],
        "actors": [{k: a[k] for k in ("index", "node_id", "stop_reason", "patients_done")} for a in rep["actors"]],
    }
    if out["loss_to_restart_s"]:
        out["loss_to_restart_median_s"] = statistics.median(out["loss_to_restart_s"])
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
