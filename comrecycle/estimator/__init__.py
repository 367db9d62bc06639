"""Effect-loss estimator (docs/method.md): model, baselines and uplift evaluation."""
