"""A test-only seam: fault tests hold a training at a step they choose, so that the fault they
inject lands while the run is still training, whatever the relative speed of the test and the
training. Inert unless the environment variable GCL_TEST_STEP_GATE names a directory.

In that directory a file `<prefix>.gate` holding a step number N lets every training whose name
starts with `<prefix>` (the longest such prefix wins) run through step N and then wait before the
next one; `fail N` lets it run through step N and then raises InjectedFault (a worker that
fails, as a crash would, with no process to kill); `none` (or no matching file) lets it run.
While it waits, rank 0 writes the step it has
reached to `<name>.waiting` and keeps flushing its metrics (so an outage of the tracking store is
retried and replayed while the run is held). Other ranks wait in the next step's collectives.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

ENV = "GCL_TEST_STEP_GATE"


class InjectedFault(RuntimeError):
    """The failure a `fail N` gate injects into a training."""


def _gate(directory: Path, name: str) -> tuple[int | None, bool]:
    """(the step the longest matching gate lets `name` run through (None: no limit), whether the
    run fails there rather than waits)."""
    gates = [(len(p.stem), p) for p in directory.glob("*.gate") if name.startswith(p.stem)]
    if not gates:
        return None, False
    text = max(gates)[1].read_text().strip()
    fails = text.startswith("fail ")
    text = text.removeprefix("fail ")
    return (None if text in ("", "none") else int(text)), fails


class StepGate:
    """Rank 0's gate for the training `name`; every call is a no-op without GCL_TEST_STEP_GATE."""

    def __init__(self, name: str, enabled: bool):
        directory = os.environ.get(ENV)
        self.directory = Path(directory) if directory and enabled else None
        self.name = name

    def before_step(self, step: int, while_waiting: Callable[[], None]) -> None:
        """Wait here while the gate holds `step` back (it lets the run through step - 1)."""
        if self.directory is None:
            return
        waiting = self.directory / f"{self.name}.waiting"
        last_call = None
        while (gate := _gate(self.directory, self.name))[0] is not None and step > gate[0]:
            if gate[1]:
                raise InjectedFault(f"{ENV}: {self.name} fails before step {step}, as its gate says")
            if last_call is None or time.monotonic() - last_call > 0.5:
                while_waiting()  # first, so that what the run logged is written when it says it waits
                last_call = time.monotonic()
                if not waiting.exists():  # written whole, then named: a reader never sees half of it
                    partial = waiting.with_suffix(".partial")
                    partial.write_text(str(step - 1))
                    partial.replace(waiting)
            time.sleep(0.1)
        waiting.unlink(missing_ok=True)
