"""What a person sees in the terminal while a long command runs: one line naming the full log, gcl's
progress bars, each warning once, and the summary. Everything else printed by the driver, Ray, Ray
Data, DeepSpeed, open_clip and the Ray workers (whose output Ray forwards to the driver) goes to
the log file: file descriptors 1 and 2 point there, so subprocesses and C code follow too.

Code that writes for a person prints to `terminal()`; a plain `print` or a library's own output
lands in the log while a `quiet_console` is active. A command's Ray session ends with the block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from typing import TextIO

_terminal: TextIO | None = None  # the person's terminal while quiet_console redirects 1 and 2
last_log_file: str | None = None  # the log of the latest quiet_console: where a failed command's traceback is
OWN_LOGGERS = ("gcl", "workflows")
RAY_DATA_NO_BARS = "RAY_DATA_DISABLE_PROGRESS_BARS"


def terminal() -> TextIO:
    """Where output meant for a person goes: the terminal, also while the rest goes to the log."""
    return _terminal or sys.stdout


def say(*parts, **kwargs) -> None:
    """print() to the terminal."""
    print(*parts, file=terminal(), flush=True, **kwargs)


class WarningsOnce(logging.Handler):
    """Shows gcl's own warnings, and errors from any library, on the terminal once each: a message
    repeated by every epoch, worker or trial is shown the first time only. The log has them all."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.seen: set[tuple[str, str]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        own = record.name.split(".")[0] in OWN_LOGGERS
        if not own and record.levelno < logging.ERROR:
            return
        # A warning relayed from a worker (gcl.train.progress) carries the message it was formatted from.
        key = (record.name, getattr(record, "once_key", str(record.msg)))
        if key in self.seen:
            return
        self.seen.add(key)
        try:
            say(f"{record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # a broken terminal must not end the run
            self.handleError(record)


@contextlib.contextmanager
def quiet_console(log_file: str, verbose: bool = False) -> Iterator[str | None]:
    """Send everything but gcl's own terminal output to `log_file` (appended) for the block; with
    `verbose`, change nothing. Yields the log file's path (None when verbose)."""
    global _terminal
    if verbose or _terminal is not None or not _writes_to_fds():
        yield None
        return
    os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    # Closed in the finally below: the terminal outlives this function's frame until the block ends.
    _terminal = open(saved[1], "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")  # noqa: SIM115
    say(f"full log: {os.path.abspath(log_file)}")
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    for fd in (1, 2):
        os.dup2(log_fd, fd)
    os.close(log_fd)
    handler = WarningsOnce()
    logging.getLogger().addHandler(handler)
    progress_bars = _ray_data_progress_bars(False)
    global last_log_file
    last_log_file = os.path.abspath(log_file)
    try:
        yield os.path.abspath(log_file)
    except BaseException:
        # Its traceback in the log, while descriptor 2 still goes there: the terminal gets gcl's one
        # line about it (workflows.cli), the log what a developer needs.
        traceback.print_exc(file=sys.stderr)
        raise
    finally:
        end_ray()
        _ray_data_progress_bars(progress_bars)
        logging.getLogger().removeHandler(handler)
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        _terminal.close()
        _terminal = None


def end_ray() -> None:
    """Disconnect from Ray (stopping a local cluster the command started) while the log is still
    where output goes: Ray forwards the workers' last lines until then."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


def _writes_to_fds() -> bool:
    """Whether sys.stdout and sys.stderr write to file descriptors 1 and 2: where they were replaced
    (a notebook, pytest's capsys), redirecting the descriptors would pass them by."""
    try:
        return sys.stdout.fileno() == 1 and sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        return False


def _ray_data_progress_bars(enabled: bool) -> bool:
    """Turn Ray Data's per-operator progress bars (thousands of lines in a log) on or off for the
    datasets made from now on; returns the previous setting. Ray Data reads the variable when it is
    first imported (not here: `gcl evaluate` needs no Ray), its context after that."""
    previous = os.environ.get(RAY_DATA_NO_BARS) != "1"
    os.environ[RAY_DATA_NO_BARS] = "0" if enabled else "1"
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        context = DataContext.get_current()
        previous = context.enable_progress_bars
        context.enable_progress_bars = enabled
    return previous
