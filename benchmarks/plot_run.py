"""Plot a run's evaluation curve: the paper figures' axes (mean evaluation reward against reward queries).

    python benchmarks/plot_run.py runs/ddpo_diffexp_shapes_seed0            # writes runs/.../curve.png
    python benchmarks/plot_run.py runs/a_seed0 runs/a_seed1 runs/a_seed2     # the mean over runs and their range

The curve is eval.jsonl's `seen_reward_mean` (and `unseen_reward_mean` where there is one) against
`reward_queries`, the x axis of DiffExp's Figures 4 and 6; with several runs (seeds of one command) the line is
their mean and the band their range. `--band results.csv --method ddpo` draws the band from a benchmark's results
instead (benchmarks/compare_methods.py writes them: method, seed, epoch, reward_queries, seen_exact_reward, ...).
`--grids` puts the first run's first and last evaluation grids (samples/eval_seen_epoch_*.png) beside the curve.
It needs matplotlib (pip install matplotlib), which nothing else of the project does.
"""

import argparse
import csv
import glob
import json
import os
import sys

import numpy as np


def read_curves(run_dirs):
    """{split: (queries (Q,), rewards (runs, Q))} from each run's eval.jsonl, on the queries every run evaluated."""
    runs = []
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "eval.jsonl")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} does not exist; give a run folder (runs/<run name>)")
        with open(path) as f:
            runs.append([json.loads(line) for line in f])
    curves = {}
    for split in ("seen", "unseen"):
        key = f"{split}_reward_mean"
        points = [{line["reward_queries"]: line[key] for line in lines if line.get(key) is not None} for lines in runs]
        queries = sorted(set.intersection(*(set(p) for p in points)))
        if queries:
            curves[split] = (np.array(queries), np.array([[p[q] for q in queries] for p in points]))
    return curves


def read_band(path, method):
    """{split: (queries, rewards (seeds, Q))} of one method in a benchmark's results.csv."""
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row["method"] == method]
    if not rows:
        raise SystemExit(f"error: no rows of method '{method}' in {path}")
    curves = {}
    for split in ("seen", "unseen"):
        column = next((name for name in rows[0] if name.startswith(f"{split}_") and name.endswith("reward")), None)
        if column is None:
            continue
        seeds = sorted({row["seed"] for row in rows}, key=int)
        queries = sorted({int(row["reward_queries"]) for row in rows})
        table = {(row["seed"], int(row["reward_queries"])): float(row[column]) for row in rows}
        curves[split] = (np.array(queries), np.array([[table[s, q] for q in queries] for s in seeds]))
    return curves


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders (runs/<run name>), e.g. the seeds of one command")
    parser.add_argument("--band", help="a benchmark's results.csv whose seeds give the band (and the mean)")
    parser.add_argument("--method", default="ddpo", help="the method of --band's rows")
    parser.add_argument("--grids", action="store_true", help="the first run's first and last evaluation grids")
    parser.add_argument("--title", default=None, help="the figure's title (default: the first run's folder name)")
    parser.add_argument("--out", default=None, help="the PNG to write (default: <first run>/curve.png)")
    args = parser.parse_args()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib: pip install matplotlib")
    curves = read_band(args.band, args.method) if args.band else read_curves(args.runs)
    grids = sorted(glob.glob(os.path.join(args.runs[0], "samples", "eval_seen_epoch_*.png"))) if args.grids else []
    if args.grids and len(grids) < 2:
        raise SystemExit(f"error: --grids needs two evaluation grids in {args.runs[0]}/samples")
    panels = 1 + 2 * bool(grids)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    axis = axes[0][0]
    for split, colour in (("seen", "tab:blue"), ("unseen", "tab:orange")):
        if split not in curves:
            continue
        queries, rewards = curves[split]
        axis.plot(queries, rewards.mean(0), color=colour, label=f"{split} prompts")
        if len(rewards) > 1:
            axis.fill_between(queries, rewards.min(0), rewards.max(0), color=colour, alpha=0.2)
    seeds = len(next(iter(curves.values()))[1])
    band = f"mean and range over {seeds} seeds" if seeds > 1 else "one run"
    axis.set(xlabel="reward queries", ylabel="mean evaluation reward", title=band)
    axis.legend(loc="lower right")
    for panel, (grid, when) in enumerate(zip(grids[:1] + grids[-1:], ("before fine-tuning", "after")), 1):
        axes[0][panel].imshow(plt.imread(grid))  # each prompt's first evaluation image, its prompt and reward
        axes[0][panel].set_title(f"{when}: {os.path.basename(grid)[len('eval_seen_') : -4].replace('_', ' ')}")
        axes[0][panel].axis("off")
    figure.suptitle(args.title or os.path.basename(os.path.normpath(args.runs[0])))
    figure.tight_layout()
    out = args.out or os.path.join(args.runs[0], "curve.png")
    figure.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except SystemExit as stop:
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            sys.exit(2)
        raise
