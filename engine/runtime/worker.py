"""The Ray actor: one per GPU (or per CPU slot), holding the model for the whole run.

The actor is threaded (``max_concurrency=2``): while one call computes on the device under a
lock, the next call reads and preprocesses its volume, so I/O overlaps compute. Only small
records (``PatientResult`` rows or a ``Failure``) travel back to the driver.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any

from engine.jobs import JobSpec
from engine.pipeline import Outcome, PatientProcessor, failure_of


class PatientWorker:
    """Plain class; :func:`remote_worker_class` turns it into a Ray actor class."""

    def __init__(self, spec: dict[str, Any], base_dir: str, threads: int, index: int) -> None:
        import torch

        torch.set_num_threads(max(1, threads))
        self.name = f"worker-{index}@{socket.gethostname()}:{os.getpid()}"
        self.processor = PatientProcessor(JobSpec.from_dict(spec, base_dir=base_dir), worker_name=self.name)
        self._device_lock = threading.Lock()

    def pid(self) -> int:
        return os.getpid()

    def info(self) -> dict[str, Any]:
        dev = self.processor.device
        out: dict[str, Any] = {"worker": self.name, "pid": os.getpid(), "device": str(dev)}
        if dev.type == "cuda":
            import torch

            out["device_name"] = torch.cuda.get_device_name(dev)
        return out

    def process(self, record: dict[str, Any]) -> Outcome:
        pid = str(record.get("patient_id"))
        try:
            t0 = time.perf_counter()
            case = self.processor.load(record)
            loaded = time.perf_counter()
            with self._device_lock:
                waited = time.perf_counter() - loaded
                return self.processor.compute(
                    case, timings={"load": round(loaded - t0, 4), "queue_wait": round(waited, 4)}
                )
        except Exception as exc:  # noqa: BLE001 - recorded against the patient, the run goes on
            return failure_of(pid, exc, self.name)


def remote_worker_class(*, max_restarts: int) -> Any:
    """The Ray actor class (threaded, restartable; task retries are handled by the driver)."""
    import ray

    return ray.remote(max_restarts=max_restarts, max_task_retries=0, max_concurrency=2)(PatientWorker)
