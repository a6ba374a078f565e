"""What the driver reads from a cluster, without starting one: actor slots per node, joining an
address that does not answer, and the run's time limit in the job spec."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.errors import JobSpecError
from engine.jobs import RuntimeSpec
from engine.runtime.cluster import actor_slots


@pytest.mark.parametrize(
    ("resources", "reserve", "slots"),
    [
        ({"CPU": 4.0, "GPU": 2.0}, {"num_cpus": 2, "num_gpus": 1}, 2),  # one per GPU
        ({"CPU": 4.0, "GPU": 2.0}, {"num_cpus": 1, "num_gpus": 0.5}, 4),  # GPU shares
        ({"CPU": 8.0, "GPU": 2.0}, {"num_cpus": 4, "num_gpus": 0.5}, 2),  # CPUs are the limit
        ({"CPU": 3.0}, {"num_cpus": 2}, 1),  # CPU slots round down
        ({"CPU": 16.0}, {"num_cpus": 1, "num_gpus": 1}, 0),  # a CPU node hosts no GPU actor
        ({}, {"num_cpus": 1}, 0),  # a head started with 0 CPUs
    ],
)
def test_a_node_hosts_as_many_actors_as_its_resources_fit(resources, reserve, slots):
    assert actor_slots(resources, reserve) == slots


def test_a_time_limit_that_is_not_positive_is_refused():
    with pytest.raises(JobSpecError, match="worker_timeout_s"):
        RuntimeSpec(worker_timeout_s=0)
    with pytest.raises(JobSpecError, match="patient_timeout_s must be positive"):
        RuntimeSpec(patient_timeout_s=-1)


def test_joining_an_address_that_does_not_answer_gives_up_with_one_line_in_time():
    code = (
        "from engine.runtime.cluster import connect\n"
        "from engine.errors import UserError\n"
        "try:\n    connect('127.0.0.1:1', timeout_s=5)\n"
        "except UserError as e:\n    print('USERERROR', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=90)
    assert "USERERROR could not reach the Ray cluster at 127.0.0.1:1 within 5 s" in res.stdout, res.stderr[-2000:]
