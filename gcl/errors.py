"""The errors gcl raises for things a user can fix: each message says what was wrong, where (file,
row, column, config key, URI) and what would be accepted.

The CLI prints them as one `error: ...` message and exits with code 2, without a traceback.
No restart can fix them either: training fails at once on one (see gcl.train.job.fit), instead of
restarting its workers `train.max_failures` times.
"""

from __future__ import annotations


class GclError(Exception):
    """An error with a message a user can act on."""


class ConfigError(GclError, ValueError):
    """A config file, key or override that cannot be used."""


class DataError(GclError, ValueError):
    """Data that cannot be used; the message names the file, row and column."""


class TrackingError(GclError):
    """An MLflow tracking store that cannot be reached, or that lacks a run gcl needs."""


class ModelError(GclError):
    """A model reference (a directory, checkpoint, run or registered model) that holds no usable
    model, or a run that cannot be registered."""


class TrainingError(GclError):
    """Training that produced nothing usable (e.g. a sweep none of whose trials finished an epoch)."""


class SearchIndexError(GclError):
    """Embeddings that cannot be indexed, or an index directory that cannot be read."""


class ClusterError(GclError):
    """A Ray cluster or job server that cannot be reached or used."""


def explained_cause(error: BaseException) -> GclError | None:
    """The innermost GclError that `error` is or comes from (through `raise ... from`, an exception
    raised while handling another, or the `cause` a Ray task error carries: Ray's RayTaskError(X)
    is an X too, and the plain X is its cause), None if there is none."""
    found, seen = None, set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, GclError):
            found = current
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__ or current.__context__
    return found
