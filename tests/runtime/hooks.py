"""Faults installed in Ray worker processes with ``worker_process_setup_hook`` (conftest.local_ray).

``poison``: any patient whose id starts with ``poison`` makes the process that loads it exit at
once, as a decoder crash or the kernel's OOM killer would. ``hang``: any patient whose id starts with ``hang`` never finishes loading (a decoder stuck on a
network file system, a deadlocked reader); every other patient is untouched. ``broken_model``:
loading the model raises in every worker (weights that load on the driver's machine but not on
the workers').
"""

from __future__ import annotations

import os
import time


def poison() -> None:
    from engine.pipeline import PatientProcessor

    original = PatientProcessor.load

    def load(self, record):  # type: ignore[no-untyped-def]
        if str(record.get("patient_id", "")).startswith("poison"):
            os._exit(1)
        return original(self, record)

    PatientProcessor.load = load  # type: ignore[method-assign]


def hang() -> None:
    from engine.pipeline import PatientProcessor

    original = PatientProcessor.load

    def load(self, record):  # type: ignore[no-untyped-def]
        if str(record.get("patient_id", "")).startswith("hang"):
            while True:
                time.sleep(1.0)
        return original(self, record)

    PatientProcessor.load = load  # type: ignore[method-assign]


def broken_model() -> None:
    from engine.pipeline import PatientProcessor

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("cannot read the model weights on this worker (test fault)")

    PatientProcessor.__init__ = init  # type: ignore[method-assign]
