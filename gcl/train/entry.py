"""The function Ray Train runs on each worker, under a name whose module imports nothing heavy.

Ray Train's controller (an actor of its own, a new process every run) unpickles the trainer's
arguments but never runs the loop. Handed gcl.train.worker's function, every run's controller
imported torch, DeepSpeed and open_clip first: 2 to 4 seconds of a 2-core machine per run."""

from __future__ import annotations

from typing import Any


def train_worker(config: dict[str, Any]) -> None:
    """gcl.train.worker.train_worker, imported where it runs."""
    from gcl.train.worker import train_worker as run

    run(config)
