"""The names gcl gives things in MLflow, in one place: what runs, sweeps and the registry write
and what `gcl register`, `gcl evaluate` and the tests read back."""

# Run metrics (per-split metrics are "<split>/<measure>", '@' written as '_at_').
OBJECTIVE = "objective"  # eval.objective over eval.objective_splits of the validation splits (else of
# the evaluation splits), each epoch: what ranks epochs, trials and registered versions
TEST_OBJECTIVE = "test_objective"  # the same measure on the evaluation (test) splits, reported beside it
VALIDATION_PREFIX = "validation/"  # validation splits' metrics: validation/<split>/<measure>
SAMPLE_PREFIX = "sample/"  # a quick evaluation's metrics (eval.sample_queries): sample/<split>/<measure>
EVAL_SAMPLE_QUERIES = "eval_sample_queries"  # each evaluated epoch: queries per split sampled (0: all)
EVAL_SECONDS = "eval_seconds"  # each evaluated epoch: seconds spent evaluating
BEST_OBJECTIVE = "best_objective"  # a sweep's parent run: its best trial's objective
ROWS_SKIPPED = "data_rows_skipped"  # training rows dropped by data.on_bad_rows=skip

# Run tags.
RUN_NAME_TAG = "gcl.run_name"  # the job's `name`: a run of the same name is resumed
MODEL_URI_TAG = "gcl.model_uri"  # the pyfunc embedding model logged for the run
ERROR_TAG = "gcl.error"  # why the run failed
WORKERS_TAG = "gcl.workers"  # where every training rank ran (node, host, device)
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: a trial's run under its sweep's
SWEEP_TAG = "gcl.tune.sweep"  # the sweep a parent or trial run belongs to
TRIAL_ID_TAG = "gcl.trial_id"
STOPPED_EARLY_TAG = "gcl.stopped_early"  # a trial ASHA stopped before its last epoch
BEST_TRIAL_TAG = "gcl.best_trial"
BEST_RUN_TAG = "gcl.best_run_id"

# Run artifacts.
CONFIG_ARTIFACT = "config.yaml"  # the whole resolved job config
DEEPSPEED_ARTIFACT = "deepspeed.json"  # the DeepSpeed config the engines ran with
MANIFEST_ARTIFACT = "dataset_manifest.json"  # every data file with its sha256
MODEL_ARTIFACT = "model"  # the exported open_clip model directory
EMBEDDING_MODEL_ARTIFACT = "embedding_model"  # the pyfunc model (gcl/registry/embedding_model.py)
SEARCH_MODEL_ARTIFACT = "search_model"  # the pyfunc search model (gcl/search/search_model.py)
TRIALS_ARTIFACT = "trials.json"  # a sweep's trials: params, objective, status, error
TRIALS_PLOT = "trials.png"  # the objective per trial and the sampled values against it

# Model version tags (the objective the version was registered with) and aliases.
OBJECTIVE_TAG = "gcl.objective"
OBJECTIVE_KEY_TAG = "gcl.objective_key"  # what the objective measures, on which evaluation data
CHAMPION = "champion"
CHALLENGER = "challenger"
