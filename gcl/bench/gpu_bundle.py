"""What the GPU check (gcl.bench.gpu_check) needs besides PyTorch, gathered into one folder for a GPU
machine that has PyTorch alone and no network: wheels of the pure-Python packages and of
pydantic_core for that machine's Python, and DeepSpeed's package directory from this environment
(DeepSpeed publishes no wheel; its ops are compiled where they run, and the check uses none).

    python -m gcl.bench.gpu_bundle --out .gpu-bundle --python-version 3.12

There, from the repository's root:

    pip install -q --no-index --no-deps --target /tmp/site .gpu-bundle/*.whl
    cp -r .gpu-bundle/site/* /tmp/site/
    PYTHONPATH=/tmp/site:. python3 -m gcl.bench.gpu_check --out gpu-check.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

# Imported by the check and not part of a PyTorch machine: open_clip (and what its tokenizer
# imports), pydantic (gcl's configs) and DeepSpeed's own needs beyond PyTorch's.
WHEELS = (
    "open_clip_torch",
    "ftfy",
    "wcwidth",
    "pydantic",
    "pydantic_core",
    "annotated_types",
    "typing_inspection",
    "hjson",
)
COPIED = ("deepspeed",)  # no wheel on the package index: the installed directory travels
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def bundle(out: str, python_version: str) -> list[str]:
    """Write the wheels (this environment's versions) and the copied packages under `out`; the
    files written."""
    target = Path(out)
    (target / "site").mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(target),
            *pins,
        ],
        check=True,
    )
    for name in COPIED:
        source = _package_dir(name)
        shutil.copytree(
            source, target / "site" / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.so")
        )
        info = next(source.parent.glob(f"{name}-*.dist-info"))  # DeepSpeed reads its own version
        shutil.copytree(info, target / "site" / info.name, dirs_exist_ok=True)
    return sorted(str(p.relative_to(target)) for p in target.iterdir())


def _package_dir(name: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed here: `make` installs it")
    return Path(list(spec.submodule_search_locations)[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (major.minor)")
    args = parser.parse_args(argv)
    for name in bundle(args.out, args.python_version):
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
