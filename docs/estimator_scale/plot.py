"""Draws docs/estimator_scale/saving_vs_log_size.png from the one-step figures of docs/RESULTS.md,
"The estimator's training seed, and an ensemble" (each number is a measured row of that table):
`.venv/bin/python docs/estimator_scale/plot.py`."""
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
# one-step saving % at 0.5 / 1 / 2% true loss on the seed-12 40k log (docs/RESULTS.md table)
ens = {40: [[7.8, 16.5, 26.7]], 120: [[9.6, 19.0, 31.9], [22.3, 28.5, 36.0]],
       200: [[22.9, 29.2, 37.5], [22.6, 27.9, 35.3], [3.6, 19.8, 32.6]],
       400: [[30.5, 35.7, 42.4], [28.4, 34.1, 41.3]]}
ceiling = [29.4, 34.7, 41.1]; oracle = [58.0, 58.4, 59.2]; dcaf = [6.1, 12.3, 24.5]
fig, axes = plt.subplots(1, 3, figsize=(12, 4.3), sharey=True, constrained_layout=True)
for k, (ax, b) in enumerate(zip(axes, ["0.5%", "1%", "2%"])):
    xs = [n for n, v in ens.items() for _ in v]; ys = [r[k] for v in ens.values() for r in v]
    ax.scatter(xs, ys, color="C0", label="3-net ensemble (one build per dot)", zorder=3)
    ax.plot(list(ens), [sum(r[k] for r in v) / len(v) for v in ens.values()], color="C0", alpha=0.5)
    ax.axhline(ceiling[k], color="C2", ls="--", label="summary-feature ceiling (true ΔQ, 200k)")
    ax.axhline(oracle[k], color="k", ls=":", label="oracle")
    ax.axhline(dcaf[k], color="C3", ls="-.", label="best DCAF")
    ax.set_title(f"true loss {b}"); ax.set_xlabel("training log (thousand requests)")
    ax.set_xticks(list(ens)); ax.grid(alpha=0.3)
axes[0].set_ylabel("compute saved % (one-step)")
h, l = axes[0].get_legend_handles_labels()
fig.legend(h, l, loc="outside lower center", ncol=4, fontsize=9)
fig.suptitle("The estimator's ranking against the size of its training log (held-out seed-12 log)")
fig.savefig(Path(__file__).with_name("saving_vs_log_size.png"), dpi=110)
