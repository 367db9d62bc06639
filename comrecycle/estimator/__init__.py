"""Effect-loss estimator (DESIGN.md §2): model, baselines and uplift evaluation."""
