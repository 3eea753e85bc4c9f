"""Sweeps: what a sweep is (its config, search space and checks) and the Ray Tune side that runs
one trial driver, a training job, per sampled setting."""
