"""The Ray runtime around the maths: actors, the bounded queue, the single writer, resume."""

from engine.runtime.runner import RunSummary, run_job

__all__ = ["RunSummary", "run_job"]
