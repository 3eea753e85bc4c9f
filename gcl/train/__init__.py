"""Training: the job (resolve, validate, fit a Ray Train TorchTrainer, export and record), the
worker loop each Ray Train worker runs, its DeepSpeed engine, micro-batches (whole or in cached-
gradient chunks), checkpoints, the workers' evaluation and the progress bar they feed."""
