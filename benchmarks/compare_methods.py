"""Compare the methods on the shapes world: reward against reward queries, over seeds, under one fixed budget.

Every run is the method script itself, launched as a user would (`python <script> --shapes --seed S ...`), with
the same budget of reward queries (epochs x samples_per_epoch). Runs are paired by seed: runs of one seed share
the evaluation noise (fixed per prompt) and the seed of every draw, so a paired difference cancels what the seed
alone decides. From each run's eval.jsonl (the exact shapes reward on fixed noise, seen and unseen prompts) and
metrics.jsonl it writes, into --output-dir,

  results.csv   one row per (method, seed, evaluation): reward_queries, seen and unseen exact reward;
  summary.csv   per method: seen / unseen reward at every evaluation with a 95% percentile-bootstrap interval over
                seeds; paired differences against --baseline with their intervals; reward queries to --target and
                their ratio to the baseline's (DiffExp's claim: about 0.8); diversity; for a shapes_binary run the
                fraction of training samples that satisfied every attribute of their caption;
  summary.json  the same numbers, for the claims table;
  table.md      the Markdown tables that benchmarks/README.md shows (also printed);
  curves.png    mean exact reward against reward queries with its 95% band over seeds, one panel for the seen and
                one for the unseen prompts (needs matplotlib: pip install matplotlib).

Runs go --jobs at a time, one torch thread each. A run that was interrupted resumes from its last checkpoint
(--resume of the scripts), and a finished one is reused by any benchmark with the same method, reward, budget and
evaluation size, so rerunning a command continues where it stopped.

Diversity: mean pairwise RMS pixel distance between the 8 images (8 fixed noises) of each unseen prompt from the
final LoRA, averaged over prompts; lower means the method collapsed onto fewer layouts.

Commands (benchmarks/README.md's tables and plots; runs are shared between them, so after the first the others
only add their own runs; about 70 minutes for the first on 2 CPU cores, 30 for the second, 20 for the third, 15
for the fourth, and the fifth reuses the first's runs; the sixth adds 30 runs, about 45 minutes, and the
seventh 10, about 15):
    python benchmarks/compare_methods.py
    python benchmarks/compare_methods.py --reward shapes_binary --methods ddpo ddpo_diffexp b2_diffurl ddpo_coca \
        --reward-queries 960 --evaluations 3 --output-dir benchmarks/results/binary
    python benchmarks/compare_methods.py --methods ddpo ddpo_diffexp ddpo_eq7 ddpo_eq8 \
        --output-dir benchmarks/results/ablation
    python benchmarks/compare_methods.py --reward shapes_binary --methods ddpo ddpo_diffexp ddpo_eq7 ddpo_eq8 \
        --reward-queries 960 --evaluations 3 --output-dir benchmarks/results/ablation_binary
    python benchmarks/compare_methods.py --methods alignprop alignprop_diffexp --baseline alignprop \
        --output-dir benchmarks/results/alignprop
    python benchmarks/compare_methods.py --methods ddpo ddpo_diffexp --seeds $(seq 0 19) \
        --output-dir benchmarks/results/diffexp_20_seeds
    python benchmarks/compare_methods.py --methods ddpo_100 ddpo_coca_100 --baseline ddpo_100 --target 0.547 \
        --seeds $(seq 0 9) --output-dir benchmarks/results/coca_100_10_seeds
The other 10-seed experiments (methods, binary, ablation_binary, eq7, eq8, alignprop, each `_10_seeds`) add seeds
5-9 to these; their commands are in benchmarks/README.md's claims list and sections.
"""

import csv
import functools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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
    "ddpo_eq7": ("ddpo_diffexp.py", ["--dynamic-cfg"]),  # DiffExp's ablation: the dynamic CFG scale alone
    "ddpo_eq8": ("ddpo_diffexp.py", ["--prompt-weighting"]),  # and the random prompt weighting alone
    "alignprop": ("alignprop_diffexp.py", []),
    "alignprop_diffexp": ("alignprop_diffexp.py", ["--diffexp"]),
    "b2_diffurl": ("b2_diffurl.py", []),
    "ddpo_coca": ("ddpo_coca.py", []),
    # CoCA's released "_100" schedule (Lil-Shake/CoCA scripts/train_coca.py: an optimiser step per 32 backward
    # passes of train batch 1). Here 4 backward passes of train batch 8: the same 32 (sample, timestep) terms per
    # step and 20 steps per epoch instead of DDPO's 4, at CPU speed (ours: batch 1 would be ~5x slower here).
    "ddpo_coca_100": ("ddpo_coca.py", ["--backward-passes-per-update", "4"]),
    # DDPO on that schedule: what separates CoCA's credit assignment from its five times more optimiser steps
    "ddpo_100": ("ddpo_diffexp.py", ["--backward-passes-per-update", "4"]),
}
DEFAULT_METHODS = ["ddpo", "ddpo_diffexp", "alignprop", "alignprop_diffexp", "b2_diffurl"]
DEFAULT_METHODS += ["ddpo_coca", "ddpo_100", "ddpo_coca_100"]
NOT_FOR_BINARY = ("alignprop", "alignprop_diffexp")  # AlignProp needs a differentiable reward


@dataclass
class Args:
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    """methods to run: ddpo, ddpo_diffexp, ddpo_eq7, ddpo_eq8, alignprop, alignprop_diffexp, b2_diffurl,
    ddpo_coca, ddpo_100, ddpo_coca_100"""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """one run per method and seed; the same seeds for every method (paired)"""
    reward: str = "shapes"
    """training reward: shapes (the exact, graded one) or shapes_binary (1 only if every attribute holds); the
    evaluation always reports the exact shapes reward. AlignProp's runs train on shapes_learned either way"""
    reward_queries: int = 1280
    """budget of reward queries (training images scored) per run: the --shapes presets' 20 epochs of 64"""
    samples_per_epoch: int = 64
    """reward queries per epoch (stage, for B2-DiffuRL); epochs = reward_queries / samples_per_epoch"""
    evaluations: int = 4
    """evaluations per run, evenly spaced, plus the one before training"""
    eval_images_per_prompt: int = 4
    """evaluation images per prompt: the presets' 4 (80 seen, 48 unseen images; a standard error of 0.036 per run's
    mean), so that a benchmark run is the quick start of its seed; 8 halves the evaluation's variance"""
    baseline: str = "ddpo"
    """the method the paired differences and query ratios are against"""
    target: float = 0.0
    """exact seen reward to reach for the queries-to-target columns (0: halfway from the pretrained model to the
    baseline's final mean)"""
    jobs: int = 2
    """runs at a time, one torch thread each"""
    output_dir: str = "benchmarks/results/methods"
    """where results.csv, summary.csv, summary.json, table.md and curves.png go"""
    runs_dir: str = "benchmarks/results/runs"
    """where the runs go; a finished run (same method, reward, budget and evaluation size) is reused"""
    rerun: bool = False
    """run again even if a run's eval.jsonl is complete"""


def run_name(args, method, seed):
    reward = "" if args.reward == "shapes" or method in NOT_FOR_BINARY else f"_{args.reward}"
    return f"{method}{reward}_q{args.reward_queries}_e{args.eval_images_per_prompt}_seed{seed}"


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_method(args, method, seed, epochs, eval_every):
    """One training run through the script's command line; returns (eval.jsonl lines, metrics.jsonl lines)."""
    script, extra = METHODS[method]
    name = run_name(args, method, seed)
    run_dir = os.path.join(args.runs_dir, name)
    eval_path, metrics_path = os.path.join(run_dir, "eval.jsonl"), os.path.join(run_dir, "metrics.jsonl")
    if not args.rerun and os.path.exists(eval_path):
        lines = read_jsonl(eval_path)
        if lines and lines[-1]["epoch"] == epochs:
            return lines, read_jsonl(metrics_path)
    checkpoints = os.path.join(run_dir, "checkpoints")
    resume = not args.rerun and os.path.isdir(checkpoints) and os.listdir(checkpoints)
    if not resume:
        subprocess.run(["rm", "-rf", run_dir], check=True)
    reward_flags = []
    if args.reward != "shapes" and method not in NOT_FOR_BINARY:
        reward_flags = ["--reward", args.reward, "--eval-reward", "shapes"]
    command = [sys.executable, os.path.join(ROOT, script), "--shapes", *extra, *reward_flags, "--seed", str(seed)]
    command += ["--epochs", str(epochs), "--samples-per-epoch", str(args.samples_per_epoch)]
    command += ["--eval-every", str(eval_every), "--save-every", str(eval_every)]
    command += ["--eval-images-per-prompt", str(args.eval_images_per_prompt)]
    command += ["--output-dir", args.runs_dir, "--run-name", name] + (["--resume"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"error: {name} failed:\n{result.stderr[-2000:]}")
    print(f"{name}: {time.time() - start:.0f} s{' (resumed)' if resume else ''}", flush=True)
    return read_jsonl(eval_path), read_jsonl(metrics_path)


@functools.cache
def shapes_pipeline():
    """The pretrained shapes model, loaded once per benchmark; diversity() puts each run's LoRA on it and takes it
    off again."""
    from diffusers.utils import logging as diffusers_logging

    from worlds import SHAPES_MODEL, load_pipeline

    diffusers_logging.set_verbosity_error()  # no loading bars, no "no LoRA keys for the text encoder" notice
    diffusers_logging.disable_progress_bar()
    return load_pipeline(SHAPES_MODEL, "cpu", torch.float32)


@torch.no_grad()
def diversity(run_dir, prompts, images_per_prompt=8):
    """Mean pairwise RMS pixel distance among one prompt's images (8 fixed noises), averaged over prompts."""
    pipeline = shapes_pipeline()
    checkpoints = os.path.join(run_dir, "checkpoints")
    pipeline.load_lora_weights(os.path.join(checkpoints, sorted(os.listdir(checkpoints))[-1]))
    try:
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
            distances.append(mean_pairwise_rms(images))
    finally:
        pipeline.unload_lora_weights()
    return float(np.mean(distances))


def mean_pairwise_rms(images):
    """Mean RMS distance over the N (N - 1) ordered pairs of distinct rows of images (N, P)."""
    pairwise = torch.cdist(images, images) / images.shape[1] ** 0.5  # (N, N), zero diagonal
    return pairwise.sum().item() / (len(images) * (len(images) - 1))


def queries_to_reach(lines, target):
    """Reward queries at which the seen exact reward first reaches target (linear between evaluations), or None."""
    points = [(line["reward_queries"], line["seen_reward_mean"]) for line in lines]
    for (q0, r0), (q1, r1) in zip(points, points[1:]):
        if r1 >= target > r0:
            return q0 + (target - r0) / (r1 - r0) * (q1 - q0)
    return 0.0 if points and points[0][1] >= target else None


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


def interval(values):
    """{mean, low, high, n} of values with the 95% bootstrap interval of the mean (None when there are none)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    low, high = bootstrap_interval(values)
    return dict(mean=float(np.mean(values)), low=low, high=high, n=len(values))


def interval_text(values, digits=3):
    """'mean [low, high]' of values (a list, or interval()'s dict); '-' when there are none."""
    stats = values if isinstance(values, dict) or values is None else interval(values)
    if stats is None:
        return "-"
    return f"{stats['mean']:.{digits}f} [{stats['low']:.{digits}f}, {stats['high']:.{digits}f}]"


def verdict(stats, better_when_positive=True):
    """supported / contradicted / not resolved, from a paired difference's interval (None: not resolved)."""
    if stats is None:
        return "not resolved"
    low, high = (stats["low"], stats["high"]) if better_when_positive else (-stats["high"], -stats["low"])
    return "supported" if low > 0 else "contradicted" if high < 0 else "not resolved"


def training_hit_fraction(metrics_lines):
    """A shapes_binary run's mean training reward over its epochs: the fraction of its training samples that got
    every attribute of their caption."""
    return float(np.mean([line["reward_mean"] for line in metrics_lines]))


# the quick start's bar (issue 17): the seen exact reward ends this much above its first evaluation, and at most
# this much below its best one
LASTING_GAIN, LASTING_DRIFT = 0.10, 0.01


def lasting_rise(lines, gain=LASTING_GAIN, drift=LASTING_DRIFT):
    """The quick start's bar on one run: its seen exact reward ends at least `gain` above its first evaluation and
    within `drift` of its best one (no drift down)."""
    seen = [line["seen_reward_mean"] for line in lines]
    return seen[-1] - seen[0] >= gain and max(seen) - seen[-1] <= drift


def summarise(args, runs, target):
    """runs: {method: {seed: (eval lines, metrics lines)}} -> {method: statistics}, every interval over seeds."""
    baseline = runs.get(args.baseline)
    prompt_sets = {split: load_prompt_set(split) for split in ("seen", "unseen")}
    summary = {}
    for method, by_seed in runs.items():
        seeds = sorted(by_seed)
        evals = {seed: by_seed[seed][0] for seed in seeds}
        stats = dict(seeds=seeds, queries=[line["reward_queries"] for line in evals[seeds[0]]])
        for split in ("seen", "unseen"):
            # (seeds, evaluations)
            values = np.array([[line[f"{split}_reward_mean"] for line in evals[seed]] for seed in seeds])
            stats[split] = [interval(column) for column in values.T]
            # standard error of one run's evaluation mean: per-image std / sqrt(images), averaged over runs
            images = args.eval_images_per_prompt * len(prompt_sets[split])
            stats[f"{split}_eval_standard_error"] = float(
                np.mean([evals[seed][-1][f"{split}_reward_std"] for seed in seeds]) / np.sqrt(images)
            )
            if baseline is not None and method != args.baseline:
                finals = {
                    "method": {seed: evals[seed][-1][f"{split}_reward_mean"] for seed in seeds},
                    "baseline": {seed: lines[-1][f"{split}_reward_mean"] for seed, (lines, _) in baseline.items()},
                }
                stats[f"{split}_final_vs_baseline"] = interval(paired_differences(finals, "method", "baseline"))
        reached = {seed: queries_to_reach(evals[seed], target) for seed in seeds}
        stats["queries_to_target"] = interval(list(reached.values()))
        stats["reached"] = sum(value is not None for value in reached.values())
        stats["lasting_rise"] = sum(lasting_rise(evals[seed]) for seed in seeds)
        if baseline is not None and method != args.baseline:
            # paired by seed, over the seeds whose baseline run reached the target; a run of the method that never
            # reached it counts as the whole budget, a lower bound of its queries (so the ratio is a lower bound too)
            ratios = []
            for seed in seeds:
                base = queries_to_reach(baseline[seed][0], target) if seed in baseline else None
                if base:
                    ratios.append((args.reward_queries if reached[seed] is None else reached[seed]) / base)
            stats["queries_ratio_vs_baseline"] = interval(ratios)
        stats["diversity"] = interval(
            [
                diversity(os.path.join(args.runs_dir, run_name(args, method, seed)), prompt_sets["unseen"])
                for seed in seeds
            ]
        )
        if args.reward == "shapes_binary" and method not in NOT_FOR_BINARY:
            hits = {seed: training_hit_fraction(by_seed[seed][1]) for seed in seeds}
            stats["training_hit_fraction"] = interval(list(hits.values()))
            if baseline is not None and method != args.baseline:
                baseline_hits = {seed: training_hit_fraction(lines) for seed, (_, lines) in baseline.items()}
                stats["training_hit_fraction_vs_baseline"] = interval(
                    paired_differences({"method": hits, "baseline": baseline_hits}, "method", "baseline")
                )
        summary[method] = stats
    return summary


def load_prompt_set(split):
    from common import load_prompts

    return load_prompts("shapes" if split == "seen" else "unseen_shapes")


def markdown(args, summary, target):
    seeds = " ".join(map(str, args.seeds))
    columns = ["method", "seen: start -> final", "unseen: start -> final", f"seen final - {args.baseline} (paired)"]
    columns += [f"unseen final - {args.baseline} (paired)", "queries to target (runs that reached it)"]
    columns += [f"queries / {args.baseline}'s (paired; never reached = budget)", "diversity"]
    if args.reward == "shapes_binary":
        columns += ["training hit fraction", f"hit fraction - {args.baseline} (paired)"]
    lines = [
        f"seeds {seeds}, {args.reward_queries} reward queries per run, training reward `{args.reward}`, exact reward "
        f"evaluated on {args.eval_images_per_prompt} images per prompt (fixed noise), target {target:.3f}; "
        "every interval is a 95% percentile bootstrap over seeds",
        "",
        "| " + " | ".join(columns) + " |",
        "| --- " * len(columns) + "|",
    ]
    for method, stats in summary.items():
        row = [
            method,
            f"{stats['seen'][0]['mean']:.3f} -> {interval_text(stats['seen'][-1])}",
            f"{stats['unseen'][0]['mean']:.3f} -> {interval_text(stats['unseen'][-1])}",
            interval_text(stats.get("seen_final_vs_baseline")),
            interval_text(stats.get("unseen_final_vs_baseline")),
            f"{interval_text(stats['queries_to_target'], 0)} ({stats['reached']}/{len(stats['seeds'])})",
            interval_text(stats.get("queries_ratio_vs_baseline"), 2),
            interval_text(stats["diversity"]),
        ]
        if args.reward == "shapes_binary":
            row += [interval_text(stats.get(f"training_hit_fraction{key}")) for key in ("", "_vs_baseline")]
        lines.append("| " + " | ".join(row) + " |")
    first = next(iter(summary.values()))
    lines += [
        "",
        f"Standard error of one run's evaluation mean (per-image std / sqrt(images)): seen "
        f"{first['seen_eval_standard_error']:.3f}, unseen {first['unseen_eval_standard_error']:.3f}.",
        "",
        f"Runs with a lasting rise (seen: end - start >= {LASTING_GAIN:.2f} and best - end <= {LASTING_DRIFT:.2f}, "
        "the quick start's bar): "
        + ", ".join(f"{method} {stats['lasting_rise']}/{len(stats['seeds'])}" for method, stats in summary.items())
        + ".",
        "",
        "Seen exact reward at each evaluation (mean [95% interval]):",
        "",
        "| method | " + " | ".join(f"{q} queries" for q in first["queries"]) + " |",
        "| --- " * (len(first["queries"]) + 1) + "|",
    ]
    for method, stats in summary.items():
        lines.append(f"| {method} | " + " | ".join(interval_text(cell) for cell in stats["seen"]) + " |")
    return "\n".join(lines) + "\n"


def plot(path, summary):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: curves.png needs matplotlib (pip install matplotlib); the CSV and JSON files are written")
        return
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for axis, split in zip(axes, ("seen", "unseen")):
        for method, stats in summary.items():
            queries = np.array(stats["queries"])
            cells = stats[split]
            axis.plot(queries, [c["mean"] for c in cells], marker="o", markersize=3, label=method)
            axis.fill_between(queries, [c["low"] for c in cells], [c["high"] for c in cells], alpha=0.12)
        axis.set_title(f"{split} prompts")
        axis.set_xlabel("reward queries")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel(f"exact reward (mean over {len(next(iter(summary.values()))['seeds'])} seeds; 95% band)")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(args):
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.reward not in ("shapes", "shapes_binary"):
        raise SystemExit(f"error: --reward {args.reward}: choose shapes or shapes_binary")
    if args.reward_queries % args.samples_per_epoch:
        raise SystemExit(
            f"error: --reward-queries {args.reward_queries} is not a multiple of --samples-per-epoch "
            f"{args.samples_per_epoch}"
        )
    if args.reward == "shapes_binary" and any(m in NOT_FOR_BINARY for m in args.methods):
        raise SystemExit(f"error: {', '.join(NOT_FOR_BINARY)} need a differentiable reward, not shapes_binary")
    epochs = args.reward_queries // args.samples_per_epoch
    eval_every = max(1, epochs // args.evaluations)
    os.makedirs(args.output_dir, exist_ok=True)
    jobs = [(method, seed) for method in args.methods for seed in args.seeds]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda job: run_method(args, *job, epochs, eval_every), jobs))
    runs = {method: {} for method in args.methods}
    for (method, seed), result in zip(jobs, results):
        runs[method][seed] = result

    with open(os.path.join(args.output_dir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "epoch", "reward_queries", "seen_exact_reward", "unseen_exact_reward"])
        for (method, seed), (lines, _) in zip(jobs, results):
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
    if args.target:
        target = args.target
    else:  # halfway from the pretrained model to the baseline's final mean (or the best final, without it)
        start = np.mean([lines[0]["seen_reward_mean"] for lines, _ in results])
        reference = args.baseline if args.baseline in runs else None
        finals = {m: np.mean([lines[-1]["seen_reward_mean"] for lines, _ in runs[m].values()]) for m in runs}
        target = (start + (finals[reference] if reference else max(finals.values()))) / 2
    summary = summarise(args, runs, target)
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(
            dict(
                target=target,
                reward=args.reward,
                reward_queries=args.reward_queries,
                eval_images_per_prompt=args.eval_images_per_prompt,
                methods=summary,
            ),
            f,
            indent=1,
        )
    with open(os.path.join(args.output_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "quantity", "mean", "low", "high", "n"])
        for method, stats in summary.items():
            for key, value in stats.items():
                cells = value if isinstance(value, list) and value and isinstance(value[0], dict) else [value]
                for index, cell in enumerate(cells):
                    if isinstance(cell, dict):
                        name = f"{key}@{stats['queries'][index]}" if len(cells) > 1 else key
                        writer.writerow([method, name, cell["mean"], cell["low"], cell["high"], cell["n"]])
    plot(os.path.join(args.output_dir, "curves.png"), summary)
    table = markdown(args, summary, target)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table)
    print("\n" + table)


if __name__ == "__main__":
    main(tyro.cli(Args))
