"""Scaling laws as a tool: plan and run a sweep of small models, fit L(N, D), size the next run.

- `config`: the `scaling` config section (size rule, sweep defaults, fit settings).
- `law`: the Chinchilla law L(N, D) = E + A/N^alpha + B/D^beta and its compute-optimal frontier.
- `fit`: approach 3 (Huber on log L, L-BFGS-B from a grid, bootstrap) and approach 2 (IsoFLOP).
- `sizes`: the size rule (width, depth, heads from a target parameter count), N and FLOPs counts.
- `sweep`: the planned runs, their `jaxlm train` commands, running them with one progress bar.
- `points`: (N, D, C, loss) from finished runs or from a CSV file.
- `flops_check`: the analytic FLOPs of a run against its compiled train step.
- `report`, `plots`: DIR/scaling_report.json and the PNG figures.

Nothing here creates a jax array before the sweep's runs are done: on a TPU VM the `jaxlm train`
subprocesses must find the chips free.
"""
