"""Runs on a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, every node
on 127.0.0.1): nodes lost and joining mid-run, the only node lost, GPUs declared as resources,
the driver killed, and a volume that kills its worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from engine import store
from engine.cli import main as cli_main
from engine.commands.run import print_summary
from engine.jobs import JobSpec
from engine.runtime import run_job
from tests.runtime.conftest import assert_same_importances, job_dict, write_job

pytestmark = pytest.mark.slow

NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 * 1024 * 1024}


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """A head node that hosts no actor (0 CPUs); tests add worker nodes. Shut down after the test."""
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **NODE})
    try:
        yield c
    finally:
        if ray.is_initialized():
            ray.shutdown()
        c.shutdown()


def _stored(db: Path, run_id: str) -> pl.DataFrame:
    with store.open(db) as s:
        return s.importances(run_id).drop("run_id")  # type: ignore[union-attr]


def _spec(manifest: Path, **runtime: object) -> JobSpec:
    return JobSpec.from_dict(job_dict(manifest, runtime={"workers": None, **runtime}, anomaly={"enabled": False}))


def test_losing_the_only_worker_node_stops_the_run_in_time_and_a_rerun_resumes(
    tmp_path, cluster, cohort, cohort_manifest, reference_rows, capsys
):
    node = cluster.add_node(num_cpus=1, **NODE)
    db = tmp_path / "lost.duckdb"
    killed_at: list[float] = []

    def kill_the_node(pid: str, status: str) -> None:
        if not killed_at:
            cluster.remove_node(node, allow_graceful=False)  # SIGKILL: raylet and agents, as a lost spot node
            killed_at.append(time.monotonic())

    spec = _spec(cohort_manifest, worker_timeout_s=15)
    summary = run_job(spec, db=db, run_id="lost", address=cluster.address, progress=False, on_result=kill_the_node)
    stopped_after = time.monotonic() - killed_at[0]
    assert summary.exit_code == 3 and summary.stopped and "no worker" in summary.stopped
    assert stopped_after < 15 + 30, stopped_after  # the time limit plus Ray noticing the loss
    done = summary.counts["done"]
    assert 1 <= done < cohort.height and summary.counts["pending"] == cohort.height - done
    assert summary.counts["failed"] == 0
    print_summary(summary)
    err = capsys.readouterr().err
    assert "stopped before finishing" in err and "rerun the same command to resume" in err
    assert any((a["stop_reason"] or "").startswith("lost") for a in summary.report["actors"])

    cluster.add_node(num_cpus=1, **NODE)
    again = run_job(spec, db=db, run_id="lost", address=cluster.address, progress=False)
    assert again.exit_code == 0 and again.skipped_done == done and again.counts["done"] == cohort.height
    assert_same_importances(_stored(db, "lost"), reference_rows)
