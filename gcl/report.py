"""Result tables and plots: per-split metrics, and a method's relative change against a baseline."""

from __future__ import annotations

from collections.abc import Mapping

Results = Mapping[str, Mapping[str, float]]  # split -> measure -> value


def metrics_table(results: Results, measures: list[str] | None = None) -> str:
    """A plain-text table: one row per split, one column per measure."""
    measures = measures or list(next(iter(results.values())))
    head = f"{'split':15s}" + "".join(f"{m:>11s}" for m in measures)
    rows = [
        f"{split:15s}" + "".join(f"{values[m]:11.4f}" for m in measures) for split, values in results.items()
    ]
    return "\n".join([head, "-" * len(head), *rows])


def relative_change(new: float, base: float) -> float | None:
    """(new - base) / base in percent; None when the baseline is 0."""
    return None if base == 0 else 100.0 * (new - base) / base


def comparison_table(
    baseline: Results, method: Results, measures: list[str], names=("baseline", "GCL")
) -> str:
    """Per split and measure: baseline, method and the method's relative change (the paper's format)."""
    lines = []
    for split in method:
        lines.append(f"\n{split}")
        lines.append(f"  {'measure':12s}{names[0]:>10s}{names[1]:>10s}{'change':>10s}")
        for m in measures:
            b, g = baseline[split][m], method[split][m]
            change = relative_change(g, b)
            shown = "n/a" if change is None else f"{change:+.1f}%"
            lines.append(f"  {m:12s}{b:10.4f}{g:10.4f}{shown:>10s}")
    return "\n".join(lines)


def comparison_plot(baseline: Results, method: Results, measure: str, losses: Mapping[str, list[float]],
                    path: str, names=("baseline", "GCL")) -> str:  # fmt: skip
    """Per-split bars of `measure` for both methods, and training-loss curves, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    splits = list(method)
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(splits))
    bars.bar(x - 0.2, [baseline[s][measure] for s in splits], 0.4, label=names[0], color="#999999")
    bars.bar(x + 0.2, [method[s][measure] for s in splits], 0.4, label=names[1], color="#1f77b4")
    bars.set_xticks(x, splits)
    bars.set_ylabel(measure)
    bars.set_title(f"{measure} per split")
    bars.legend()
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
