"""Sweep configuration: what `gcl tune` searches over, how, and for how long.

A sweep is a base job config plus a search space of dotted config keys, e.g.

    space:
      loss.left_to_right: {uniform: [0.0, 1.0]}
      loss.weight_fn: {choice: [linear, reciprocal, power]}
      fields.right.image.weight: {uniform: [0.5, 1.0]}
      train.lr: {loguniform: [1.0e-4, 3.0e-3]}

Every trial is the base job with the sampled values applied as `--set key=value` overrides,
so a trial's config is validated exactly like `gcl train`'s.
"""

from __future__ import annotations

import difflib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from gcl.config import ConfigError, Section, parse_config
from gcl.job_config import JobConfig
from gcl.train.job import job_resources

JOB_PREFIX = "job."  # `gcl tune --set job.train.epochs=1`: an override of the sweep's base job


class Domain(Section):
    """One searched key: exactly one of the distributions below."""

    uniform: tuple[float, float] | None = None
    """[low, high] sampled uniformly."""
    loguniform: tuple[float, float] | None = None
    """[low, high] (both > 0) sampled uniformly in log space (learning rates, temperatures)."""
    randint: tuple[int, int] | None = None
    """[low, high] integers, high included."""
    choice: list[Any] | None = None
    """One of these values."""
    grid: list[Any] | None = None
    """Every one of these values (`search: random` only: each sample repeats the whole grid)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(type(self).model_fields)}, got {given or 'none'}")
        for name in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: low must be below high, got {list(bounds)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0, got {self.loguniform[0]}")
        for name in ("choice", "grid"):
            if getattr(self, name) == []:
                raise ValueError(f"{name}: give at least one value")
        return self

    def to_tune(self):
        """The Ray Tune search domain."""
        from ray import tune

        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        if self.randint is not None:
            return tune.randint(self.randint[0], self.randint[1] + 1)
        if self.choice is not None:
            return tune.choice(self.choice)
        return tune.grid_search(self.grid)


class AshaConfig(Section):
    """ASHA early stopping: trials report the objective every epoch; the worse ones stop early."""

    enabled: bool = True
    """Stop unpromising trials early (false: every trial runs all epochs)."""
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """Keep the best 1/reduction_factor of trials at each rung."""


class SweepConfig(Section):
    """A `gcl tune` sweep."""

    name: str = "gcl-sweep"
    """Sweep name: the MLflow parent run, the Tune experiment folder under the job's storage (same
    name = resume) and the prefix of every trial's run name."""
    base: str = "tiny-cpu.yaml"
    """The job config every trial starts from (relative to the sweep file)."""
    set: list[str] = Field(default_factory=list)
    """Overrides applied to the base job (`section.key=value`), before the sampled values."""
    space: dict[str, Domain] = Field(default_factory=dict)
    """Dotted job-config key -> distribution."""
    num_samples: int = Field(8, ge=1)
    """Trials to run (with grid keys: samples of the whole grid)."""
    search: Literal["optuna", "random"] = "optuna"
    """`optuna`: Optuna's TPE sampler; `random`: random and grid search."""
    seed: int = 0
    """Seed of the search algorithm."""
    asha: AshaConfig = Field(default_factory=AshaConfig)
    max_concurrent_trials: int | None = Field(None, ge=1)
    """Trials at once; null: as many as the cluster's CPUs/GPUs fit with the job's scaling."""
    trial_cpus: float = Field(0.0, ge=0)
    """CPUs reserved for each trial's driver. It only waits on its TorchTrainer, and on a small
    cluster every fraction it holds is missing for Ray Data's read tasks (1 CPU each)."""
    registered_model: str | None = None
    """Register the best trial's model under this name (null: the job's mlflow.registered_model)."""

    @model_validator(mode="after")
    def _grid_needs_random(self) -> SweepConfig:
        grid = [k for k, d in self.space.items() if d.grid is not None]
        if grid and self.search != "random":
            raise ValueError(f"space: grid keys {grid} need search: random (Optuna samples, it does not grid)")
        return self


def load_sweep(path: str | Path, overrides: list[str] | None = None):
    """(SweepConfig, base JobConfig) from a sweep YAML; checks every searched key exists in the base
    job config before any trial starts. overrides: `key=value` for the sweep, `job.key=value` for
    its base job (applied after the sweep's own `set`, e.g. job.train.epochs=1)."""

    overrides = list(overrides or [])
    job_overrides = [o.removeprefix(JOB_PREFIX) for o in overrides if o.startswith(JOB_PREFIX)]
    sweep = parse_config(SweepConfig, path, [o for o in overrides if not o.startswith(JOB_PREFIX)])
    base_path = Path(path).parent / sweep.base
    if not Path(sweep.base).is_absolute() and not base_path.exists() and Path(sweep.base).exists():
        base_path = Path(sweep.base)
    job = parse_config(JobConfig, base_path, [*sweep.set, *job_overrides, f"name={sweep.name}"])
    if not sweep.space:
        raise ConfigError(f"{path}: space is empty; give at least one key to search")
    known = flat_keys(job.model_dump(mode="json"))
    for key in sweep.space:
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            raise ConfigError(
                f"{path}: space.{key}: not a key of the job config {base_path}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
            )
    if not job.data.eval:
        raise ConfigError(f"{base_path}: data.eval is empty; a sweep ranks trials by evaluation metrics")
    return sweep, job


def flat_keys(data: dict, prefix: str = "") -> list[str]:
    """Every dotted key of a nested config dict (sections and values)."""
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys.extend(flat_keys(value, dotted + "."))
    return keys


def trial_overrides(params: dict[str, Any]) -> list[str]:
    """Sampled values -> `key=value` overrides (values as JSON, which YAML reads back)."""
    return [f"{key}={json.dumps(value)}" for key, value in params.items()]


def trial_concurrency(cluster: dict[str, float], job, requested: int | None) -> int:
    """Trials that fit the cluster at once (at least 1), or `requested` when given."""
    if requested:
        return requested

    need = job_resources(job)
    fits = [math.floor(cluster.get(name, 0.0) / amount) for name, amount in need.items() if amount > 0]
    return max(1, min(fits))
