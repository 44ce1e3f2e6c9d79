"""How much of the quick start's spread over seeds is its evaluation's noise, and how much its training's?

The quick start's bar (seen exact reward: end - start >= 0.10) is judged on one evaluation of 80 images, 4 per
seen prompt from fixed noise that the seed draws. A run's measured gain is its training's gain plus that
evaluation's noise. This benchmark takes the finished `ddpo` runs of compare_methods.py (each is `python
ddpo_diffexp.py --shapes --seed S`) and evaluates the pretrained model (start) and the run's final LoRA (end)
again under --noise-sets independent sets of evaluation noise, with the script's own `evaluate`. Noise set 0 is
the run's own, so it must reproduce the run's eval.jsonl (checked). Over seeds it reports

  within-seed   the evaluation's noise: the standard deviation of one run's gain over the noise sets;
  between-seed  the training's: the spread over seeds of each run's gain averaged over the noise sets, less the
                evaluation noise that average still has (its variance / K);
  bar           the runs whose gain clears 0.10 with their own evaluation, and with the average over the K noise
                sets (an evaluation of 4 K images per prompt);
  drift         the same for the bar's other half, from the run's middle checkpoint (--middle-epoch, 10 of 20:
                the last checkpoint before the end that the preset itself saves): the noise of end - middle, and
                the runs whose middle beats their end by more than 0.01 (so that their best evaluation is more than
                0.01 above the end).

    python benchmarks/evaluation_noise.py           (the 20 seeds of diffexp_20_seeds, 8 noise sets: about 15 min)
"""

import json
import os
import sys
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NOISE_SET_STRIDE = 1_000  # noise set k of seed S evaluates as seed S + 1000 k: no two (S, k) share noise


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: list(range(20)))
    """the runs to re-evaluate, one per seed (runs-dir/ddpo_q1280_e4_seed<S>)"""
    noise_sets: int = 8
    """evaluations of each run's start and end, each with other noise; the first is the run's own"""
    runs_dir: str = "benchmarks/results/runs"
    """where compare_methods.py put its runs"""
    run_name: str = "ddpo_q1280_e4_seed{seed}"
    """a run's folder name in runs-dir"""
    middle_epoch: int = 10
    """the checkpoint the drift half of the bar is judged from (the preset saves every 10 epochs of 20, the
    benchmark's runs every 5)"""
    output: str = "benchmarks/results/evaluation_noise/summary.json"
    """where the numbers go; table.md (also printed) goes beside it"""


def variance_split(gains):
    """Split the variance over seeds of gains (S, K) (seed, noise set) into evaluation noise and training.

    Returns (within-seed std, between-seed std of the training's gains, std over seeds of the K-averaged gains).
    The K-averaged gain of a seed is its training's gain plus evaluation noise of variance within^2 / K, so the
    training's variance is the averaged gains' variance less within^2 / K (floored at 0).
    """
    gains = np.asarray(gains, dtype=float)
    noise_sets = gains.shape[1]
    within = float(np.sqrt(gains.var(axis=1, ddof=1).mean()))  # pooled over seeds
    averaged = gains.mean(axis=1)  # (S,)
    averaged_std = float(averaged.std(ddof=1))
    between = float(np.sqrt(max(averaged_std**2 - within**2 / noise_sets, 0.0)))
    return within, between, averaged_std


def shapes_evaluator():
    """What re-evaluating a `--shapes` run of ddpo_diffexp.py needs, with the script's own `evaluate`.

    Returns (script, script_args, prompt_sets, pretrained, evaluate): prompt_sets {"seen": [...], "unseen": [...]};
    pretrained is a LoRA state dict of zeros (A = B = 0 adds nothing: the model every run starts from); and
    evaluate(lora, seed, noise_set, prompts, **overrides) loads that LoRA state into the UNet and returns the mean
    exact reward of the prompts' evaluation images, drawn from the noise of seed + NOISE_SET_STRIDE * noise_set,
    with the preset's flags replaced by overrides (e.g. cfg_high=3.0, or num_steps=50).
    """
    from accelerate import Accelerator
    from diffusers.utils import logging as diffusers_logging
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    import ddpo_diffexp as script
    from common import add_lora, encode_prompts, load_prompts, unseen_twin
    from worlds import SHAPES_MODEL, load_pipeline, load_reward

    diffusers_logging.set_verbosity_error()
    accelerator = Accelerator(cpu=True)
    script_args = script.parse_args(["--shapes"])
    pipeline = load_pipeline(SHAPES_MODEL, "cpu", torch.float32)
    pipeline.scheduler.set_timesteps(script_args.num_steps)
    reward_fn = load_reward(script_args.reward, "cpu", torch.float32)
    prompt_sets = {"seen": load_prompts(script_args.prompts), "unseen": load_prompts(unseen_twin(script_args.prompts))}
    null_embeds = encode_prompts(pipeline, [""], script_args.resolution)  # c_null, (1, L, D)
    side = script_args.resolution // (2 ** (len(pipeline.vae.config.block_out_channels) - 1))
    latent_shape = (pipeline.unet.config.in_channels, side, side)
    add_lora(pipeline.unet, script_args.lora_rank)
    pretrained = {key: torch.zeros_like(value) for key, value in get_peft_model_state_dict(pipeline.unet).items()}

    @torch.no_grad()
    def evaluate(lora, seed, noise_set, prompts, **overrides):
        set_peft_model_state_dict(pipeline.unet, lora)
        evaluation_args = replace(script_args, seed=seed + NOISE_SET_STRIDE * noise_set, **overrides)
        pipeline.scheduler.set_timesteps(evaluation_args.num_steps)  # the sampler walks scheduler.timesteps
        mean, _, _, _ = script.evaluate(
            evaluation_args, accelerator, pipeline, pipeline.unet, reward_fn, prompts, null_embeds, latent_shape
        )
        return mean

    return script, script_args, prompt_sets, pretrained, evaluate


def require_runs(runs_dir, run_name, seeds):
    """The seeds' run folders, or SystemExit with one line naming the command that makes the missing ones."""
    run_dirs = {seed: os.path.join(runs_dir, run_name.format(seed=seed)) for seed in seeds}
    missing = [seed for seed, run_dir in run_dirs.items() if not os.path.isfile(os.path.join(run_dir, "eval.jsonl"))]
    if missing:
        raise SystemExit(
            f"error: no run of seed(s) {' '.join(map(str, missing))} in {runs_dir}; make them with `python "
            f"benchmarks/compare_methods.py --methods ddpo --seeds {' '.join(map(str, seeds))} --runs-dir {runs_dir}`"
        )
    return run_dirs


def require_reproduced(what, reproduced, expected, tolerance=1e-3):
    """SystemExit with one line unless noise set 0's rewards are the run's logged ones: otherwise the evaluator is
    not the run's evaluation, and what it measures means nothing."""
    if max(abs(a - b) for a, b in zip(reproduced, expected)) > tolerance:
        raise SystemExit(
            f"error: {what}: noise set 0 gives {' -> '.join(f'{v:.4f}' for v in reproduced)}, the run "
            f"logged {' -> '.join(f'{v:.4f}' for v in expected)}"
        )


def checkpoint_state(script, run_dir, epoch):
    """The training state a run saved after `epoch` (SystemExit with one line if it has no such checkpoint)."""
    folders = {int(os.path.basename(folder)[len("epoch_") :]): folder for folder in script.checkpoint_folders(run_dir)}
    if epoch not in folders:
        raise SystemExit(f"error: {run_dir} has no checkpoint of epoch {epoch} (it has {sorted(folders) or 'none'})")
    return torch.load(os.path.join(folders[epoch], "training_state.pt"), map_location="cpu", weights_only=False)


def main(args):
    from compare_methods import LASTING_DRIFT, LASTING_GAIN

    run_dirs = require_runs(args.runs_dir, args.run_name, args.seeds)
    script, script_args, prompt_sets, pretrained, evaluate = shapes_evaluator()
    prompts = prompt_sets["seen"]

    per_seed = {}
    for seed in args.seeds:
        run_dir = run_dirs[seed]
        with open(os.path.join(run_dir, "eval.jsonl")) as f:
            logged = {line["epoch"]: line["seen_reward_mean"] for line in map(json.loads, f)}  # epoch -> reward
        middle, state = (checkpoint_state(script, run_dir, epoch) for epoch in (args.middle_epoch, script_args.epochs))
        starts, middles, ends = [], [], []
        for noise_set in range(args.noise_sets):
            for lora, values in ((pretrained, starts), (middle["lora"], middles), (state["lora"], ends)):
                values.append(evaluate(lora, seed, noise_set, prompts))
        # noise set 0 is the run's own evaluation: the same numbers as its eval.jsonl, or this measures nothing
        reproduced = (starts[0], middles[0], ends[0])
        expected = tuple(logged[epoch] for epoch in (0, middle["epoch"], state["epoch"]))
        require_reproduced(f"seed {seed}", reproduced, expected)
        per_seed[seed] = dict(
            middle_epoch=middle["epoch"],
            start=starts,
            middle=middles,
            end=ends,
            gain=[e - s for s, e in zip(starts, ends)],
            end_minus_middle=[e - m for m, e in zip(middles, ends)],
        )
        gains = per_seed[seed]["gain"]
        print(f"seed {seed}: gains " + " ".join(f"{g:+.3f}" for g in gains) + f", mean {np.mean(gains):+.3f}")

    gains = np.array([per_seed[seed]["gain"] for seed in args.seeds])  # (S, K)
    within, between, averaged_std = variance_split(gains)
    own_std = float(gains[:, 0].std(ddof=1))
    passes_own = int((gains[:, 0] >= LASTING_GAIN).sum())
    passes_averaged = int((gains.mean(axis=1) >= LASTING_GAIN).sum())
    settles = np.array([per_seed[seed]["end_minus_middle"] for seed in args.seeds])  # (S, K)
    settle_within, settle_between, _ = variance_split(settles)
    drifts_own = int((settles[:, 0] < -LASTING_DRIFT).sum())
    drifts_averaged = int((settles.mean(axis=1) < -LASTING_DRIFT).sum())
    summary = dict(
        seeds=args.seeds,
        noise_sets=args.noise_sets,
        images_per_evaluation=len(prompts) * script_args.eval_images_per_prompt,
        mean_gain=float(gains.mean()),
        own_evaluation_std=own_std,
        within_seed_std=within,
        between_seed_std=between,
        averaged_std=averaged_std,
        evaluation_share_of_variance=within**2 / max(within**2 + between**2, 1e-12),
        passes_own_evaluation=passes_own,
        passes_averaged_evaluation=passes_averaged,
        mean_end_minus_middle=float(settles.mean()),
        end_minus_middle_within_seed_std=settle_within,
        end_minus_middle_between_seed_std=settle_between,
        middle_beats_end_own_evaluation=drifts_own,
        middle_beats_end_averaged_evaluation=drifts_averaged,
        per_seed=per_seed,
    )
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=1)
    images = summary["images_per_evaluation"]
    lines = [
        f"seeds {args.seeds[0]}-{args.seeds[-1]} ({len(args.seeds)} `ddpo` runs, the quick start of each seed), "
        f"{args.noise_sets} evaluations of {images} seen images each at the start and the end",
        "",
        "| quantity | value |",
        "| --- | --- |",
        f"| mean gain (end - start) | {gains.mean():+.3f} |",
        f"| std over seeds of the gain, the run's own evaluation | {own_std:.3f} |",
        f"| std of one run's gain over evaluation noise (within-seed) | {within:.3f} |",
        f"| std over seeds of the training's gain (between-seed) | {between:.3f} |",
        f"| share of the variance that is evaluation noise, within^2 / (within^2 + between^2) | "
        f"{summary['evaluation_share_of_variance']:.2f} |",
        f"| runs with gain >= {LASTING_GAIN}: own evaluation / averaged over {args.noise_sets} | "
        f"{passes_own}/{len(args.seeds)} / {passes_averaged}/{len(args.seeds)} |",
        f"| mean end - middle (epoch {per_seed[args.seeds[0]]['middle_epoch']}) | {settles.mean():+.3f} |",
        f"| std of one run's end - middle over evaluation noise / the training's over seeds | "
        f"{settle_within:.3f} / {settle_between:.3f} |",
        f"| runs whose middle beats the end by more than {LASTING_DRIFT}: own evaluation / averaged over "
        f"{args.noise_sets} | {drifts_own}/{len(args.seeds)} / {drifts_averaged}/{len(args.seeds)} |",
    ]
    with open(os.path.join(os.path.dirname(args.output) or ".", "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
