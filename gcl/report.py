"""Result tables and plots: per-split metrics, and a method's relative change against a baseline."""

from __future__ import annotations

from collections.abc import Mapping

Results = Mapping[str, Mapping[str, float]]  # split -> measure -> value


def split_metrics(metrics: Mapping[str, float], prefix: str = "") -> dict[str, dict[str, float]]:
    """{split: {measure: value}} from a run's flat '<prefix><split>/<measure>' metrics: the test
    splits' by default, the validation splits' with prefix 'validation/'."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and key.count("/") == prefix.count("/") + 1:
            split, measure = key[len(prefix) :].split("/")
            out.setdefault(split, {})[measure] = value
    return out


def metrics_table(results: Results, measures: list[str] | None = None) -> str:
    """A plain-text table: one row per split, one column per measure."""
    measures = measures or list(next(iter(results.values())))
    head = f"{'split':15s}" + "".join(f"{m:>11s}" for m in measures)
    rows = [f"{split:15s}" + "".join(f"{values[m]:11.4f}" for m in measures) for split, values in results.items()]
    return "\n".join([head, "-" * len(head), *rows])


def relative_change(new: float, base: float) -> float | None:
    """(new - base) / base in percent; None when the baseline is 0."""
    return None if base == 0 else 100.0 * (new - base) / base


def comparison_table(results: Mapping[str, Results], measures: list[str]) -> str:
    """Per split (of the first model) and measure: every model's value, then each later model's
    relative change from the first (the paper's format). results: model name -> split -> measure."""
    names = list(results)
    first, later = names[0], names[1:]
    width = max(10, *(len(n) + 2 for n in names))
    changes = [f"{n} vs {first}" for n in later]
    change_width = max(10, *(len(c) + 2 for c in changes))
    mw = max(12, *(len(m) + 1 for m in measures))
    lines = []
    for split in results[first]:
        lines.append(f"\n{split}")
        lines.append(
            f"  {'measure':{mw}s}"
            + "".join(f"{n:>{width}s}" for n in names)
            + "".join(f"{c:>{change_width}s}" for c in changes)
        )
        for m in measures:
            values = [results[n][split][m] for n in names]
            shown = [relative_change(v, values[0]) for v in values[1:]]
            lines.append(
                f"  {m:{mw}s}"
                + "".join(f"{v:{width}.4f}" for v in values)
                + "".join(f"{'n/a' if c is None else f'{c:+.1f}%':>{change_width}s}" for c in shown)
            )
    return "\n".join(lines)


def comparison_plot(
    results: Mapping[str, Results], measure: str, path: str, losses: Mapping[str, list[float]] | None = None
) -> str:
    """Per-split bars of `measure` for every model (results: model name -> split -> measure) and,
    when given, their training-loss curves beside them; saved as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(results)
    splits = list(results[names[0]])
    fig, axes = plt.subplots(1, 2 if losses else 1, figsize=(12 if losses else 7, 4.5), squeeze=False)
    bars = axes[0][0]
    x = np.arange(len(splits))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * width
        bars.bar(x + offset, [results[name][s][measure] for s in splits], width, label=name)
    bars.set_xticks(x, splits)
    bars.set_ylabel(measure)
    bars.set_title(f"{measure} per split")
    bars.legend()
    if losses:
        curves = axes[0][1]
        for name, values in losses.items():
            curves.plot(range(1, len(values) + 1), values, label=name)
        curves.set_xlabel("step")
        curves.set_ylabel("training loss")
        curves.set_title("training loss (weighted losses differ in scale)")
        curves.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_plot(rows: list[dict], path: str) -> str:
    """A sweep's trials (gcl.tune.tuner.trial_rows): the objective per trial, and each sampled value
    against the objective (categorical values by position); saved as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r["objective"] is not None]
    keys = list(rows[0]["params"]) if rows else []
    fig, axes = plt.subplots(1, 1 + len(keys), figsize=(4.5 * (1 + len(keys)), 4), squeeze=False)
    per_trial = axes[0][0]
    per_trial.bar(range(len(scored)), [r["objective"] for r in scored], color="#1f77b4")
    per_trial.set_xticks(range(len(scored)), [r["trial"] for r in scored], rotation=60, fontsize=7)
    per_trial.set_ylabel("objective")
    per_trial.set_title("objective per trial (best first)")
    for axis, key in zip(axes[0][1:], keys, strict=True):
        values = [r["params"][key] for r in scored]
        if not all(isinstance(v, int | float) for v in values):
            labels = sorted({str(v) for v in values})
            axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
            values = [labels.index(str(v)) for v in values]
        axis.scatter(values, [r["objective"] for r in scored], color="#1f77b4")
        axis.set_xlabel(key)
        axis.set_title(f"{key} against the objective", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grades_plot(report, path: str) -> str:
    """`gcl data grades`'s report as a PNG at `path`: the examination propensity per position (the
    click model's estimate with its bootstrap spread, and the harvested check), and the
    distribution of the grades written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    positions = np.arange(1, len(report.propensities) + 1)
    if len(positions):
        sd = np.array(report.propensity_sd or [0.0] * len(positions))
        left.errorbar(positions, report.propensities, yerr=sd, marker="o", capsize=3, label="click model (EM), ±1 sd")
    harvested = [np.nan if v is None else v for v in report.harvested]
    if harvested:
        left.plot(np.arange(1, len(harvested) + 1), harvested, "s--", label="harvested (pairs at 2 positions)")
    left.set(xlabel="position", ylabel="examination propensity (position 1 = 1)", title="position bias")
    left.legend()
    quantiles = report.grade_quantiles
    right.bar(list(quantiles), list(quantiles.values()))
    right.set(title=f"score_linear of the {report.written} pairs written", ylabel="score_linear")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
