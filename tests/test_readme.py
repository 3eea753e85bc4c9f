"""The documented commands, run as a newcomer types them: the command blocks of the README's tour
and of the guide's sweeps and search pages, in order, in a fresh copy of the repository, with no
MLFLOW_TRACKING_URI and no tracking URI in any config. The only change to a command is a smaller
budget (fewer epochs, trials and generated pairs). Each command's result is checked, and a
command the pages gain that this test does not know fails it, so that the documented path is
always the tested one."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
# (page, the heading of its section with the commands; None: the whole page), in the order they run.
SECTIONS = (
    ("README.md", "## A tour of the commands"),
    ("docs/sweeps.md", None),
    ("docs/search.md", None),
    ("docs/grades.md", None),
)
# The budget, shrunk: a smaller benchmark, one epoch, one trial per sweep.
SMALLER = {
    "gcl data synth": ["--products", "400", "--queries", "150"],
    "gcl train": ["--set", "train.epochs=1"],
    "gcl tune": ["--set", "num_samples=1", "--set", "job.train.epochs=1"],
}


def readme_commands() -> list[str]:
    """The shell commands of the documented sections (SECTIONS), continuation lines joined."""
    commands = []
    for page, heading in SECTIONS:
        section = (ROOT / page).read_text()
        if heading is not None:
            start = section.index(heading + "\n")
            end = section.find("\n## ", start + len(heading))
            section = section[start : end if end > 0 else None]
        for block in re.findall(r"```bash\n(.*?)```", section, re.S):
            joined = re.sub(r"\\\n\s*", "", block)
            commands += [line.strip() for line in joined.splitlines() if line.strip()]
    return commands


def gcl_command(command: str) -> str | None:
    """'gcl train' for '.venv/bin/gcl train -c ...' (None for commands that are not gcl's)."""
    words = shlex.split(command, comments=True)
    if not words or not words[0].endswith("/gcl"):
        return None
    if words[1].startswith("-"):
        return f"gcl {words[1]}"
    return " ".join(["gcl", *[w for w in words[1:3] if not w.startswith("-")]])


def shrunk(command: str) -> str:
    """The command with a smaller budget (SMALLER), placed before its comment."""
    name = gcl_command(command) or ""
    for prefix, extra in SMALLER.items():
        if name.startswith(prefix):
            code, hash_, comment = command.partition(" #")
            return f"{code.rstrip()} {shlex.join(extra)}" + (f" #{comment}" if hash_ else "")
    return command


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory) -> Path:
    """The repository's tracked files in a new directory, with the installed .venv beside them, as
    after `git clone` and `make`: no runs, no mlruns.db."""
    clone = tmp_path_factory.mktemp("clone")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    (clone / ".venv").symlink_to(Path(sys.prefix))
    return clone


def newcomer_env() -> dict[str, str]:
    """This environment without what a newcomer would not have set: no tracking URI, no Ray
    cluster to join (each command starts its own local one)."""
    drop = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONPATH")
    return {k: v for k, v in os.environ.items() if k not in drop}


# The gcl commands check_result knows.
CHECKED = (
    "gcl --help",
    "gcl data synth",
    "gcl data validate",
    "gcl train",
    "gcl evaluate",
    "gcl register",
    "gcl data split",
    "gcl data grades",
    "gcl config",
    "gcl tune",
    "gcl embed",
    "gcl index",
    "gcl ui",
)


def _flag(command: str, flag: str) -> str:
    """The value a command gives `flag` (e.g. --out)."""
    words = shlex.split(command, comments=True)
    return words[words.index(flag) + 1]


def check_result(name: str, command: str, output: str, clone: Path, client: MlflowClient) -> None:
    """What each command must have produced, beyond exiting 0."""
    finished = lambda run: run.info.status == "FINISHED" and run.data.metrics  # noqa: E731
    if name == "gcl --help":
        assert "train" in output and "tune" in output
    elif name == "gcl data synth":
        out = clone / _flag(command, "--out")
        for split in ("train", "in_domain", "zero_shot", "val_in_domain", "val_zero_shot"):
            assert (out / f"{split}.parquet").is_file(), split
        if "--log-sessions" in command:  # a search log over its training queries, and the catalog
            assert (out / "log/impressions.parquet").is_file() and (out / "catalog.parquet").is_file()
    elif name == "gcl data grades":  # graded pairs from the log, with the report
        assert "pairs shown at 2+ positions" in output and "pairs written" in output, output
        assert list((clone / _flag(command, "--out") / "pairs").glob("*.parquet"))
    elif name == "gcl data validate":
        assert "rows, all valid" in output
    elif name == "gcl train":
        experiment = client.get_experiment_by_name("gcl").experiment_id
        runs = client.search_runs([experiment], "tags.`gcl.run_name` = 'tiny-cpu'")
        assert len(runs) == 1 and finished(runs[0]) and "test_objective" in runs[0].data.metrics
        assert (clone / "gcl_runs/tiny-cpu/model/open_clip_pytorch_model.bin").is_file()
        if "name=from-logs" in command:  # trained on the graded log, scored against the true grades
            (from_logs,) = client.search_runs([experiment], "tags.`gcl.run_name` = 'from-logs'")
            assert finished(from_logs) and from_logs.data.metrics["in_domain/ndcg_at_10"] > 0
        if "--from-run" in command:  # the registered model's run trained again: the same model
            (again,) = client.search_runs([experiment], "tags.`gcl.run_name` = 'tiny-cpu-retrain'")
            assert finished(again) and again.data.metrics["test_objective"] == runs[0].data.metrics["test_objective"]
    elif name == "gcl evaluate":
        assert "ndcg@10" in output and "in_domain" in output
        if "--index" in command:
            assert "exact search" in output and "hnsw index" in output and "neighbours_recall@10" in output
        if "-o metrics.json" in command:
            assert set(json.loads((clone / "metrics.json").read_text())["metrics"]) >= {
                "in_domain",
                "zero_shot",
            }
    elif name == "gcl register":
        assert re.search(r"registered my-model version 1 as @champion", output), output
    elif name == "gcl data split":
        out = clone / _flag(command, "--out")
        manifest = json.loads((out / "manifest.json").read_text())
        for split in ("train", "novel_query", "val_novel_query"):
            assert manifest["splits"][split]["rows"] > 0 and list((out / split).glob("*.parquet"))
    elif name == "gcl config":
        assert "loss.weight_fn" in output and "data.validation" in output
    elif name == "gcl tune":
        sweep = "gcl-sweep-tiny-binary" if "binary" in command else "gcl-sweep-tiny"
        champion = client.get_model_version_by_alias(sweep, "champion")
        run = client.get_run(champion.tags["run_id"])
        assert finished(run) and "test_objective" in run.data.metrics
        assert "selected on validation" in output
    elif name == "gcl embed":
        assert re.search(r"embedded \d+ rows with models:/my-model/1", output), output
        assert list((clone / "gcl_runs/catalog").glob("*.parquet"))
    elif name == "gcl index":
        assert "registered search model my-search version 1 as @champion" in output, output
    elif command.startswith("curl") and "/api/search" in command:  # gcl ui: the search model's column, graded
        answer = json.loads(output)
        (column,) = answer["columns"]
        assert column["label"] == "models:/my-search@champion" and len(column["results"]) == 5, answer
        assert all(r["title"] for r in column["results"]) and answer["judged"] == (column["ndcg@10"] is not None)
    elif command.startswith("curl") and "/api/queries" in command:  # gcl ui: the split's queries, judged
        table = json.loads(output)["queries"]
        assert table and all(len(row["ndcg@10"]) == 1 and 0 <= row["ndcg@10"][0] <= 1 for row in table), table[:3]
    elif command.startswith("curl") and '"params"' in command:  # the search model: top 5 ids, best first
        answer = json.loads(output)["predictions"][0]
        assert len(answer["ids"]) == len(answer["title"]) == 5, answer
        assert answer["scores"] == sorted(answer["scores"], reverse=True)
    elif command.startswith("curl"):
        embedding = json.loads(output)["predictions"][0]
        assert len(embedding) > 0 and abs(sum(v * v for v in embedding) - 1.0) < 1e-4
    else:
        raise AssertionError(f"the README has a command this test does not check: {command}")


def test_every_readme_command_is_one_the_run_checks_and_parses_with_gcls_own_parser():
    """The default tier's share of the README test (which runs in the slow tier): every command the
    README gives is one that test checks, each gcl command parses with gcl's own parser, the
    config it names exists and takes its overrides, and every file it reads from the repository
    exists, so that a renamed flag, key or config fails `make test`."""
    from gcl.config import parse_config
    from gcl.job_config import JobConfig
    from gcl.tune.sweep import load_sweep
    from workflows.cli import build_parser

    commands = readme_commands()
    assert len(commands) >= 10 and any(c.startswith(".venv/bin/gcl tune") for c in commands)
    for command in commands:
        name = gcl_command(command)
        if name is None:
            assert command.startswith(("curl ", "PATH=$PWD/.venv/bin:$PATH ")), command
            continue
        assert name in CHECKED, f"the README has a command the README test does not check: {command}"
        words = shlex.split(shrunk(command.removesuffix("&")), comments=True)  # a server: started with &
        try:
            args = build_parser().parse_args(words[1:])
        except SystemExit as done:  # --help prints and exits 0; a refusal exits 2
            assert done.code == 0 and "--help" in words, f"gcl's parser refuses a README command: {command}"
            continue
        config = getattr(args, "config", None)
        if config:
            assert (ROOT / config).is_file(), command
            if args.command == "tune":
                load_sweep(ROOT / config, args.overrides)
            else:
                parse_config(JobConfig, ROOT / config, args.overrides)


@pytest.mark.integration
@pytest.mark.slow
def test_readme_commands_run_as_written_in_a_fresh_clone(fresh_clone):
    commands = readme_commands()
    assert len(commands) >= 10 and any(c.startswith(".venv/bin/gcl tune") for c in commands)
    client = MlflowClient(f"sqlite:///{fresh_clone}/mlruns.db")
    servers = []
    try:
        for command in commands:
            if command.endswith("&"):  # a server: started here, stopped at the end
                servers.append(
                    subprocess.Popen(
                        ["bash", "-c", command.removesuffix("&")],
                        cwd=fresh_clone,
                        env=newcomer_env(),
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
                continue
            start = time.perf_counter()
            done = subprocess.run(
                ["bash", "-c", shrunk(command)],
                cwd=fresh_clone,
                env=newcomer_env(),
                capture_output=True,
                text=True,
                timeout=900,
            )
            output = done.stdout + done.stderr
            assert done.returncode == 0, f"{command}\n{output[-5000:]}"
            check_result(
                gcl_command(command) or "",
                command,
                done.stdout if command.startswith("curl") else output,
                fresh_clone,
                client,
            )
            print(f"{time.perf_counter() - start:6.1f} s  {command}")
    finally:
        for server in servers:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    # One store, the one in the directory the commands ran in: no trial or worker made its own.
    assert [p.relative_to(fresh_clone) for p in fresh_clone.rglob("mlruns.db")] == [Path("mlruns.db")]


def test_every_test_the_faults_table_names_exists():
    """The guide's faults page names tests by file::function; each must be one."""
    named = set(re.findall(r"(test_\w+\.py)::(test_\w+)", (ROOT / "docs/faults.md").read_text()))
    assert len(named) >= 8
    for file, function in named:
        assert re.search(rf"^def {function}\(", (ROOT / "tests" / file).read_text(), re.M), f"{file}::{function}"


def test_every_file_the_readme_and_the_guide_link_to_exists():
    """Relative links and pictures in the README and docs/, and the repository paths they quote
    (`gcl/...py`), point at files in the repository."""
    pages = [ROOT / "README.md", ROOT / "cluster/README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+:", target) and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
        for quoted in re.findall(r"`((?:gcl|workflows|tests|cluster|docs)/[\w/.-]+\.(?:py|md|yaml|json|html))`", text):
            if not (ROOT / quoted).exists():
                missing.append(f"{page.relative_to(ROOT)} quotes {quoted}")
    assert len(pages) >= 8 and not missing, missing
