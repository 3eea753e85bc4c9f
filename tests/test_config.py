"""Every shipped config parses; overrides and the CLI report bad keys clearly."""

import json

import pytest

from gcl.config import ConfigError, apply_overrides, parse_config
from gcl.job_config import JobConfig
from workflows.cli import CONFIGS, main

JOB_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if not p.name.startswith("sweep-"))
SWEEP_CONFIGS = sorted(CONFIGS.glob("sweep-*.yaml"))


@pytest.mark.parametrize("path", JOB_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path):
    """A job config is named as its file; an overlay (clip-loss.yaml) names no job of its own."""
    from gcl.config import load_yaml

    job = parse_config(JobConfig, path)
    assert job.name == path.stem if "name" in load_yaml(path) else job.name == JobConfig().name


def test_a_config_extends_others_and_gcl_config_says_what_each_file_sets(tmp_path, capsys):
    """An overlay names the files it extends: their sections merged key by key, its own on top,
    then every file's `set:` (which replaces a mapping whole); `gcl config -c` lists what each
    file sets. A file that extends itself is refused naming the chain."""
    (tmp_path / "base.yaml").write_text(
        "name: base\ntrain: {lr: 0.001, epochs: 3}\n"
        "fields: {right: {image: {modality: image, weight: 0.7}, title: {modality: text, weight: 0.3}}}\n"
    )
    (tmp_path / "over.yaml").write_text(
        "extends: base.yaml\nname: over\ntrain: {lr: 0.002}\nset: ['fields.right={image: {modality: image}}']\n"
    )
    job = parse_config(JobConfig, tmp_path / "over.yaml", ["train.epochs=5"])
    assert (job.name, job.train.lr, job.train.epochs, list(job.fields.right)) == ("over", 0.002, 5, ["image"])
    same = parse_config(
        JobConfig,
        tmp_path / "base.yaml",
        ["name=over", "train.lr=0.002", "fields.right={image: {modality: image}}", "train.epochs=5"],
    )
    assert job == same
    assert main(["config", "-c", str(tmp_path / "over.yaml")]) == 0
    said = capsys.readouterr().out
    assert f"#   {tmp_path / 'base.yaml'}: name, train.lr, train.epochs, fields.right.image.modality" in said
    assert f"#   {tmp_path / 'over.yaml'}: name, train.lr, fields.right" in said
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="a.yaml: extends itself through .*a.yaml -> .*b.yaml"):
        parse_config(JobConfig, tmp_path / "a.yaml")
    assert main(["config", "--keys"]) == 0
    assert "[loss] LossConfig in gcl/loss.py" in capsys.readouterr().out  # where each section is defined


@pytest.mark.parametrize("path", SWEEP_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_sweep_parses_with_its_base_job(path):
    from gcl.tune.sweep import load_sweep

    sweep, job = load_sweep(path)
    assert sweep.space and job.name == sweep.name and job.data.eval


@pytest.mark.parametrize("path", sorted((CONFIGS / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_config_feeds_the_engine_config(path):
    from gcl.train.engine import deepspeed_config

    stage = int(path.stem[-1])
    job = parse_config(JobConfig, None, [f"deepspeed.config={path}", f"deepspeed.zero_stage={stage}"])
    config = deepspeed_config(job)
    assert json.loads(path.read_text())["zero_optimization"]["stage"] == stage
    assert config["zero_optimization"]["stage"] == stage and config["train_micro_batch_size_per_gpu"] == 32


def test_bf16_is_autocast_over_fp32_weights_and_zero3_keeps_torchs_linear(tmp_path):
    """train.precision=bf16 turns on DeepSpeed's torch_autocast mode, never its bf16 mode (which
    keeps bf16 weights); ZeRO-3's process-wide linear replacement is off unless a base config
    turns it on."""
    from gcl.train.engine import deepspeed_config

    bf16 = deepspeed_config(parse_config(JobConfig, None, ["train.precision=bf16"]))
    fp32 = deepspeed_config(parse_config(JobConfig, None, ["train.precision=fp32"]))
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and bf16["bf16"] == {"enabled": False}
    assert fp32["torch_autocast"]["enabled"] is False and fp32["bf16"] == {"enabled": False}
    assert bf16["zero_optimization"]["memory_efficient_linear"] is False
    base = tmp_path / "zero3.json"
    base.write_text(json.dumps({"zero_optimization": {"stage": 3, "memory_efficient_linear": True}}))
    own = deepspeed_config(parse_config(JobConfig, None, [f"deepspeed.config={base}", "deepspeed.zero_stage=3"]))
    assert own["zero_optimization"]["memory_efficient_linear"] is True


def test_overrides_nest_parse_yaml_and_reject_bad_forms():
    data = apply_overrides({}, ["train.epochs=3", "fields.right={image: {modality: image}}", "loss.score_range=[0, 1]"])
    assert data == {
        "train": {"epochs": 3},
        "fields": {"right": {"image": {"modality": "image"}}},
        "loss": {"score_range": [0, 1]},
    }
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="train is a value, not a section"):
        apply_overrides({"train": 1}, ["train.epochs=2"])
    with pytest.raises(ConfigError, match=r"deepspeed.zero_stage: Input should be 0, 1, 2 or 3 \(got 4\)"):
        parse_config(JobConfig, None, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="loss.field_pair_terms.0.right='colour' is not a right field"):
        parse_config(JobConfig, None, ["loss.field_pair_terms=[{left: query, right: colour}]"])


def test_cli_prints_resolved_config_and_exits_2_on_bad_keys(capsys):
    assert main(["config", "-c", str(CONFIGS / "tiny-cpu.yaml"), "--set", "train.epochs=7"]) == 0
    assert "epochs: 7" in capsys.readouterr().out
    assert main(["config", "--set", "train.epoch=3"]) == 2
    assert "did you mean 'epochs'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert all(cmd in usage for cmd in ("config", "data", "train", "evaluate", "demo", "bench"))


def test_a_job_larger_than_a_local_cluster_fails_before_training_naming_the_keys(caplog):
    from gcl.train.job import check_resources

    job = parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml", ["scaling.num_workers=8"])
    with pytest.raises(ConfigError, match=r"3.5 CPU needed, 2 available.*scaling.num_workers=8"):
        check_resources(job, {"CPU": 2.0}, can_grow=False)
    check_resources(job, {"CPU": 2.0}, can_grow=True)  # a remote cluster may autoscale: a warning
    assert "waiting for the cluster to scale up" in caplog.text
    gpu = parse_config(JobConfig, CONFIGS / "vitb32-gs10m.yaml")
    with pytest.raises(ConfigError, match="4 GPU needed, 0 available"):
        check_resources(gpu, {"CPU": 64.0}, can_grow=False)
    check_resources(parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml"), {"CPU": 2.0}, can_grow=False)


def test_resume_is_reported_only_from_a_committed_checkpoint(tmp_path, caplog):
    """A checkpoint directory Ray Train never committed (the driver stopped while saving) is not
    taken for a resume point: the run says it starts over."""
    import json
    import logging

    from gcl.train.checkpoint import committed_checkpoint, log_resume

    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    assert committed_checkpoint(str(run_dir)) is None
    log_resume(str(run_dir))
    assert "never committed" in caplog.text and "starts from the beginning" in caplog.text
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps(
            {
                "latest_checkpoint_result": {
                    "checkpoint_dir_name": "checkpoint_2026-01-01_00-00-00.000000",
                    "metrics": {"epoch": 1, "step": 15},
                }
            }
        )
    )
    log_resume(str(run_dir))
    assert "run resumes from its checkpoint at epoch 1, step 15" in caplog.text


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epoch=3", r"train.epoch: unknown key; .*\(did you mean 'epochs'\?\)"),
        (
            "fields.right.image.weight=-1",
            r"fields.right.image.weight: Input should be greater than or equal to 0 \(got -1\)",
        ),
        ("loss.left_to_right=-0.5", r"loss.left_to_right: Input should be greater than or equal to 0"),
        (
            "loss.weight_fn=softmax",
            r"loss.weight_fn: Input should be 'uniform', 'linear', 'reciprocal', 'power' or 'exponential' "
            r"\(got 'softmax'\)",
        ),
        ("deepspeed.zero_stage=4", r"deepspeed.zero_stage: Input should be 0, 1, 2 or 3 \(got 4\)"),
        ("scaling.num_workers=0", r"scaling.num_workers: Input should be greater than or equal to 1"),
    ],
)
def test_each_invalid_config_value_in_the_data_guide_table_names_its_key(override, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(JobConfig, CONFIGS / "tiny-cpu.yaml", [override])


def test_defaults_that_depend_on_the_working_directory_are_resolved_once_where_the_command_starts(
    tmp_path, monkeypatch
):
    """Trials and workers run in directories of their own: what they get must not depend on it."""
    from gcl.train.job import resolve_job

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = parse_config(
        JobConfig,
        None,
        ["storage=runs", "data.train=data/train.parquet", "data.validation={in_domain: data/val_in_domain.parquet}"],
    )
    with pytest.raises(ConfigError, match="mlflow.tracking_uri is not resolved"):
        job.mlflow.resolved_uri()
    resolved = resolve_job(job)
    assert resolved.mlflow.resolved_uri() == f"sqlite:///{tmp_path}/mlruns.db"
    assert resolved.storage == str(tmp_path / "runs") and resolved.data.train == str(tmp_path / "data/train.parquet")
    assert resolved.data.eval["in_domain"] == str(tmp_path / "gcl_runs/data/in_domain.parquet")
    assert resolved.data.validation["in_domain"] == str(tmp_path / "data/val_in_domain.parquet")
    monkeypatch.chdir(tmp_path / "..")
    assert resolve_job(resolved) == resolved  # resolving again, anywhere, changes nothing

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere/store.db")
    assert resolve_job(job).mlflow.tracking_uri == f"sqlite:///{tmp_path.parent}/elsewhere/store.db"
    server = resolve_job(
        job.model_copy(update={"mlflow": job.mlflow.model_copy(update={"tracking_uri": "http://h:5000"})})
    )
    assert server.mlflow.tracking_uri == "http://h:5000"
    assert resolve_job(parse_config(JobConfig, None, ["storage=s3://bucket/runs"])).storage == "s3://bucket/runs"
