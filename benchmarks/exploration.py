"""DiffExp's mechanism, measured at the pretrained shapes model: does exploration draw more rare successes?

DiffExp (arXiv 2502.14070) argues that its two sampling strategies make the training batch more diverse and so
find rare high-reward samples that plain sampling misses (Figs. 6 and 9, and the ablation of Table 3). The end
reward of a training run mixes that with everything the update does; this benchmark measures the sampler alone.
For each variant of ddpo_diffexp.py's training sampler

  plain   CFG w_h = 5 at every step (DDPO);
  eq7     the dynamic scale of Eq. 7: w_l = 1 while t > t_thres = 900, then w_h;
  eq8     the random prompt weighting of Eq. 8: one random word per prompt weighted by w ~ U(1, 1.2);
  eq7+eq8 both (DiffExp),

it draws --images-per-prompt images of every seen prompt (the 20 rare and medium pairs of `--shapes`) from the
same initial noise in every variant (paired), with the script's own helpers (sample_trajectories, Eqs. 7-8,
eta 1, 10 steps: the `--shapes` preset), and reports over --seeds (each seed: other noise, other Eq. 8 draws)

  hit fraction   images that satisfy every attribute of their caption (the shapes_binary reward);
  exact reward   the mean of the graded shapes reward;
  diversity      mean pairwise RMS pixel distance between the images of one prompt, averaged over prompts,

each with a 95% percentile-bootstrap interval over seeds and the paired difference against plain.

    python benchmarks/exploration.py            (about 4 minutes on 2 CPU cores)
"""

import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {"plain": (False, False), "eq7": (True, False), "eq8": (False, True), "eq7+eq8": (True, True)}


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """one draw of noise (and of Eq. 8's words and weights) per seed"""
    images_per_prompt: int = 16
    """images of each seen prompt per variant and seed"""
    batch_size: int = 32
    """images per sampling batch"""
    output: str = "benchmarks/results/exploration/summary.json"
    """where the numbers go; table.md (also printed) goes beside it"""


@torch.no_grad()
def sample_variant(script, pipeline, script_args, prompts, latents, null_embeds, variant, seed, batch_size):
    """Images (N, 3, H, W) of prompts (N) from latents x_T (N, 4, h, w) with the script's training sampler."""
    from common import encode_prompts, guidance_scale_schedule, randomly_weight_prompts

    dynamic_cfg, prompt_weighting = VARIANTS[variant]
    step_scales = guidance_scale_schedule(  # Eq. 7: (T,)
        pipeline.scheduler.timesteps, script_args.cfg_low, script_args.cfg_high, script_args.t_thres, dynamic_cfg
    )
    generator = torch.Generator().manual_seed(seed)  # the Eq. 8 draws and the per-step noise: paired over variants
    images = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = prompts[start : start + batch_size]
        prompt_embeds = encode_prompts(pipeline, batch_prompts, script_args.resolution)  # (B, L, D)
        if prompt_weighting:  # Eq. 8, as ddpo_diffexp.main() section 2
            prompt_embeds = randomly_weight_prompts(
                pipeline, batch_prompts, prompt_embeds, null_embeds, script_args.prompt_weight_range, generator
            )
        guidance_scales = step_scales.expand(len(batch_prompts), -1)  # (B, T)
        step_generator = torch.Generator().manual_seed(seed * 7_919 + start)  # same step noise in every variant
        _, _, batch_images = script.sample_trajectories(
            pipeline,
            pipeline.unet,
            prompt_embeds,
            null_embeds,
            guidance_scales,
            latents[start : start + batch_size],
            script_args.eta,
            step_generator,
        )
        images.append(batch_images)
    return torch.cat(images)


def main(args):
    from diffusers.utils import logging as diffusers_logging

    import ddpo_diffexp as script
    from common import encode_prompts, load_prompts
    from compare_methods import interval, interval_text, mean_pairwise_rms
    from shapes_world import binary_scores, exact_scores
    from worlds import SHAPES_MODEL, load_pipeline

    diffusers_logging.set_verbosity_error()
    script_args = script.parse_args(["--shapes"])
    pipeline = load_pipeline(SHAPES_MODEL, "cpu", torch.float32)
    pipeline.scheduler.set_timesteps(script_args.num_steps)
    null_embeds = encode_prompts(pipeline, [""], script_args.resolution)  # (1, L, D)
    prompts = load_prompts(script_args.prompts)
    jobs = [prompt for prompt in prompts for _ in range(args.images_per_prompt)]  # (N,)
    channels = pipeline.unet.config.in_channels
    side = script_args.resolution // (2 ** (len(pipeline.vae.config.block_out_channels) - 1))
    per_seed = {variant: {"hit": [], "exact": [], "diversity": []} for variant in VARIANTS}
    for seed in args.seeds:
        latents = torch.randn((len(jobs), channels, side, side), generator=torch.Generator().manual_seed(seed))
        for variant in VARIANTS:
            images = sample_variant(
                script, pipeline, script_args, jobs, latents, null_embeds, variant, seed, args.batch_size
            )
            per_seed[variant]["hit"].append(binary_scores(images, jobs).mean().item())
            per_seed[variant]["exact"].append(exact_scores(images, jobs).mean().item())
            by_prompt = images.flatten(1).view(len(prompts), args.images_per_prompt, -1)  # (P, n, 3 * H * W)
            per_seed[variant]["diversity"].append(float(np.mean([mean_pairwise_rms(group) for group in by_prompt])))
        print(f"seed {seed}: " + ", ".join(f"{v} hit {per_seed[v]['hit'][-1]:.3f}" for v in VARIANTS), flush=True)
    summary = {}
    for variant in VARIANTS:
        summary[variant] = {}
        for quantity, values in per_seed[variant].items():
            summary[variant][quantity] = interval(values)
            differences = [a - b for a, b in zip(values, per_seed["plain"][quantity])]
            summary[variant][f"{quantity}_vs_plain"] = interval(differences) if variant != "plain" else None
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(
            dict(
                seeds=args.seeds,
                images_per_prompt=args.images_per_prompt,
                prompts=len(prompts),
                per_seed=per_seed,
                summary=summary,
            ),
            f,
            indent=1,
        )
    lines = [
        f"seeds {' '.join(map(str, args.seeds))}, {args.images_per_prompt} images of each of {len(prompts)} seen "
        "prompts per variant and seed, the pretrained shapes model; 95% bootstrap intervals over seeds",
        "",
        "| sampler | hit fraction | - plain (paired) | exact reward | - plain | diversity | - plain |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, stats in summary.items():
        cells = [interval_text(stats[key]) for key in ("hit", "hit_vs_plain", "exact", "exact_vs_plain")]
        cells += [interval_text(stats[key]) for key in ("diversity", "diversity_vs_plain")]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    with open(os.path.join(os.path.dirname(args.output) or ".", "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main(tyro.cli(Args))
