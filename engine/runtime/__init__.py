"""The Ray runtime around the maths: actors, the bounded queue, the single writer, resume.

Imported lazily: a Ray worker process that unpickles the actor class imports
``engine.runtime.worker`` only, so it is placed and answering before the model stack is loaded.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunSummary", "run_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from engine.runtime import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'engine.runtime' has no attribute {name!r}")
