"""gcl's jobs (one thin module each) and the `gcl` command line."""

from pathlib import Path

CONFIGS = Path(__file__).parent / "configs"  # the shipped job, sweep and DeepSpeed configs
