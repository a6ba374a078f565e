"""A progress bar for runs: patients done, failed, in flight, and the rate."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Progress:
    """tqdm on stderr; failures are printed above the bar as they happen."""

    def __init__(self, *, total: int, enabled: bool = True) -> None:
        self.done = 0
        self.failed = 0
        self.in_flight = 0
        self._t0 = time.perf_counter()
        self._bar = tqdm(total=total, unit="patient", desc="patients", disable=not enabled, file=sys.stderr,
                         mininterval=0.5, dynamic_ncols=True)

    def set_in_flight(self, n: int) -> None:
        if n != self.in_flight:
            self.in_flight = n
            self._refresh()

    def update(self, status: str, *, pid: str, error: str | None = None) -> None:
        if status == "done":
            self.done += 1
        else:
            self.failed += 1
            self._bar.write(f"failed: {pid}: {error}", file=sys.stderr)
        self._bar.update(1)
        self._refresh()

    def _refresh(self) -> None:
        self._bar.set_postfix(done=self.done, failed=self.failed, in_flight=self.in_flight, refresh=False)

    def close(self) -> None:
        self._bar.close()
