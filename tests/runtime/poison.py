"""A volume that kills its worker: installed in Ray worker processes with ``worker_process_setup_hook``.

Any patient whose id starts with ``poison`` makes the process that loads it exit at once, as a
decoder crash or the kernel's OOM killer would; every other patient is untouched.
"""

from __future__ import annotations

import os


def install() -> None:
    from engine.pipeline import PatientProcessor

    original = PatientProcessor.load

    def load(self, record):  # type: ignore[no-untyped-def]
        if str(record.get("patient_id", "")).startswith("poison"):
            os._exit(1)
        return original(self, record)

    PatientProcessor.load = load  # type: ignore[method-assign]
