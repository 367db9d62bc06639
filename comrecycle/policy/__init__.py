"""The recycling policy: the Lagrangian-dual solver, off-policy evaluation, baselines."""
