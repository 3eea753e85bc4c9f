"""`gcl evaluate` (workflows/evaluate.py): metrics of one model printed and written, several compared
against the first, open_clip base models among them."""

import pytest

from gcl.model import (
    WEIGHTS_FILE,
    save_model,
)


def test_gcl_evaluate_on_an_exported_model_prints_and_writes_the_metrics(tiny, tmp_path, capsys):
    """The `gcl evaluate` command on a model directory: the table on stdout and the JSON file hold
    what evaluate_splits computes from the same directory."""
    import json

    from gcl.config import FieldsConfig
    from gcl.data.schema import DataConfig
    from gcl.data.synth import SynthConfig, synthesize
    from gcl.retrieval import EvalConfig, RowEncoder, evaluate_splits
    from workflows.cli import main

    synthesize(tmp_path / "data", SynthConfig(products=40, queries=20, docs_per_query=4, seed=6))
    out = save_model(tiny.clip, tiny.model_cfg, tmp_path / "export")
    (out / "gcl_fields.json").write_text(json.dumps(FieldsConfig().model_dump()))
    splits = {
        "in_domain": str(tmp_path / "data" / "in_domain.parquet"),
        "zero_shot": str(tmp_path / "data" / "zero_shot.parquet"),
    }
    written = tmp_path / "metrics.json"
    code = main(["evaluate", "--set", f"data.eval={json.dumps(splits)}", "--model", str(out), "-o", str(written)])
    assert code == 0
    want = evaluate_splits(RowEncoder.from_model_dir(str(out)), splits, DataConfig(), EvalConfig())
    saved = json.loads(written.read_text())
    assert saved["model"] == str(out) and set(saved["metrics"]) == set(splits)
    for split in splits:
        assert saved["metrics"][split] == pytest.approx(want[split], abs=1e-9), split
    table = capsys.readouterr().out
    assert all(f"{want[s]['ndcg@10']:.4f}" in table for s in splits)


def test_gcl_evaluate_compares_models_against_the_first_including_open_clip_base_models(tiny, tmp_path, capsys):
    """Several --model flags: an exported model, the same weights named as an open_clip base model
    (architecture + weights file, fed with the config's fields) and the bare architecture. The
    first two score the same, the table gives each model's change from the first, and the plot is
    saved and logged to an MLflow run."""
    import json

    from mlflow import MlflowClient

    from gcl.config import FieldsConfig
    from gcl.data.synth import SynthConfig, synthesize
    from workflows.cli import main

    synthesize(tmp_path / "data", SynthConfig(products=120, queries=40, docs_per_query=8, seed=6))
    out = save_model(tiny.clip, tiny.model_cfg, tmp_path / "export")
    (out / "gcl_fields.json").write_text(json.dumps(FieldsConfig().model_dump()))
    models = [str(out), f"open_clip:gcl-tiny:{out / WEIGHTS_FILE}", "open_clip:gcl-tiny"]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    written = tmp_path / "metrics.json"
    code = main(
        [
            "evaluate",
            "--set",
            f"data.eval={{in_domain: {tmp_path}/data/in_domain.parquet}}",
            "--set",
            f"storage={tmp_path}/runs",
            "--set",
            f"mlflow.tracking_uri={uri}",
            "--set",
            "seed=3",
            *[a for m in models for a in ("--model", m)],
            "-o",
            str(written),
        ]
    )
    assert code == 0
    results = json.loads(written.read_text())["models"]
    assert list(results) == models
    assert results[models[1]]["in_domain"] == pytest.approx(results[models[0]]["in_domain"], abs=1e-6)
    assert results[models[2]]["in_domain"] != results[models[0]]["in_domain"]  # weights drawn from seed 3
    table = capsys.readouterr().out
    assert f"open_clip:gcl-tiny vs {out}" in table and "+0.0%" in table
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("gcl").experiment_id])[0]
    assert run.data.params["model_2"] == "open_clip:gcl-tiny" and run.info.run_name.startswith("evaluate-")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {f"{run.info.run_name}.png", "evaluation.json"}
    assert [p.name for p in (tmp_path / "runs").rglob("*.png")] == [f"{run.info.run_name}.png"]
    assert (
        main(
            [
                "evaluate",
                "--set",
                f"data.eval={{in_domain: {tmp_path}/data/in_domain.parquet}}",
                "--set",
                f"mlflow.tracking_uri={uri}",
                "--model",
                str(out),
                "--model",
                "open_clip:",
            ]
        )
        == 2
    )  # no architecture named
    assert "give an open_clip architecture" in capsys.readouterr().err
