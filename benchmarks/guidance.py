"""How the shapes world's exact reward depends on the guidance scale w and the sampler, before and after DDPO.

The DDPO-family `--shapes` presets sample, train and evaluate with 10 DDIM steps of eta 1 and classifier-free
guidance w = 5 (`--cfg-high`, DDPO's and DiffExp's scale for Stable Diffusion). This benchmark asks what the
pretrained model and the quick start's trained LoRA score at other scales: it takes the finished `ddpo` runs of
compare_methods.py (each is `python ddpo_diffexp.py --shapes --seed S`) and evaluates the pretrained model and each
run's final LoRA at every scale of --scales, on the seen and the unseen prompts, under --noise-sets sets of
evaluation noise, with the script's own `evaluate` (benchmarks/evaluation_noise.py's `shapes_evaluator`). Noise set
0 at w = 5 is the run's own evaluation and must reproduce its eval.jsonl (checked). Per scale it reports

  pretrained    the pretrained model's mean reward over the seeds' noise, with its 95% bootstrap interval over seeds;
  DDPO          the same for the runs' final LoRA (trained at w = 5, evaluated at w);
  gain          DDPO - pretrained, paired by seed and noise set: what the training at w = 5 adds at this scale;
  tiers         the pretrained model's reward on the captions of each tier of the world's long tail (shapes_world.py
                PAIR_TIERS: "a <colour> <shape>" and "two <colour> <shape>s" for the 5 common, medium and rare
                pairs), at each scale: whether the model is weak on the rare pairs, or only under strong guidance;
  samplers      the pretrained model's seen reward at each scale with other samplers than the presets' (eta 1,
                10 steps): AlignProp's deterministic DDIM (eta 0, as alignprop_diffexp.py --shapes samples at
                w = 7.5), and eta 1 with 20 and 50 steps: whether the distortion at w = 5 is the guidance's or that
                of few stochastic steps;
  diffusers     the same question asked of diffusers' own StableDiffusionPipeline.__call__ on the world's model
                (its DDIMScheduler, its guidance), independently of the scripts' sampler.

    python benchmarks/guidance.py            (seeds 0-5 of the runs, 2 noise sets, 6 scales: about 17 min)
"""

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: list(range(6)))
    """the runs to evaluate, one per seed (runs-dir/ddpo_q1280_e4_seed<S>)"""
    scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 5.0, 7.5])
    """guidance scales w to evaluate at (the presets' is 5.0)"""
    noise_sets: int = 2
    """evaluations of each model at each scale, each with other noise; the first is the run's own"""
    runs_dir: str = "benchmarks/results/runs"
    """where compare_methods.py put its runs"""
    run_name: str = "ddpo_q1280_e4_seed{seed}"
    """a run's folder name in runs-dir"""
    tier_images_per_prompt: int = 16
    """images per caption of the tier table, under each of the first tier-seeds seeds' evaluation noise"""
    tier_seeds: int = 3
    """how many of the seeds' evaluation noise the tier table uses"""
    sampler_seeds: int = 3
    """how many of the seeds' evaluation noise the 20- and 50-step columns and the diffusers table use (the eta 0
    column uses every seed's)"""
    output: str = "benchmarks/results/guidance/summary.json"
    """where the numbers go; table.md (also printed) goes beside it"""


def main(args):
    from compare_methods import interval, interval_text
    from evaluation_noise import checkpoint_state, require_reproduced, require_runs, shapes_evaluator
    from shapes_world import PAIR_TIERS

    run_dirs = require_runs(args.runs_dir, args.run_name, args.seeds)
    script, script_args, prompt_sets, pretrained, evaluate = shapes_evaluator()
    preset_scale = script_args.cfg_high
    if preset_scale not in args.scales:
        raise SystemExit(f"error: --scales must include the presets' w = {preset_scale} (it checks the runs' logs)")

    # the tier table: the pretrained model only, on single and double objects of each tier's 5 colour-shape pairs
    tier_sets = {}  # e.g. "two rare" -> ["two red triangles", ...]
    for tier, pairs in PAIR_TIERS.items():
        tier_sets[f"one {tier}"] = [f"a {colour} {shape}" for colour, shape in pairs]
        tier_sets[f"two {tier}"] = [f"two {colour} {shape}s" for colour, shape in pairs]
    tier_names = list(tier_sets)
    tier_settings = dict(eval_images_per_prompt=args.tier_images_per_prompt)
    tier_rewards = {}  # (tier set, scale) -> mean over the tier-seeds evaluations
    for scale in args.scales:
        for name, captions in tier_sets.items():
            values = [
                evaluate(pretrained, seed, 0, captions, cfg_high=scale, **tier_settings)
                for seed in args.seeds[: args.tier_seeds]
            ]
            tier_rewards[name, scale] = float(np.mean(values))
        print(f"w {scale:g}: " + ", ".join(f"{name} {tier_rewards[name, scale]:.3f}" for name in tier_names))

    # the pretrained model under other samplers, on the seen prompts: AlignProp's deterministic DDIM (eta 0), and
    # the DDPO family's eta 1 with more steps than the presets' 10
    samplers = {
        "eta 0, 10 steps": (dict(eta=0.0), args.seeds),
        "eta 1, 20 steps": (dict(num_steps=20), args.seeds[: args.sampler_seeds]),
        "eta 1, 50 steps": (dict(num_steps=50), args.seeds[: args.sampler_seeds]),
    }
    sampler_rewards = {}  # (sampler, scale) -> one value per seed, under the seed's own noise
    for sampler, (settings, seeds) in samplers.items():
        for scale in args.scales:
            sampler_rewards[sampler, scale] = [
                evaluate(pretrained, seed, 0, prompt_sets["seen"], cfg_high=scale, **settings) for seed in seeds
            ]
        print(f"{sampler}: " + ", ".join(f"w {w:g} {np.mean(sampler_rewards[sampler, w]):.3f}" for w in args.scales))

    # diffusers' own pipeline on the world's model: the distortion is the model's, not the scripts' sampler's
    from diffusers.utils import logging as diffusers_logging

    from shapes_world import exact_scores
    from worlds import SHAPES_MODEL, load_pipeline

    diffusers_logging.set_verbosity_error()
    pipeline = load_pipeline(SHAPES_MODEL, "cpu", torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    captions = [prompt for prompt in prompt_sets["seen"] for _ in range(script_args.eval_images_per_prompt)]
    diffusers_settings = {  # name -> (steps, eta, w); diffusers' w = 1 turns guidance off (the conditional model)
        "10 steps, eta 1, w 5 (the presets')": (script_args.num_steps, 1.0, preset_scale),
        "10 steps, eta 1, w 1": (script_args.num_steps, 1.0, 1.0),
        "10 steps, eta 0, w 5": (script_args.num_steps, 0.0, preset_scale),
        "50 steps, eta 1, w 5": (50, 1.0, preset_scale),
    }
    diffusers_rewards = {}  # setting -> one value per seed
    for name, (steps, eta, scale) in diffusers_settings.items():
        diffusers_rewards[name] = []
        for seed in args.seeds[: args.sampler_seeds]:
            images = pipeline(
                captions,
                num_inference_steps=steps,
                eta=eta,
                guidance_scale=scale,
                height=script_args.resolution,
                width=script_args.resolution,
                generator=torch.Generator().manual_seed(seed),
                output_type="pt",
            ).images  # (B, 3, H, W) in [0, 1]
            diffusers_rewards[name].append(float(exact_scores(images, captions).mean()))
        print(f"diffusers, {name}: {np.mean(diffusers_rewards[name]):.3f}")

    # rewards[set][model][scale] = one value per seed, each averaged over the noise sets
    rewards = {name: {"pretrained": {}, "ddpo": {}} for name in prompt_sets}
    for seed in args.seeds:
        run_dir = run_dirs[seed]
        with open(os.path.join(run_dir, "eval.jsonl")) as f:
            logged = {line["epoch"]: line for line in map(json.loads, f)}  # epoch -> its evaluation
        state = checkpoint_state(script, run_dir, script_args.epochs)
        for scale in args.scales:
            for name, prompts in prompt_sets.items():
                noise_sets = range(args.noise_sets)
                values = {
                    model: [evaluate(lora, seed, noise_set, prompts, cfg_high=scale) for noise_set in noise_sets]
                    for model, lora in (("pretrained", pretrained), ("ddpo", state["lora"]))
                }
                if scale == preset_scale:  # noise set 0 at the presets' scale is the run's own evaluation
                    expected = (logged[0][f"{name}_reward_mean"], logged[state["epoch"]][f"{name}_reward_mean"])
                    require_reproduced(f"seed {seed}, {name}", (values["pretrained"][0], values["ddpo"][0]), expected)
                for model in values:
                    rewards[name][model].setdefault(scale, []).append(float(np.mean(values[model])))
            print(
                f"seed {seed}, w {scale:g}: seen pretrained {rewards['seen']['pretrained'][scale][-1]:.3f}, "
                f"DDPO {rewards['seen']['ddpo'][scale][-1]:.3f}"
            )

    summary = dict(
        seeds=args.seeds,
        noise_sets=args.noise_sets,
        preset_scale=preset_scale,
        scales={},
        tiers={name: {f"{scale:g}": tier_rewards[name, scale] for scale in args.scales} for name in tier_names},
    )
    lines = [
        f"seeds {args.seeds[0]}-{args.seeds[-1]} ({len(args.seeds)} `ddpo` runs, the quick start of each seed, "
        f"trained at w = {preset_scale:g}); each cell averages {args.noise_sets} evaluations per seed "
        f"({len(prompt_sets['seen'])} seen, {len(prompt_sets['unseen'])} unseen prompts x "
        f"{script_args.eval_images_per_prompt} images each); 95% bootstrap intervals over seeds",
        "",
        "| w | seen: pretrained | seen: DDPO (trained at w = 5) | seen: DDPO - pretrained | unseen: pretrained "
        "| unseen: DDPO | unseen: DDPO - pretrained |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for scale in args.scales:
        row, cells = {}, [f"{scale:g}"]
        for name in prompt_sets:
            start, end = rewards[name]["pretrained"][scale], rewards[name]["ddpo"][scale]
            gain = [e - s for s, e in zip(start, end)]
            row[name] = dict(pretrained=interval(start), ddpo=interval(end), gain=interval(gain))
            cells += [interval_text(start), interval_text(end), interval_text(gain)]
        summary["scales"][f"{scale:g}"] = row
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "The pretrained model's seen reward under other samplers (the presets': eta 1, 10 steps; each seed's own "
        f"noise; the 20- and 50-step columns on the first {min(args.sampler_seeds, len(args.seeds))} seeds):",
        "",
        "| w | " + " | ".join(samplers) + " |",
        "| --- |" + " --- |" * len(samplers),
    ]
    for scale in args.scales:
        lines.append(
            f"| {scale:g} | " + " | ".join(interval_text(sampler_rewards[name, scale]) for name in samplers) + " |"
        )
    summary["samplers"] = {
        name: {f"{scale:g}": interval(sampler_rewards[name, scale]) for scale in args.scales} for name in samplers
    }
    summary["diffusers"] = {name: interval(values) for name, values in diffusers_rewards.items()}
    lines += [
        "",
        f"diffusers' StableDiffusionPipeline on the world's model, seen prompts ({script_args.eval_images_per_prompt} "
        f"images each, generator seeded by each of the first {min(args.sampler_seeds, len(args.seeds))} seeds):",
        "",
        "| setting | seen exact reward |",
        "| --- | --- |",
        *(f"| {name} | {interval_text(values)} |" for name, values in diffusers_rewards.items()),
    ]
    lines += [
        "",
        f"The pretrained model on each tier of the long tail (5 captions each, {args.tier_images_per_prompt} images "
        f"per caption under each of {min(args.tier_seeds, len(args.seeds))} seeds' noise):",
        "",
        "| w | " + " | ".join(tier_names) + " |",
        "| --- |" + " --- |" * len(tier_names),
    ]
    for scale in args.scales:
        lines.append(f"| {scale:g} | " + " | ".join(f"{tier_rewards[name, scale]:.3f}" for name in tier_names) + " |")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(os.path.dirname(args.output) or ".", "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
