"""A training's progress bar, fed by the workers: rank 0 posts its step, loss and pairs/s to a small
Ray actor (a board), and the driver, which waits in `TorchTrainer.fit()`, reads the board from a
thread and draws the bar on the terminal (gcl.console). Nothing is guessed from the clock: the bar
moves when a step has been trained, and says when the workers evaluate. gcl's warnings in any
worker (a tracking store out, then back) reach the board too, and the driver logs them, so the
terminal shows them once each as it does the driver's own."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

BOARD_PREFIX = "gcl-progress-"


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """The latest progress a training's rank 0 posted."""

        def __init__(self) -> None:
            self.state: dict[str, Any] = {}
            self.warnings: list[dict[str, str]] = []

        def post(self, state: dict[str, Any]) -> None:
            self.state.update(state)

        def warn(self, warning: dict[str, str]) -> None:
            self.warnings.append(warning)

        def read(self, seen_warnings: int = 0) -> tuple[dict[str, Any], list[dict[str, str]]]:
            """The latest state, and the warnings after the first `seen_warnings`."""
            return self.state, self.warnings[seen_warnings:]

    return ProgressBoard


class _WarningsToBoard(logging.Handler):
    """A worker's gcl warnings (and errors), posted to the board without waiting for it."""

    def __init__(self, board) -> None:
        super().__init__(level=logging.WARNING)
        self.board = board

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.board.warn.remote(
                {
                    "logger": record.name,
                    "level": record.levelname,
                    "template": str(record.msg),
                    "text": record.getMessage(),
                }
            )
        except Exception:  # the board gone (the driver ended): the worker's own log keeps the line
            self.handleError(record)


class ProgressPoster:
    """A worker's side: rank 0 posts at most every `every` seconds (and always when the phase
    changes), without waiting for the board; every rank's gcl warnings go to the board too. Off
    (every call a no-op) without a board name; posting is off on ranks other than 0."""

    def __init__(self, board_name: str | None, enabled: bool, every: float = 0.25):
        self.board = None
        if board_name:
            import ray

            try:
                board = ray.get_actor(board_name)
            except ValueError:  # the driver did not start one (a sweep's trial, a test)
                board = None
            if board is not None:
                logging.getLogger("gcl").addHandler(_WarningsToBoard(board))
                self.board = board if enabled else None
        self.every = every
        self._last = 0.0
        self._phase = None

    def post(self, **state: Any) -> None:
        if self.board is None:
            return
        now = time.monotonic()
        if now - self._last < self.every and state.get("phase") == self._phase:
            return
        self._last, self._phase = now, state.get("phase")
        self.board.post.remote(state)


class TrainingBar:
    """The driver's side: a board for the training named `name` and a thread that draws its state as a
    tqdm bar (epoch, step of steps, loss, pairs/s, ETA) until closed. Use as a context manager."""

    def __init__(self, name: str, total_steps: int, epochs: int, start_step: int = 0, poll: float = 0.5):
        self.board_name = f"{BOARD_PREFIX}{name}"
        self.total_steps = total_steps
        self.epochs = epochs
        self.start_step = start_step
        self.poll = poll
        self._stop = threading.Event()
        self._training = False
        self._warnings_seen = 0
        self._board = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TrainingBar:
        from tqdm import tqdm

        from gcl.console import terminal

        self._board = _board_class().options(name=self.board_name, get_if_exists=True).remote()
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.start_step,
            desc="training",
            unit="step",
            file=terminal(),
            dynamic_ncols=True,
            mininterval=0.5,
        )
        self._thread = threading.Thread(target=self._draw, name="gcl-progress", daemon=True)
        self._thread.start()
        return self

    def _draw(self) -> None:
        while not self._stop.wait(self.poll):
            self._refresh()

    def _refresh(self, final: bool = False) -> None:
        import ray

        try:
            state, warnings = ray.get(self._board.read.remote(self._warnings_seen), timeout=10)
        except Exception:  # a slow or restarting cluster: try again at the next poll
            return
        self._show(warnings)
        if not state:
            return
        # The driver's estimate of an epoch's steps is replaced by the count rank 0 reports after an
        # epoch; the bar never runs past 100% while training goes on.
        if state.get("steps_per_epoch"):
            self.bar.total = max(self.epochs * int(state["steps_per_epoch"]), self.start_step)
        step = int(state.get("step", 0))
        if not self._training and state.get("phase") == "training":
            # The clock starts with the first step: start-up and the starting model's evaluation
            # would otherwise weigh on the rate and the ETA.
            self._training = True
            self.bar.start_t = self.bar.last_print_t = self.bar._time()
            self.bar.last_print_n = self.bar.n
        if step > self.bar.total:
            self.bar.total = step
        if step > self.bar.n:
            self.bar.update(step - self.bar.n)
        phase = "evaluating" if state.get("phase") == "evaluating" and not final else "training"
        self.bar.set_description(f"{phase} epoch {state.get('epoch', 1)}/{self.epochs}", refresh=False)
        postfix = {"loss": f"{state['loss']:.4f}"} if "loss" in state else {}
        if "pairs_per_s" in state:
            postfix["pairs/s"] = f"{state['pairs_per_s']:.0f}"
        self.bar.set_postfix(postfix, refresh=True)

    def _show(self, warnings: list[dict[str, str]]) -> None:
        """Log the workers' warnings here, where gcl.console shows each once (keyed by its message
        before formatting) and the log file keeps them all; the bar is cleared while they print."""
        from gcl.console import terminal

        if not warnings:
            return
        self._warnings_seen += len(warnings)
        with self.bar.external_write_mode(file=terminal()):
            for warning in warnings:
                logging.getLogger(warning["logger"]).log(
                    logging.getLevelName(warning["level"]), warning["text"], extra={"once_key": warning["template"]}
                )

    def __exit__(self, *exc) -> None:
        import ray

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._refresh(final=True)
        self.bar.close()
        if self._board is not None:
            ray.kill(self._board)
