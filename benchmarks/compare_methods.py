"""Compare the methods on the shapes world: reward against reward queries, over seeds, under one fixed budget.

Every run is the method script itself, launched as a user would (`python <script> --shapes --seed S ...`), with
the same budget of reward queries (epochs x samples_per_epoch). From each run's eval.jsonl (the exact shapes
reward on fixed noise, seen and unseen prompts) it writes

  results.csv   one row per (method, seed, evaluation): reward_queries, seen and unseen exact reward;
  summary.csv   per method: final seen / unseen reward (mean, std over seeds), reward queries needed to reach
                --target (the DiffExp paper's claim: about 20% fewer with exploration), diversity;
  curves.png    mean and spread (min-max over seeds) of the exact reward against reward queries, seen and
                unseen prompts (needs matplotlib: pip install matplotlib);
  and prints the summary as a Markdown table (benchmarks/README.md's tables are this output).

Diversity: mean pairwise RMS pixel distance between the 8 images (8 noises) of each unseen prompt from the
final LoRA, averaged over prompts; lower means the method collapsed onto fewer layouts.

Commands (the tables and plots of benchmarks/README.md; the second reuses the first's seed-0 runs):
    python benchmarks/compare_methods.py --methods ddpo ddpo_diffexp --seeds 0 1 --reward-queries 960 \
        --evaluations 3 --output-dir benchmarks/results/diffexp
    python benchmarks/compare_methods.py --seeds 0 --reward-queries 960 --evaluations 3 \
        --output-dir benchmarks/results/methods
All six methods over three seeds (about 1.5 hours on 2 CPU cores):
    python benchmarks/compare_methods.py
"""

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# method name -> (script, extra flags); every run also gets --shapes and the shared budget flags below
METHODS = {
    "ddpo": ("ddpo_diffexp.py", []),
    "ddpo_diffexp": ("ddpo_diffexp.py", ["--diffexp"]),
    "alignprop": ("alignprop_diffexp.py", []),
    "alignprop_diffexp": ("alignprop_diffexp.py", ["--diffexp"]),
    "b2_diffurl": ("b2_diffurl.py", []),
    "ddpo_coca": ("ddpo_coca.py", []),
}


@dataclass
class Args:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to run: ddpo, ddpo_diffexp, alignprop, alignprop_diffexp, b2_diffurl, ddpo_coca"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """one run per method and seed"""
    reward_queries: int = 1280
    """budget of reward queries (training images scored) per run"""
    samples_per_epoch: int = 64
    """reward queries per epoch (stage, for B2-DiffuRL); epochs = reward_queries / samples_per_epoch"""
    evaluations: int = 5
    """evaluations per run, evenly spaced, plus the one before training"""
    target: float = 0.0
    """exact reward to reach for the queries-to-target column (0: halfway from the pretrained model to the best
    final mean)"""
    output_dir: str = "benchmarks/results"
    """where results.csv, summary.csv and curves.png go"""
    runs_dir: str = "benchmarks/results/runs"
    """where the runs go; a finished run (same method, seed and budget) is reused, so benchmarks can share runs"""
    rerun: bool = False
    """run again even if a run's eval.jsonl is complete"""


def run_method(args, method, seed, epochs, eval_every):
    """One training run through the script's command line; returns the lines of its eval.jsonl."""
    script, extra = METHODS[method]
    run_dir = os.path.join(args.runs_dir, f"{method}_seed{seed}")
    eval_path = os.path.join(run_dir, "eval.jsonl")
    if not args.rerun and os.path.exists(eval_path):
        lines = [json.loads(line) for line in open(eval_path)]
        if lines and lines[-1]["epoch"] == epochs:
            return lines
    subprocess.run(["rm", "-rf", run_dir], check=True)
    command = [
        sys.executable,
        os.path.join(ROOT, script),
        "--shapes",
        *extra,
        "--seed",
        str(seed),
        "--epochs",
        str(epochs),
        "--samples-per-epoch",
        str(args.samples_per_epoch),
        "--eval-every",
        str(eval_every),
        "--save-every",
        str(epochs),
        "--output-dir",
        args.runs_dir,
        "--run-name",
        f"{method}_seed{seed}",
    ]
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {method} seed {seed} failed:\n{result.stderr[-2000:]}")
    print(f"{method} seed {seed}: {time.time() - start:.0f} s", flush=True)
    return [json.loads(line) for line in open(eval_path)]


@torch.no_grad()
def diversity(method, seed, runs_dir, prompts, images_per_prompt=8):
    """Mean pairwise RMS pixel distance among one prompt's images (8 fixed noises), averaged over prompts."""
    from diffusers.utils import logging as diffusers_logging

    from worlds import SHAPES_MODEL, load_pipeline

    diffusers_logging.set_verbosity_error()  # no loading bars, no "no LoRA keys for the text encoder" notice
    diffusers_logging.disable_progress_bar()
    pipeline = load_pipeline(SHAPES_MODEL, "cpu", torch.float32)
    checkpoints = os.path.join(runs_dir, f"{method}_seed{seed}", "checkpoints")
    pipeline.load_lora_weights(os.path.join(checkpoints, sorted(os.listdir(checkpoints))[-1]))
    distances = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(1_000 + index)
        images = pipeline(
            [prompt] * images_per_prompt,
            num_inference_steps=10,
            guidance_scale=5.0,
            height=32,
            width=32,
            generator=generator,
            output_type="pt",
        ).images.flatten(1)  # (N, 3 * 32 * 32)
        pairwise = torch.cdist(images, images) / images.shape[1] ** 0.5  # RMS distance per pair
        distances.append(pairwise.sum().item() / (images_per_prompt * (images_per_prompt - 1)))
    return float(np.mean(distances))


def queries_to_reach(lines, target):
    """Reward queries at which the seen exact reward first reaches target (linear between evaluations), or None."""
    points = [(line["reward_queries"], line["seen_reward_mean"]) for line in lines]
    for (q0, r0), (q1, r1) in zip(points, points[1:]):
        if r1 >= target > r0:
            return q0 + (target - r0) / (r1 - r0) * (q1 - q0)
    return 0.0 if points and points[0][1] >= target else None


def plot(path, curves, methods):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: curves.png needs matplotlib (pip install matplotlib); the CSV files are written")
        return
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for axis, split in zip(axes, ("seen", "unseen")):
        for method in methods:
            queries = np.array([line["reward_queries"] for line in curves[method][0]])
            # (seeds, evals)
            values = np.array([[line[f"{split}_reward_mean"] for line in lines] for lines in curves[method]])
            axis.plot(queries, values.mean(0), marker="o", markersize=3, label=method)
            axis.fill_between(queries, values.min(0), values.max(0), alpha=0.15)
        axis.set_title(f"{split} prompts")
        axis.set_xlabel("reward queries")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("exact reward (mean; band: min-max over seeds)")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def bootstrap_interval(values, confidence=0.95, resamples=10_000, seed=0):
    """Percentile bootstrap interval (low, high) of the mean of `values`, e.g. one final reward per seed."""
    values = np.asarray(values, dtype=float)
    means = values[np.random.default_rng(seed).integers(0, len(values), (resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_differences(finals, method, baseline):
    """method minus baseline, seed by seed: {seed: value} each; only the seeds both ran. Runs of one seed share
    the seed's evaluation noise and first draws, so the difference cancels what the seed alone decides."""
    return [
        finals[method][seed] - finals[baseline][seed] for seed in sorted(finals[method]) if seed in finals[baseline]
    ]


def interval_text(values):
    low, high = bootstrap_interval(values)
    return f"{np.mean(values):.3f} [{low:.3f}, {high:.3f}]"


def main(args):
    from common import load_prompts

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.reward_queries % args.samples_per_epoch:
        raise SystemExit(
            f"error: --reward-queries {args.reward_queries} is not a multiple of --samples-per-epoch "
            f"{args.samples_per_epoch}"
        )
    epochs = args.reward_queries // args.samples_per_epoch
    eval_every = max(1, epochs // args.evaluations)
    os.makedirs(args.output_dir, exist_ok=True)
    curves = {
        method: [run_method(args, method, seed, epochs, eval_every) for seed in args.seeds] for method in args.methods
    }

    with open(os.path.join(args.output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "epoch", "reward_queries", "seen_exact_reward", "unseen_exact_reward"])
        for method in args.methods:
            for seed, lines in zip(args.seeds, curves[method]):
                for line in lines:
                    writer.writerow(
                        [
                            method,
                            seed,
                            line["epoch"],
                            line["reward_queries"],
                            f"{line['seen_reward_mean']:.4f}",
                            f"{line['unseen_reward_mean']:.4f}",
                        ]
                    )

    start_reward = np.mean([lines[0]["seen_reward_mean"] for method in args.methods for lines in curves[method]])
    best_final = max(np.mean([lines[-1]["seen_reward_mean"] for lines in curves[method]]) for method in args.methods)
    target = args.target or (start_reward + best_final) / 2
    unseen_prompts = load_prompts("unseen_shapes")
    finals = {  # method -> {seed: final seen exact reward}, for the paired differences
        method: {seed: lines[-1]["seen_reward_mean"] for seed, lines in zip(args.seeds, curves[method])}
        for method in args.methods
    }
    rows = []
    for method in args.methods:
        finals_seen = [lines[-1]["seen_reward_mean"] for lines in curves[method]]
        finals_unseen = [lines[-1]["unseen_reward_mean"] for lines in curves[method]]
        reached = [queries_to_reach(lines, target) for lines in curves[method]]
        diversities = [diversity(method, seed, args.runs_dir, unseen_prompts) for seed in args.seeds]
        rows.append(
            dict(
                method=method,
                seen_start=np.mean([lines[0]["seen_reward_mean"] for lines in curves[method]]),
                seen_final=np.mean(finals_seen),
                seen_final_std=np.std(finals_seen),
                unseen_final=np.mean(finals_unseen),
                unseen_final_std=np.std(finals_unseen),
                reached=sum(r is not None for r in reached),
                queries_to_target=np.mean([r for r in reached if r is not None])
                if any(r is not None for r in reached)
                else float("nan"),
                diversity=np.mean(diversities),
                seen_final_interval=interval_text(finals_seen),
                unseen_final_interval=interval_text(finals_unseen),
                seen_vs_ddpo=interval_text(paired_differences(finals, method, "ddpo"))
                if "ddpo" in finals and method != "ddpo"
                else "",
            )
        )
    with open(os.path.join(args.output_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(os.path.join(args.output_dir, "curves.png"), curves, args.methods)

    print(
        f"\nseeds {' '.join(map(str, args.seeds))}, {args.reward_queries} reward queries per run, target exact "
        f"reward {target:.3f}\n"
    )
    print(
        "| method | seen: start -> final | unseen: final | queries to target (runs that reached it) | diversity | "
        "seen final, 95% bootstrap CI | paired seen final - ddpo, 95% CI |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        queries = (
            "never" if not row["reached"] else f"{row['queries_to_target']:.0f} ({row['reached']}/{len(args.seeds)})"
        )
        print(
            f"| {row['method']} | {row['seen_start']:.3f} -> {row['seen_final']:.3f} ± {row['seen_final_std']:.3f} | "
            f"{row['unseen_final']:.3f} ± {row['unseen_final_std']:.3f} | {queries} | {row['diversity']:.3f} | "
            f"{row['seen_final_interval']} | {row['seen_vs_ddpo']} |"
        )


if __name__ == "__main__":
    main(tyro.cli(Args))
