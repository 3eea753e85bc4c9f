"""`gcl bench`'s printout: one line per figure with its goal, then the figures as JSON."""

from __future__ import annotations

import json

GOALS = {
    "data_over_consumption": ">= 2",
    "pipeline_over_bare": ">= 0.9",
    "pipeline_steady_over_bare": ">= 0.9",
    "pipeline_over_open_clip": ">= 0.85 (one worker)",
    "pipeline_steady_over_open_clip": ">= 0.85 (one worker)",
    "zero3_over_zero0": "<= 0.6",
    "zero3_over_zero0_training": "<= 0.6",
    "zero3_over_zero0_bf16": "<= 0.6",
    "zero3_over_zero0_training_bf16": "<= 0.6",
    "retrieval_gcl_over_faiss": ">= 1.0",
    "search_extra_peak_1m_over_100k": "~1 (bounded)",
    "embed_steady_over_bare": ">= 0.9",
    "cached_over_chunk_batch_memory": "<= 1.3",
    "cached_over_whole_time_per_pair": "~1.33 (one more forward)",
    "locked_binary_cached_over_uncached": ">= 3",
    "locked_gcl_cached_over_uncached": ">= 2",
    "locked_binary_test_objective_difference": "~0 (the same model)",
    "locked_gcl_test_objective_difference": "~0 (the same model)",
}


def figures_table(figures: dict) -> str:
    """One line per figure: name, value, goal (where it has one)."""
    lines = [f"{'figure':34s}{'value':>12s}  goal"]  # long names push their values right
    for key, value in figures.items():
        if isinstance(value, float):  # small figures (a tiny model's MFU on a GPU) in exponent form
            shown = f"{value:12.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:12.2e}"
        else:
            shown = f"{value!s:>12s}"
        lines.append(f"{key:34s}{shown}  {GOALS.get(key) or _search_goal(key) or _step_goal(key)}")
    return "\n".join(lines)


def print_figures(figures: dict) -> dict:
    """Print the table and the JSON; returns the figures."""
    print("\n" + figures_table(figures))
    print(json.dumps(figures, indent=2))
    return figures


def _search_goal(key: str) -> str:
    """The index goals (gcl.bench.search): an approximate index at least 30x flat's queries/s at
    recall@10 >= 0.95 on clustered vectors; none for uniformly random ones."""
    if not key.startswith("search_clustered_"):
        return ""
    if key.endswith("_over_flat"):
        return ">= 30 (with recall >= 0.95)"
    return ">= 0.95" if key.endswith("_recall_at_10") else ""


def _step_goal(key: str) -> str:
    """The step goals against open_clip's loop (gcl.bench.anchor): gcl's engine at ZeRO-0, 1 and 2
    within 10% of it in one process; ZeRO-3 is reported."""
    if key.endswith(
        (
            "_gcl_plain_over_open_clip",
            "_gcl_zero0_over_open_clip",
            "_gcl_zero1_over_open_clip",
            "_gcl_zero2_over_open_clip",
        )
    ):
        return ">= 0.9"
    return ""
