"""B2-DiffuRL: backward progressive training and branch-based sampling for policy-gradient fine-tuning of SD (LoRA).

Papers
  Towards Better Alignment: Training Diffusion Models with Reinforcement Learning Against Sparse Rewards
    (B2-DiffuRL; Hu, Zhang, Chen, Kuang, Li, Gao, Xiao, Wang, Zhu; CVPR 2025; arXiv 2503.11240)
  Training Diffusion Models with Reinforcement Learning (DDPO; Black et al., ICLR 2024; arXiv 2305.13301)

What it implements
  - The denoising process as an MDP whose policy is one DDIM step with eta = 1 (B2-DiffuRL Eq. 1):
      x0_hat = (x_t - sqrt(1 - abar_t) eps~) / sqrt(abar_t)
      x_{t-1} ~ N(mu, sigma_t^2 I),  mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps~
      sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    with classifier-free guidance inside the policy: eps~ = eps(x_t, t) + w (eps(x_t, t, c) - eps(x_t, t)).
  - Training in stages. Backward progressive training (BPT, Eq. 4): stage s trains only the last tau_s
    denoising steps (the "training interval"), tau_s = split_step(s) growing from 14 of T = 20 steps to all T
    by the last stage.
  - Branch-based sampling (Eq. 5-6): each trajectory runs from x_T to the start of the interval x_tau once,
    is copied there into N = 5 branches that share that prefix exactly, and each branch finishes with its own
    eta = 1 noise. In each branch group, the best branch is kept if its normalised reward z >= 0.5 (G+) and
    the worst if z < -0.5 (G-): 0, 1 or 2 trajectories per group.
  - The gradient of Eq. 4 / Eq. 6 over the interval's steps of the kept trajectories, each weighted by its
    own z, in DDPO's clipped importance-sampling form: loss = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)),
    A = clip(z, -5, 5), eps = 0.1.
  - Ablations (Figure 6): --no-bpt, --no-branch; both together give DDPO (see "Ablation flags" below).
  - Diversity (the paper's second claim): evaluation logs, next to the reward, the mean pairwise distance
    1 - cos(e_i, e_j) between the CLIP image embeddings of the images generated for the same prompt.

Deviations and assumptions (facts the paper leaves to its appendix are taken from the authors' released code)
  1. The schedule: tau_s = first + floor(s * M / E) for E stages and the M = T - first + 1 interval lengths
     first..T, first = round(0.7 T) (--first-interval-fraction). For T = 20, E = 100 this is the released
     code's 14 + floor(s * 7 / 100). When E < M (short runs), the lengths are spread evenly instead,
     first + floor(s * (M - 1) / (E - 1)), so that the last stage always trains all T steps.
  2. Normalisation (Appendix D.1, released code): z = (r - mean_p) / (std_p + 1e-8) with the mean and the
     unbiased std of the prompt's rewards of this stage and of the last 8 stages; a prompt with one reward
     in all of them gets z = 0.
  3. Eq. 5 splits a group by the sign of z; the released code (and this script) keeps the best branch only if
     z >= 0.5 and the worst only if z < -0.5 (--positive-threshold 0 --negative-threshold 0 is the paper's
     text, up to z = 0 exactly). Every kept trajectory gets its own advantage z (the released code's loss),
     not a pairwise loss; the gradient of an update is the mean over its kept trajectories and interval steps.
  4. The number of kept trajectories varies by stage and by process. Every process pads its kept rows, up to
     the largest count, with unkept rows whose advantage is 0 (zero loss, zero gradient), so that all
     processes run the same backward passes (DDP). Optimiser steps (--update-schedule released, the paper
     presets): as the release, one step per --samples-per-update samples counted across both inner epochs (a
     step may straddle them), each micro-batch's loss divided by the window's passes (64 x tau there), and the
     last partial window never stepped: 6 steps for 384-447 kept trajectories. --update-schedule per_inner_epoch
     (ours; --tiny, --shapes) steps each inner epoch's remainder as a smaller update (8 steps for 416), each the
     mean over its kept rows. The release drops an odd trajectory where padding gives it an advantage-0 partner
     here. The logged loss, approx_kl and clipfrac are means over the kept rows of all processes.
  5. The log-probability is the Gaussian log-density averaged over the latent's C*H*W elements (as DDPO's
     code), computed in fp32. Random numbers come from generators seeded by (seed, stage, process), so a
     resumed run draws exactly what an uninterrupted one draws.
  6. Diversity: the paper reports the Inception Score; we log the mean over prompts of the mean pairwise
     cosine distance 1 - cos between CLIP ViT-L/14 image embeddings (a tiny random CLIP on --tiny and --shapes)
     of the eval_images_per_prompt images of each prompt (null if fewer than 2 images per prompt).
  7. Prompt lists: the released train / test lists of the three templates (hu-zijing/B2-DiffuRL, MIT; see
     prompts/README.md) are the named sets b2_template1..3, each evaluated on its _test twin as the unseen set.
     Template 1 is the default. The --tiny preset trains on our own smaller template-2-style list
     (prompts/color_fruit_train.txt, written from Section 4.1 before the released lists were at hand).
  8. reward_queries counts every image, branches included: 1280 per stage, as the released run_process.sh's
     32 batches of 8 prefixes x 5 branches (here, on one process, 128 sampling batches of 2 prefixes x 5).

Ablation flags
  --no-bpt     every stage trains all T steps; branching stays at the first interval's start (step T - tau_0).
  --no-branch  every sample runs from its own noise (no shared prefix) and there is no selection: every sample
               is trained with its own z on the interval's steps ("BPT only" of Figure 6).
  both         every sample, all T steps, its own z: DDPO (with this script's normalisation and hyper-parameters).

Commands
  Paper setting (SD 1.4, T = 20, CLIPScore), template 1 (1 GPU; `accelerate launch --num_processes 4 ...` for 4):
    python b2_diffurl.py --preset b2-template1
  Templates 2 and 3 (each evaluated on its released test list):
    python b2_diffurl.py --preset b2-template2
    python b2_diffurl.py --preset b2-template3
  Tiny CPU run (offline, a few minutes on 2 cores; the plumbing, not a result):
    python b2_diffurl.py --tiny --reward jpeg_compressibility
  Shapes world (offline, a few minutes on 2 cores; what it learns, over seeds: benchmarks/README.md):
    python b2_diffurl.py --shapes
"""

import atexit
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from common import (
    first_line,
    add_lora,
    clip_preprocess,
    disable_library_progress_bars,
    encode_prompts,
    freeze,
    guided_noise_prediction,
    hub_error,
    images_to_pil,
    load_prompts,
    save_lora,
    score_images,
    unseen_twin,
)
from tiny_world import clip_vision_model  # the diversity metric's tiny CLIP tower (--tiny, --shapes)

# hub ids and folders go to common.py's loaders; worlds.py builds the offline names (--model tiny, --tiny,
# the shapes rewards) from tiny_world.py and shapes_world.py
from worlds import SHAPES_MODEL, TINY_MODEL, check_reward_name, check_reward_prompts, load_pipeline, load_reward

DIVERSITY_CLIP = "openai/clip-vit-large-patch14"  # image embeddings for the diversity metric (deviation 6)


@dataclass
class Args:
    # Shared arguments (the same, in the same order, in every script)
    model: str = "CompVis/stable-diffusion-v1-4"
    """hub id or local folder of an SD 1.x or SDXL pipeline (model_index.json names which); "tiny" and "tiny-sdxl"
    build the offline tiny models"""
    tiny: bool = False
    """preset for CPU: tiny model and rewards, 32 px, a few steps, small batches (explicit flags still win)"""
    shapes: bool = False
    """preset for the shapes world on CPU (shapes_world.py): its model, reward and prompts (explicit flags still win)"""
    preset: Optional[str] = None
    """a named experiment's flags, from PRESETS (after main(); --help lists them; explicit flags win)"""
    reward: str = "clipscore"
    """reward to maximise: aesthetic, pickscore, clipscore, imagereward, hpsv2 (v2.0), hpsv2.1,
    jpeg_compressibility, jpeg_incompressibility, shapes, shapes_binary, shapes_learned; or an ensemble, a+b or
    2*a+b: the weighted sum of the members, each normalised by common.REWARD_SCALES, with each member logged"""
    eval_reward: Optional[str] = None
    """reward of the evaluation (default: the training reward); e.g. shapes for a run that optimises shapes_learned"""
    prompts: str = "b2_template1"
    """training prompts: a named set (animals, animal_activities, unseen_animals, unseen_activities,
    b2_template1..3 and their _test lists, drawbench, drawbench_challenging, drawbench_<category>, shapes,
    unseen_shapes; prompts/README.md) or a .txt file with one prompt a line (from the cwd, else from this folder)"""
    eval_unseen_prompts: Optional[str] = None
    """unseen prompt set for evaluation (default: the training set's unseen twin if it has one: a named set's,
    or X_test.txt beside X_train.txt)"""
    run_name: Optional[str] = None
    """folder name under output_dir (default: the script, the preset, the flags that define the run beyond the
    preset's, the process count if > 1 and the seed: ddpo_diffexp_diffexp-fig4a_no-diffexp_seed0)"""
    output_dir: str = "runs"
    """where runs are written"""
    seed: int = 0
    """seed of every random draw"""
    # the paper's stages (sample, reward, select, update); BPT's interval grows over them (deviation 1)
    epochs: int = 100
    """number of epochs (sample, reward, update)"""
    num_steps: int = 20
    """DDIM sampling steps T"""
    eta: float = 1.0
    """DDIM eta: 0 is deterministic DDIM; a policy's log-probability (the DDPO family) needs eta > 0"""
    cfg_high: float = 5.0
    """classifier-free guidance scale w of sampling, in training and in evaluation"""
    resolution: int = 512
    """image height and width in pixels"""
    # every branch counts as a reward query (deviation 8)
    samples_per_epoch: int = 1280
    """images sampled (reward queries) per epoch, over all processes"""
    # whole branch groups: a multiple of --num-branches
    sample_batch_size: int = 10
    """images per sampling batch, per process"""
    train_batch_size: int = 2
    """samples per training forward / backward, per process"""
    # kept samples and padding (deviation 4)
    samples_per_update: int = 128
    """samples whose gradients one optimiser step accumulates, over all processes"""
    learning_rate: float = 1e-4
    """AdamW learning rate"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2)"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping norm"""
    lora_rank: int = 4
    """LoRA rank on the UNet attention projections"""
    mixed_precision: str = "fp16"
    """frozen weights: fp16, bf16 or no (fp32); a CPU runs bf16, and fp16 as fp32; LoRA params are fp32"""
    half_precision_rewards: bool = False
    """reward models in the frozen weights' half precision (AlignProp@a831a5f scored in fp16); by default fp32, as
    DDPO's and CoCA's releases score and the least lossy for a reward's gradient"""
    eval_every: int = 10
    """evaluate before every eval_every-th epoch and after the last"""
    eval_images_per_prompt: int = 10
    """evaluation images per prompt (fixed noise)"""
    save_every: int = 10
    """checkpoint after every save_every-th epoch and after the last"""
    report_to: str = "none"
    """none, tensorboard or wandb: metrics.jsonl's and eval.jsonl's numbers and the evaluation grids, through
    accelerate's trackers (tensorboard writes its event file into the run folder)"""
    resume: bool = False
    """continue runs/<run_name> from its last checkpoint"""
    # Method-specific arguments
    num_branches: int = 5
    """N of Eq. 5: branches per shared prefix, each finishing with its own noise"""
    first_interval_fraction: float = 0.7
    """BPT: the first stage trains the last round(fraction x T) steps (14 of 20 in the paper's code)"""
    no_bpt: bool = False
    """ablation: train all T steps at every stage (branching stays at the first interval's start)"""
    no_branch: bool = False
    """ablation: independent samples and no selection: every sample is trained with its own normalised reward"""
    history_stages: int = 8
    """rewards of this stage and of the last history_stages stages give each prompt's mean / std"""
    positive_threshold: float = 0.5
    """keep a branch group's best sample if its normalised reward z >= this (G+ of Eq. 5)"""
    negative_threshold: float = -0.5
    """keep a branch group's worst sample if its normalised reward z < this (G- of Eq. 5)"""
    clip_range: float = 0.1
    """PPO clip range eps of the importance ratio"""
    advantage_clip: float = 5.0
    """advantages are clipped to [-advantage_clip, advantage_clip]"""
    inner_epochs: int = 2
    """passes of updates over each epoch's kept samples"""
    update_schedule: str = "released"
    """released: one optimiser step per --samples-per-update kept samples, counted across the inner epochs, the
    remainder's gradient dropped (hu-zijing/B2-DiffuRL run_train.py); per_inner_epoch: the remainder of each inner
    epoch is a smaller step of its own (ours, in --tiny and --shapes; deviation 4)"""


# ----------------------------------------------------------------------------------------------------------
# Helpers of 2. Sample
# ----------------------------------------------------------------------------------------------------------


def epoch_seed(seed, epoch, process_index):
    """The seed of one (epoch, process): every draw is a function of --seed, so --resume redraws the same."""
    return (seed * 100_003 + epoch) * 1_009 + process_index


def first_interval_steps(num_steps, fraction):
    """tau_0, the number of last steps the first stage trains: round(fraction T), at least 1 (14 for T = 20)."""
    return min(num_steps, max(1, round(fraction * num_steps)))


def split_step(stage, num_stages, num_steps, first_interval):
    """Eq. 4's tau at `stage`: the number of last denoising steps trained (BPT), first_interval .. T.

    The released code (T = 20, 100 stages, first 14): 14 + floor(stage * 7 / 100), each of the M = 7 lengths
    14..20 for an equal block of stages. With fewer stages than lengths, the lengths are spread evenly; either
    way the last stage trains all T steps (deviation 1).
    """
    lengths = num_steps - first_interval + 1  # M: the interval lengths first_interval, ..., T
    if num_stages >= lengths:
        return first_interval + stage * lengths // num_stages
    if num_stages == 1:
        return num_steps
    return first_interval + stage * (lengths - 1) // (num_stages - 1)


def ddim_step_with_logprob(scheduler, noise_pred, timestep, latents, eta, prev_sample=None, generator=None):
    """One DDIM step x_t -> x_{t-1} of the policy, and log p(x_{t-1} | x_t, c) averaged over C*H*W.

    noise_pred: guided eps~ (B, C, h, w); timestep: t, an int or a (B,) tensor (0..999); latents: x_t (B, C, h, w).
    prev_sample: a given x_{t-1} to score (training); None draws one with `generator` (sampling).
    Returns (x_{t-1} in latents' dtype, log_prob (B,) fp32). Assumes an epsilon-predicting model and a DDIMScheduler
    without sample clipping or thresholding whose final abar is below 1, as SD's own config (set_alpha_to_one=False);
    eta must be > 0. With diffusers' default DDIMScheduler() (set_alpha_to_one=True) or eta = 0, sigma_t is 0 (at the
    last step, or at every step) and the log-density divides by it: NaN.
    """
    device = latents.device
    eps, x_t = noise_pred.float(), latents.float()
    # 1. t and the previous timestep t' = t - 1000 / T, per sample
    timestep = torch.as_tensor(timestep, device=device).long().reshape(-1)  # (B,) or (1,)
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # 2. abar_t and abar_t' (abar_t' = final_alpha_cumprod past the last step: abar_0 for SD 1.x)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)
    alpha_prod_t = alphas_cumprod[timestep].view(-1, 1, 1, 1)
    alpha_prod_prev = torch.where(
        prev_timestep >= 0, alphas_cumprod[prev_timestep.clamp(min=0)], scheduler.final_alpha_cumprod.to(device)
    ).view(-1, 1, 1, 1)
    # 3. predicted clean latent: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (DDIM eq. 12)
    x0_hat = (x_t - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()
    # 4. sigma_t = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')   (DDIM eq. 16)
    variance = (1 - alpha_prod_prev) / (1 - alpha_prod_t) * (1 - alpha_prod_t / alpha_prod_prev)
    std_dev = eta * variance.sqrt()
    # 5. mean: mu = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma_t^2) eps   (DDIM eq. 12)
    mean = alpha_prod_prev.sqrt() * x0_hat + (1 - alpha_prod_prev - std_dev**2).sqrt() * eps
    # 6. x_{t-1} = mu + sigma_t z, rounded to the latents' dtype BEFORE scoring, so training recomputes the same value
    if prev_sample is None:
        noise = torch.randn(x_t.shape, generator=generator, device=generator.device if generator else device).to(device)
        prev_sample = mean + std_dev * noise
    prev_sample = prev_sample.to(latents.dtype)
    # 7. Gaussian log-density, averaged over the C*H*W latent elements (as DDPO's code: a sum's ratio overflows exp())
    log_prob = (
        -((prev_sample.float() - mean) ** 2) / (2 * std_dev**2) - torch.log(std_dev) - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@torch.no_grad()
def sample_trajectories(
    pipeline, unet, prompt_embeds, null_embeds, guidance_scales, latents, eta, generator, branch_step=0, num_branches=1
):
    """Run the policy from x_T to x_0, keeping every latent and log-prob; branch-based sampling (Eq. 5-6).

    prompt_embeds (G, L, D); guidance_scales (G, T), the scale that samples each step; latents x_T (G, 4, h, w).
    The G trajectories run alone for the first `branch_step` steps (the prefix x_T .. x_tau); there each is
    copied into num_branches branches, rows g N .. g N + N - 1, that share the prefix exactly and finish with
    their own noise. num_branches = 1 is plain DDPO sampling.
    Returns the trajectory (G N, T + 1, 4, h, w), log_probs (G N, T) and the decoded images (G N, 3, H, W) in [0, 1].
    """
    scheduler = pipeline.scheduler
    trajectory, log_probs = [latents], []
    for step, t in enumerate(scheduler.timesteps):
        if step == branch_step:  # copy every prefix (latents, log-probs, conditioning) into its N branches
            latents, prompt_embeds, guidance_scales = (
                x.repeat_interleave(num_branches, dim=0) for x in (latents, prompt_embeds, guidance_scales)
            )
            trajectory = [x.repeat_interleave(num_branches, dim=0) for x in trajectory]
            log_probs = [x.repeat_interleave(num_branches, dim=0) for x in log_probs]
        noise_pred = guided_noise_prediction(unet, latents, t, prompt_embeds, null_embeds, guidance_scales[:, step])
        latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta, generator=generator)
        trajectory.append(latents)
        log_probs.append(log_prob)
    images = pipeline.vae.decode(latents.to(pipeline.vae.dtype) / pipeline.vae.config.scaling_factor).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)  # VAE output is in [-1, 1]
    return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1), images


# ----------------------------------------------------------------------------------------------------------
# Helpers of 3. Reward
# ----------------------------------------------------------------------------------------------------------


def score_in_batches(reward_fn, images, prompts, batch_size):
    """(rewards (S,), {member: (S,)}) of images (S, 3, H, W), batch_size at a time (the reward models' memory)."""
    scored = [
        score_images(reward_fn, images[i : i + batch_size], prompts[i : i + batch_size])
        for i in range(0, len(prompts), batch_size)
    ]
    rewards = torch.cat([batch_rewards for batch_rewards, _ in scored])
    return rewards, {name: torch.cat([members[name] for _, members in scored]) for name in scored[0][1]}


def stop_on_non_finite(accelerator, epoch, what, value):
    """A NaN / inf reward, loss, gradient norm or LoRA parameter ends the run here, before the update that made
    it is applied or before it can be checkpointed: the last checkpoint on disk stays the last finite state."""
    if not math.isfinite(value):
        if accelerator.is_main_process:
            print(
                f"error: epoch {epoch}: non-finite {what} ({value}); stopped, the last checkpoint is finite",
                file=sys.stderr,
            )
        raise SystemExit(1)


# ----------------------------------------------------------------------------------------------------------
# Helpers of 4. Advantage and loss
# ----------------------------------------------------------------------------------------------------------


def per_prompt_z_scores(prompts, rewards, history, history_stages):
    """Normalised rewards z = (r - mean_p) / (std_p + 1e-8) over the prompt's rewards of this and recent stages.

    `history` is a list of the past stages' {prompt: [rewards]}, oldest first, updated in place: mean_p and the
    unbiased std_p pool this stage's rewards of prompt p with those of the last `history_stages` stages; then
    this stage is appended and older ones dropped (deviation 2).
    """
    prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
    this_stage = {str(prompt): rewards[prompts == prompt].tolist() for prompt in np.unique(prompts)}
    z_scores = np.empty_like(rewards)
    for prompt, values in this_stage.items():
        pooled = np.array([r for stage in history for r in stage.get(prompt, [])] + values)
        std = pooled.std(ddof=1) if len(pooled) > 1 else 0.0
        z_scores[prompts == prompt] = (rewards[prompts == prompt] - pooled.mean()) / (std + 1e-8)
    history.append(this_stage)
    del history[: max(len(history) - history_stages, 0)]
    return z_scores


def select_branches(z_scores, num_branches, positive_threshold, negative_threshold):
    """Eq. 5: the indices of the kept samples; rows g N .. g N + N - 1 of z_scores (G N,) are branch group g.

    In each group, the best branch is kept if its z >= positive_threshold (it is in G+) and the worst if its
    z < negative_threshold (G-): 0, 1 or 2 samples, which Eq. 6 contrasts.
    """
    kept = []
    for group, scores in enumerate(np.asarray(z_scores).reshape(-1, num_branches)):
        best, worst = int(scores.argmax()), int(scores.argmin())
        if scores[best] >= positive_threshold:
            kept.append(group * num_branches + best)
        if scores[worst] < negative_threshold:
            kept.append(group * num_branches + worst)
    return torch.tensor(kept, dtype=torch.long)


def clipped_policy_loss(log_prob, log_prob_old, advantages, clip_range, advantage_clip):
    """DDPO-IS / PPO clipped surrogate for one timestep of a batch; returns (loss, approx_kl, clipfrac).

    ratio = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c) = exp(log_prob - log_prob_old)
    loss = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))), A = clip(advantage, -advantage_clip, advantage_clip)
    """
    advantages = advantages.clamp(-advantage_clip, advantage_clip)
    ratio = torch.exp(log_prob - log_prob_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    approx_kl = 0.5 * ((log_prob - log_prob_old) ** 2).mean()
    clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, approx_kl.detach(), clipfrac.detach()


# ----------------------------------------------------------------------------------------------------------
# Helpers of 5. Update
# ----------------------------------------------------------------------------------------------------------


def optimizer_step(accelerator, optimizer, lora_parameters, max_grad_norm, epoch, skipped_in_a_row):
    """Clip the accumulated gradient, step and zero it; returns (gradient norm before clipping, skips in a row).

    fp16 on a GPU: accelerate multiplies the loss by a GradScaler's scale S (2^16 at first), so an overflowing
    backward gives a non-finite norm by design. The scaler then skips the step (LoRA and AdamW state unchanged)
    and halves S; the norm is returned as it is, and the epoch counts it in `skipped_steps`. 17 skips in a row
    stop the run: S has gone from 2^16 to 2^-1, and a gradient that overflows even when the loss is scaled DOWN is
    not an overflow of the scaling but a non-finite loss or gradient, which no scale mends.
    Without a scaler (bf16, fp32) a non-finite norm stops the run before the step. A step that leaves a
    non-finite LoRA parameter (an overflowing update, say) stops it before anything can save that parameter.
    """
    grad_norm = float(accelerator.clip_grad_norm_(lora_parameters, max_grad_norm))
    if accelerator.scaler is None:
        stop_on_non_finite(accelerator, epoch, "gradient norm", grad_norm)
    optimizer.step()
    optimizer.zero_grad()
    if accelerator.scaler is not None and optimizer.step_was_skipped:
        skipped_in_a_row += 1
        if skipped_in_a_row >= 17:
            scale = accelerator.scaler.get_scale()
            what = f"gradient norm in {skipped_in_a_row} fp16 steps in a row (loss scale {scale})"
            stop_on_non_finite(accelerator, epoch, what, grad_norm)
        return grad_norm, skipped_in_a_row
    lora_sum = float(sum(parameter.detach().float().sum() for parameter in lora_parameters))
    stop_on_non_finite(accelerator, epoch, "LoRA parameters after the update", lora_sum)
    return grad_norm, 0


def grad_norm_summary(grad_norms):
    """[mean gradient norm of the applied steps (NaN if none was), number of steps the fp16 loss scaler skipped]."""
    applied = [norm for norm in grad_norms if math.isfinite(norm)]  # a skipped step's norm is inf or NaN
    return [float(np.mean(applied)) if applied else math.nan, len(grad_norms) - len(applied)]


def update_ends(micro_batches, inner_epochs, micro_batches_per_update, schedule):
    """The (inner epoch, micro-batch index) pairs after which an optimiser step is taken.

    released: the micro-batches of all inner epochs counted as one sequence, a step after every
    micro_batches_per_update of them, so a step may straddle two inner epochs and the last partial window is never
    stepped (the release's accelerate counter is not reset within a stage). per_inner_epoch: a step after every
    micro_batches_per_update micro-batches of an inner epoch, and after its last one.
    """
    window = micro_batches_per_update
    if schedule == "released":
        return {divmod(end - 1, micro_batches) for end in range(window, inner_epochs * micro_batches + 1, window)}
    ends = {(e, i) for e in range(inner_epochs) for i in range(micro_batches) if (i + 1) % window == 0}
    return ends | {(e, micro_batches - 1) for e in range(inner_epochs)}


def kept_rows_in_update(kept_per_process, micro_index, micro_batches_per_update, micro_batches, batch_size):
    """Kept (not padding) rows, over all processes, of the per_inner_epoch update that micro-batch `micro_index` of an
    inner epoch is in; each process's kept rows come before its padding."""
    update_index = micro_index // micro_batches_per_update
    first = update_index * micro_batches_per_update * batch_size
    last = min((update_index + 1) * micro_batches_per_update, micro_batches) * batch_size
    return sum(min(max(count - first, 0), last - first) for count in kept_per_process)


def kept_row_sums(log_prob, log_prob_old, advantages, is_kept, clip_range, advantage_clip):
    """[loss, approx_kl, clipfrac] summed over the kept rows of one micro-batch's timestep, and the kept rows' count.

    What the logs average: a padding row has no gradient (advantage 0), but its ratio is a real sample's (row 0,
    again), so a mean over all rows would count that sample's approx_kl and clipfrac several times, and the loss's
    zeros of the padding too.
    """
    kept = is_kept.bool().to(log_prob.device)
    if not kept.any():
        return [0.0, 0.0, 0.0, 0]
    count = int(kept.sum())
    with torch.no_grad():
        means = clipped_policy_loss(log_prob[kept], log_prob_old[kept], advantages[kept], clip_range, advantage_clip)
    return [float(mean) * count for mean in means] + [count]


# ----------------------------------------------------------------------------------------------------------
# Helpers of 6. Log, evaluate, checkpoint
# ----------------------------------------------------------------------------------------------------------


def process_means(accelerator, values):
    """The mean over processes of each of this process's numbers `values` (a list of floats)."""
    local = torch.tensor(values, device=accelerator.device)
    return accelerator.gather(local).view(-1, len(values)).mean(0).tolist()


def member_reward_means(accelerator, member_rewards):
    """{"reward_<member>_mean": the mean over every process's samples} of an ensemble's members ({} for one reward)."""
    return {
        f"reward_{name}_mean": float(accelerator.gather(values.detach().float().to(accelerator.device)).mean())
        for name, values in member_rewards.items()
    }


def main(args):
    # ======================================================================================================
    # 1. Setup: processes, models, LoRA, optimiser, resume
    # ======================================================================================================
    run_start = time.time()
    # the flags checked (one error line), the processes started, the run folder found and, on --resume, the state
    # of its last checkpoint ({} on a fresh start): run management, after main()
    accelerator, run_dir, state = start_run(args)
    start_epoch = state.get("epoch", 0)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[accelerator.mixed_precision]
    train_prompts = load_prompts(args.prompts)
    unseen_name = args.eval_unseen_prompts or unseen_twin(args.prompts)
    eval_sets = {"seen": train_prompts} | ({"unseen": load_prompts(unseen_name)} if unseen_name else {})

    pipeline = load_pipeline(args.model, accelerator.device, weight_dtype)
    reward_dtype = weight_dtype if args.half_precision_rewards else torch.float32  # fp32 unless asked
    names = dict.fromkeys([args.reward, args.eval_reward or args.reward])  # the training and evaluation rewards
    rewards = [
        load_reward(name, accelerator.device, reward_dtype, tiny=args.tiny, shapes=args.shapes) for name in names
    ]
    reward_fn, eval_reward_fn = rewards[0], rewards[-1]
    pipeline.scheduler.set_timesteps(args.num_steps, device=accelerator.device)
    timesteps = pipeline.scheduler.timesteps  # (T,): 981, 961, ..., 1 for T = 50; 951, 901, ..., 1 for T = 20
    vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    latent_shape = (pipeline.unet.config.in_channels, args.resolution // vae_scale, args.resolution // vae_scale)
    null_embeds = encode_prompts(pipeline, [""], args.resolution)  # c_null, (1, L, D)

    torch.manual_seed(args.seed)
    lora_parameters = add_lora(pipeline.unet, args.lora_rank)
    optimizer = torch.optim.AdamW(
        lora_parameters, lr=args.learning_rate, betas=args.adam_betas, weight_decay=args.weight_decay
    )
    # the run folder is written only now (a failed load leaves none); on --resume: the LoRA, AdamW, loss scale
    open_run_folder(args, accelerator, run_dir, state, pipeline.unet, optimizer)
    # DDP over the UNet: the LoRA gradients are all-reduced (averaged) across processes at every optimiser step.
    unet, optimizer = accelerator.prepare(pipeline.unet, optimizer)
    samples_per_process = args.samples_per_epoch // accelerator.num_processes
    micro_batches_per_update = args.samples_per_update // (args.train_batch_size * accelerator.num_processes)
    skipped_in_a_row = state.get("skipped_in_a_row", 0)  # optimiser steps the fp16 loss scaler skipped in a row
    bars = dict(disable=not accelerator.is_main_process or None)  # tqdm bars: main process, in a terminal only
    # the evaluation protocol (after main()): eval.jsonl and sample grids at an epoch
    evaluate_at = partial(
        run_evaluation, args, accelerator, pipeline, unet, eval_reward_fn, eval_sets, null_embeds, latent_shape, run_dir
    )

    # Method-specific setup
    # the rewards of the last history_stages stages, per prompt, for the z-scores (deviation 2), restored on resume
    reward_history = state.get("reward_history", [])
    tau_0 = first_interval_steps(args.num_steps, args.first_interval_fraction)  # the first interval: 14 for T = 20
    branches = 1 if args.no_branch else args.num_branches  # copies of each prefix; 1 = independent samples
    # the evaluation also measures diversity (deviation 6), with an image model of its own
    evaluate_at = partial(evaluate_at, load_diversity_model(args, accelerator.device, reward_dtype))

    for epoch in tqdm(range(start_epoch, args.epochs), "epochs", initial=start_epoch, total=args.epochs, **bars):
        epoch_start = time.time()
        # torch's global RNG, for anything not drawn from `generator`
        torch.manual_seed(epoch_seed(args.seed, epoch, accelerator.process_index))
        if epoch % args.eval_every == 0:
            evaluate_at(epoch)

        # ==================================================================================================
        # 2. Sample: branch-based sampling (Eq. 5-6) at the start of this stage's BPT interval (Eq. 4)
        # ==================================================================================================
        # Eq. 4: this stage trains the last K = tau steps, step indices T - K .. T - 1 (all T with --no-bpt)
        trained_steps = args.num_steps if args.no_bpt else split_step(epoch, args.epochs, args.num_steps, tau_0)
        first_trained_step = args.num_steps - trained_steps
        # branches split at x_tau, the interval's start (with --no-bpt: the first stage's interval start)
        branch_step = args.num_steps - tau_0 if args.no_bpt else first_trained_step
        # CPU: same draws on any device
        generator = torch.Generator().manual_seed(epoch_seed(args.seed, epoch, accelerator.process_index))
        unet.eval()
        prompts, batches = [], []
        for _ in tqdm(range(samples_per_process // args.sample_batch_size), "sampling", leave=False, **bars):
            prefixes = args.sample_batch_size // branches  # G trajectories from their own noise, N branches each
            prompt_indices = torch.randint(len(train_prompts), (prefixes,), generator=generator)
            prefix_prompts = [train_prompts[i] for i in prompt_indices]
            prompt_embeds = encode_prompts(pipeline, prefix_prompts, args.resolution)  # c, (G, L, D)
            guidance = torch.full((prefixes, args.num_steps), args.cfg_high)  # w of every step, (G, T)
            noise = torch.randn((prefixes, *latent_shape), generator=generator).to(accelerator.device, weight_dtype)
            trajectory, log_probs, images = sample_trajectories(
                pipeline, unet, prompt_embeds, null_embeds, guidance, noise, args.eta, generator, branch_step, branches
            )
            # rows g N .. g N + N - 1 are the branches of prefix g, each with its prompt (its c and w: below)
            prompts += [prompt for prompt in prefix_prompts for _ in range(branches)]
            # Store exactly what sampled each step (its c and w): training must recompute THAT policy.
            batches.append((prompt_embeds, guidance, trajectory, log_probs, images))
        keys = ("prompt_embeds", "guidance_scales", "trajectory", "log_probs", "images")
        samples = {key: torch.cat(tensors) for key, tensors in zip(keys, zip(*batches))}
        for key in ("prompt_embeds", "guidance_scales"):  # a row per prefix -> a row per branch, as the trajectories
            samples[key] = samples[key].repeat_interleave(branches, dim=0)
        # samples (S = samples_per_process rows, G N a batch): prompt_embeds (S, L, D), guidance_scales (S, T),
        # trajectory (S, T+1, 4, h, w), log_probs (S, T)

        # ==================================================================================================
        # 3. Reward: r(x_0, c) for every sample, gathered from all processes
        # ==================================================================================================
        # (S,), and an ensemble's members {name: (S,)}
        rewards, member_rewards = score_in_batches(reward_fn, samples["images"], prompts, args.sample_batch_size)
        all_rewards = accelerator.gather(rewards.float().to(accelerator.device)).cpu().numpy()  # (samples_per_epoch,)
        all_prompts = [p for part in gather_object([prompts]) for p in part]  # in process order, as all_rewards
        stop_on_non_finite(accelerator, epoch, "reward", float(all_rewards.sum()))

        # ==================================================================================================
        # 4. Advantage and loss: per-prompt z-scores, selection of each branch group's best / worst (Eq. 5)
        # ==================================================================================================
        all_z_scores = per_prompt_z_scores(all_prompts, all_rewards, reward_history, args.history_stages)
        if args.no_branch:  # no groups to compare: every sample is trained with its own z
            all_kept = torch.arange(args.samples_per_epoch)
        else:  # groups never straddle processes (a sampling batch holds whole groups), so global rows work
            all_kept = select_branches(
                all_z_scores, args.num_branches, args.positive_threshold, args.negative_threshold
            )
        # every process computed the same selection; gather order = process order, samples_per_process rows each
        kept_per_process = torch.bincount(all_kept // samples_per_process, minlength=accelerator.num_processes).tolist()
        offset = accelerator.process_index * samples_per_process
        # this process's kept rows, as indices into its own samples
        kept = all_kept[(all_kept >= offset) & (all_kept < offset + samples_per_process)] - offset
        advantages = torch.tensor(all_z_scores, dtype=torch.float32)[offset : offset + samples_per_process]  # (S,)

        # ==================================================================================================
        # 5. Update: DDPO-IS on the kept samples over the interval's steps only (Eq. 4, Eq. 6)
        # ==================================================================================================
        unet.train()
        kept_sums, grad_norms, visited_steps = [0.0, 0.0, 0.0, 0], [], set()  # loss, approx_kl, clipfrac, rows
        micro_batches = math.ceil(max(kept_per_process) / args.train_batch_size)  # the same on every process
        ends = update_ends(micro_batches, args.inner_epochs, micro_batches_per_update, args.update_schedule)
        for inner_epoch in range(args.inner_epochs if micro_batches else 0):  # 0: no group kept a sample (below)
            # this process's kept rows in random order, then padding rows (row 0, advantage 0: no gradient) so that
            # every process runs micro_batches backward passes (deviation 4)
            order = kept[torch.randperm(len(kept), generator=generator)]
            order = torch.cat([order, order.new_zeros(micro_batches * args.train_batch_size - len(order))])
            is_kept = (torch.arange(len(order)) < len(kept)).float()  # (R,)
            # each sample visits the interval's steps T - K .. T - 1 in its own random order: (R, K)
            step_orders = first_trained_step + torch.stack(
                [torch.randperm(trained_steps, generator=generator) for _ in range(len(order))]
            )
            for micro_index in tqdm(range(micro_batches), "training", leave=False, **bars):
                slots = slice(micro_index * args.train_batch_size, (micro_index + 1) * args.train_batch_size)
                rows = order[slots]  # (b,)
                steps = step_orders[slots]  # (b, K)
                x_t = samples["trajectory"][rows[:, None], steps]  # (b, K, 4, h, w)
                x_prev = samples["trajectory"][rows[:, None], steps + 1]  # (b, K, 4, h, w)
                log_prob_old = samples["log_probs"][rows[:, None], steps]  # (b, K)
                scales = samples["guidance_scales"][rows[:, None], steps]  # (b, K)
                prompt_embeds = samples["prompt_embeds"][rows]  # (b, L, D)
                step_timesteps = timesteps[steps.to(timesteps.device)]  # (b, K)
                row_kept = is_kept[slots]  # (b,): 1 for a kept row, 0 for padding
                row_advantages = (advantages[rows] * row_kept).to(accelerator.device)  # A = z, 0 for padding: (b,)
                visited_steps.update(steps.flatten().tolist())
                last_of_update = (inner_epoch, micro_index) in ends
                if args.update_schedule == "released":  # accelerate's division by the window: 64 x tau passes there
                    scale = 1 / (micro_batches_per_update * trained_steps)
                else:  # the mean over the update's kept rows (all processes; DDP averages) and interval steps
                    update_rows = kept_rows_in_update(
                        kept_per_process, micro_index, micro_batches_per_update, micro_batches, args.train_batch_size
                    )
                    scale = args.train_batch_size * accelerator.num_processes / (update_rows * trained_steps)
                # gradients accumulate locally (no_sync) until the update's last micro-batch, all K of whose backward
                # passes run with DDP's all-reduce: each averages the gradient so far over the processes
                with nullcontext() if last_of_update else accelerator.no_sync(unet):
                    for k in range(trained_steps):
                        noise_pred = guided_noise_prediction(
                            unet, x_t[:, k], step_timesteps[:, k], prompt_embeds, null_embeds, scales[:, k]
                        )
                        _, log_prob = ddim_step_with_logprob(
                            pipeline.scheduler, noise_pred, step_timesteps[:, k], x_t[:, k], args.eta, x_prev[:, k]
                        )
                        loss, _, _ = clipped_policy_loss(
                            log_prob, log_prob_old[:, k], row_advantages, args.clip_range, args.advantage_clip
                        )
                        accelerator.backward(loss * scale)
                        step_sums = kept_row_sums(
                            log_prob, log_prob_old[:, k], row_advantages, row_kept, args.clip_range, args.advantage_clip
                        )
                        kept_sums = [total + value for total, value in zip(kept_sums, step_sums)]
                if last_of_update:
                    grad_norm, skipped_in_a_row = optimizer_step(
                        accelerator, optimizer, lora_parameters, args.max_grad_norm, epoch, skipped_in_a_row
                    )
                    grad_norms.append(grad_norm)
        optimizer.zero_grad()  # released: the last partial window's gradient is never stepped, as in the release
        grad_norms = grad_norms or [0.0]  # no update: nothing kept on any process (every z within the thresholds)

        # ==================================================================================================
        # 6. Log, evaluate, checkpoint
        # ==================================================================================================
        *kept_sums, kept_count, grad_norm_mean, skipped_steps = process_means(
            accelerator, [*kept_sums, *grad_norm_summary(grad_norms)]
        )
        # loss, approx_kl and clipfrac: means over the kept (row, step) pairs of all processes (0 if none)
        loss_mean, approx_kl_mean, clipfrac_mean = [total / (kept_count or 1) for total in kept_sums]
        stop_on_non_finite(accelerator, epoch, "loss", loss_mean)
        metrics = dict(
            epoch=epoch,
            reward_queries=(epoch + 1) * args.samples_per_epoch,
            reward_mean=float(all_rewards.mean()),
            reward_std=float(all_rewards.std()),
            **member_reward_means(accelerator, member_rewards),
            loss=loss_mean,
            approx_kl=approx_kl_mean,
            clipfrac=clipfrac_mean,
            grad_norm=grad_norm_mean,
            skipped_steps=round(skipped_steps),
            interval_steps=trained_steps,
            branch_step=branch_step if branches > 1 else None,
            kept_samples=len(all_kept),
            trained_step_indices=sorted(visited_steps),
            seconds=round(time.time() - epoch_start, 3),
        )
        line = f"epoch {epoch}: reward {metrics['reward_mean']:.4g} +- {metrics['reward_std']:.3g}, interval "
        line += f"{trained_steps}, kept {len(all_kept)}, loss {loss_mean:.3g}, kl {approx_kl_mean:.2e}, "
        log_epoch(accelerator, run_dir, metrics, lora_parameters, line + f"clipfrac {clipfrac_mean:.2f}")
        if epoch + 1 == args.epochs:
            evaluate_at(epoch + 1)
        method_state = dict(reward_history=reward_history, skipped_in_a_row=skipped_in_a_row)  # what --resume needs
        save_checkpoint(args, accelerator, run_dir, epoch, unet, optimizer, **method_state)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(run_summary(run_dir, time.time() - run_start))


# ==========================================================================================================
# Evaluation (B2-DiffuRL Sec. 4): fixed noise, plain CFG w, no branching; the mean reward and the diversity
# ==========================================================================================================


def run_evaluation(
    args, accelerator, pipeline, unet, reward_fn, eval_sets, null_embeds, latent_shape, run_dir, diversity_model, epoch
):
    """Evaluate on the seen and unseen sets; append a line to eval.jsonl and save a grid of the first images."""
    unet.eval()
    line = dict(epoch=epoch, reward_queries=epoch * args.samples_per_epoch, eval_reward=args.eval_reward or args.reward)
    grids = {}
    for name, prompts in eval_sets.items():
        mean, std, diversity, member_means, grid = evaluate(
            args, accelerator, pipeline, unet, reward_fn, diversity_model, prompts, null_embeds, latent_shape
        )
        line[f"{name}_reward_mean"], line[f"{name}_reward_std"], line[f"{name}_diversity"] = mean, std, diversity
        line[f"{name}_images"] = len(prompts) * args.eval_images_per_prompt
        line |= {f"{name}_reward_{member}_mean": value for member, value in member_means.items()}
        if accelerator.is_main_process:
            grid_path = os.path.join(run_dir, "samples", f"eval_{name}_epoch_{epoch:04d}.png")
            grids[f"eval/{name}_grid"] = save_image_grid(grid_path, grid[:32])
    if accelerator.is_main_process:
        append_jsonl(os.path.join(run_dir, "eval.jsonl"), line)
        report(accelerator, {f"eval/{key}": value for key, value in line.items()}, epoch, grids)
        tqdm.write("eval " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()))


@torch.no_grad()
def evaluate(args, accelerator, pipeline, unet, reward_fn, diversity_model, prompts, null_embeds, latent_shape):
    """Evaluation protocol: eval_images_per_prompt images per prompt from fixed noise, plain CFG w, no branching.

    The jobs (prompt, image index) are split over processes; every job's noise depends only on its index, so
    the numbers do not depend on the number of processes. Returns (mean, std, diversity, member means, first
    images): diversity is the mean over prompts of mean_pairwise_distance of the prompt's CLIP image embeddings,
    member means the mean of each ensemble member's reward ({} for a single reward).
    """
    jobs = [prompt for prompt in prompts for _ in range(args.eval_images_per_prompt)]
    batch_size = args.sample_batch_size
    batches = [list(range(start, min(start + batch_size, len(jobs)))) for start in range(0, len(jobs), batch_size)]
    rewards, members, embeddings, images_kept = {}, {}, {}, {}
    for batch_index in range(accelerator.process_index, len(batches), accelerator.num_processes):
        indices = batches[batch_index]
        batch_prompts = [jobs[i] for i in indices]
        generator = torch.Generator().manual_seed(10_000_019 + args.seed * 1_009 + batch_index)  # fixed across evals
        latents = torch.randn((len(indices), *latent_shape), generator=generator).to(
            accelerator.device, pipeline.unet.dtype
        )
        prompt_embeds = encode_prompts(pipeline, batch_prompts, args.resolution)
        guidance_scales = torch.full((len(indices), args.num_steps), args.cfg_high)
        _, _, images = sample_trajectories(
            pipeline, unet, prompt_embeds, null_embeds, guidance_scales, latents, args.eta, generator
        )
        batch_rewards, batch_members = score_images(reward_fn, images, batch_prompts)  # (B,), {member: (B,)}
        pixels = clip_preprocess(images).to(diversity_model.dtype)  # CLIP's 224 px, normalised
        batch_embeddings = diversity_model(pixel_values=pixels).image_embeds.float().cpu()  # (B, D)
        for position, job in enumerate(indices):
            rewards[job], embeddings[job] = batch_rewards[position].item(), batch_embeddings[position]
            members[job] = {name: values[position].item() for name, values in batch_members.items()}
            if job % args.eval_images_per_prompt == 0:  # keep the first image of every prompt for the grid
                images_kept[job] = images[position].cpu()
    all_rewards, all_members, all_embeddings, all_images = (
        {job: value for part in gather_object([results]) for job, value in part.items()}
        for results in (rewards, members, embeddings, images_kept)
    )
    values = np.array([all_rewards[i] for i in range(len(jobs))])
    # an ensemble's members, each a mean over every image ({} for a single reward)
    member_means = {name: float(np.mean([all_members[i][name] for i in range(len(jobs))])) for name in all_members[0]}
    per_prompt = torch.stack([all_embeddings[i] for i in range(len(jobs))]).unflatten(0, (len(prompts), -1))
    diversity = (
        float(np.mean([mean_pairwise_distance(e) for e in per_prompt])) if args.eval_images_per_prompt > 1 else None
    )
    grid = [(jobs[i], all_rewards[i], all_images[i]) for i in sorted(all_images)]
    return float(values.mean()), float(values.std()), diversity, member_means, grid


def load_diversity_model(args, device, dtype):
    """CLIP ViT-L/14 image tower with projection for the diversity metric; offline (--tiny, --shapes) a tiny one."""
    from transformers import CLIPVisionModelWithProjection

    if args.tiny or args.shapes:
        model = clip_vision_model(projection_dim=32, seed=3)  # tiny_world.py: the same random weights every run
    else:
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(DIVERSITY_CLIP)
        except Exception as exception:
            raise hub_error(DIVERSITY_CLIP, exception)
    return freeze(model, device, dtype)


def mean_pairwise_distance(embeddings):
    """Diversity of one prompt's M >= 2 images: mean over the pairs i < j of 1 - cos(e_i, e_j); embeddings (M, D)."""
    unit = F.normalize(embeddings.float(), dim=-1)
    first, second = torch.triu_indices(len(unit), len(unit), offset=1)
    return float((1 - (unit[first] * unit[second]).sum(-1)).mean())


def caption_lines(draw, text, width):
    """`text` in lines no wider than `width` pixels in `draw`'s font, broken at spaces; a word wider than a line
    is broken where it reaches the edge. PIL's default font is proportional: about 23 characters fit in 124 px."""
    lines = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] += f" {word}"
            continue
        lines.append("")
        for character in word:
            if lines[-1] and draw.textlength(lines[-1] + character) > width:
                lines.append("")
            lines[-1] += character
    return lines or [""]


def save_image_grid(path, entries, columns=8, cell=128):
    """PNG grid of (prompt, reward, image (3, H, W) in [0, 1]) with each image's prompt and reward under it; returns
    the grid (a PIL RGB image). A prompt takes as many lines as it needs (a two-object prompt keeps its second
    object): every caption is as tall as the grid's longest."""
    line_height = 11
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))  # for measuring text in the default font
    captions = [caption_lines(draw, prompt, cell - 4) for prompt, _, _ in entries]
    caption_height = line_height * (max(map(len, captions), default=1) + 1) + 2  # the prompt's lines and the reward
    rows = math.ceil(len(entries) / columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for index, ((prompt, reward, image), lines) in enumerate(zip(entries, captions)):
        x, y = (index % columns) * cell, (index // columns) * (cell + caption_height)
        grid.paste(images_to_pil(image[None])[0].resize((cell, cell), Image.NEAREST), (x, y))
        for number, line in enumerate([*lines, f"{reward:.4g}"]):
            draw.text((x + 2, y + cell + 1 + number * line_height), line, fill="black")
    grid.save(path)
    return grid


# ==========================================================================================================
# Run management: presets, flag checks, the run folder, resume, logs, checkpoints. Not the method: a first
# reading can stop here. After this script's PRESETS and flag rules, it is the same text in every script.
# ==========================================================================================================

# Named presets (--preset NAME; --tiny and --shapes name the first two): each sets the flags of one experiment,
# and every value says where it comes from (PRESETS.md: each with its source). Flags on the command line win.
PRESETS = {
    # ours: everything small enough for 2 CPU cores (the tiny world, tiny_world.py), the plumbing a user runs first
    "tiny": dict(
        model=TINY_MODEL,
        tiny=True,
        epochs=6,
        num_steps=8,
        resolution=32,
        samples_per_epoch=32,
        sample_batch_size=16,
        train_batch_size=4,  # divides samples_per_update over 2 processes too
        samples_per_update=8,
        learning_rate=1e-2,  # as DDPO's --tiny; 3e-3 barely moved in 6 stages of 32 images (benchmarks/README.md)
        mixed_precision="no",
        eval_every=3,
        eval_images_per_prompt=2,
        save_every=3,
        num_branches=4,
        prompts="prompts/color_fruit_train.txt",  # ours (deviation 7): 55 eval prompts, not 135
        update_schedule="per_inner_epoch",  # ours: a 6-stage run of 32 images keeps too few samples to drop any
    ),
    # ours: the shapes world (python shapes_world.py trains it; its weights are committed in world/)
    "shapes": dict(
        model=SHAPES_MODEL,
        shapes=True,
        reward="shapes",
        prompts="shapes",
        epochs=20,
        num_steps=10,
        resolution=32,
        samples_per_epoch=64,
        sample_batch_size=32,
        train_batch_size=8,  # divides samples_per_update over 2 processes too
        samples_per_update=16,
        learning_rate=3e-3,  # 1e-2 (DDPO's old value) with B2's clip 0.1: stage-0 KL 4-77, then collapse
        mixed_precision="no",
        eval_every=5,
        eval_images_per_prompt=4,
        save_every=10,
        num_branches=4,
        update_schedule="per_inner_epoch",  # ours, as --tiny (the committed shapes benchmarks ran with it)
    ),
    # B2-DiffuRL's three prompt templates (Sec. 4.1) on their released train / test lists; the defaults are the
    # paper's setting (SD 1.4, T = 20, CLIPScore; the schedule and normalisation from its released code, deviations
    # 1-3)
    "b2-template1": dict(prompts="b2_template1"),  # "a(n) [animal] [activity]"
    "b2-template2": dict(prompts="b2_template2"),  # "[color] [fruit/vegetable]"
    "b2-template3": dict(prompts="b2_template3"),  # "[object] [spatial relation] [object]"
}


METHOD_COUNTS = ("inner_epochs",)  # each must be >= 1


def flag_rules(args, processes):
    """(field, holds, what its value must be) for this script's flags; the shared ones hold (no batch size is 0)."""
    positive, schedules = args.positive_threshold, ("released", "per_inner_epoch")
    # without --no-branch: N >= 2 branches to compare, and a sampling batch of whole branch groups
    branching = [("num_branches", args.num_branches >= 2, "must be >= 2 to compare branches (or pass --no-branch)")]
    branching += [multiple(args, "sample_batch_size", "num_branches")] if args.num_branches >= 2 else []
    return [
        ("eta", args.eta > 0, "must be > 0: the policy's log-probability needs sigma_t > 0"),
        ("update_schedule", args.update_schedule in schedules, "must be released or per_inner_epoch"),
        ("first_interval_fraction", 0 < args.first_interval_fraction <= 1, "must be in (0, 1]"),
        ("negative_threshold", args.negative_threshold <= positive, f"must not exceed --positive-threshold {positive}"),
        *[(name, holds or args.no_branch, must) for name, holds, must in branching],
        multiple(args, "samples_per_epoch", "sample_batch_size", processes),
        ("history_stages", args.history_stages >= 0, "must be >= 0"),
        ("clip_range", args.clip_range > 0, "must be > 0"),
        ("advantage_clip", args.advantage_clip > 0, "must be > 0"),
    ]


# ---------------------------------------------------------------------------------------- the same in every script
COUNTS = ("epochs", "num_steps", "samples_per_epoch", "sample_batch_size", "train_batch_size", "samples_per_update")
COUNTS += ("eval_every", "save_every", "eval_images_per_prompt", "lora_rank")  # each must be >= 1
# flags that may change on --resume: how often a run evaluates, saves and reports, and where it is. Every other flag
# defines the experiment (--epochs too: DiffExp's exploring 3/4 and B2-DiffuRL's stages follow it).
SAFE_TO_CHANGE_ON_RESUME = ("eval_every", "save_every", "report_to", "resume", "output_dir", "run_name")


def parse_args(argv=None):
    """The flags on top of the defaults, or of the named preset (--preset NAME, --tiny, --shapes) if one is given."""
    argv = sys.argv[1:] if argv is None else argv
    chosen = [word[2:] for word in argv if word in ("--tiny", "--shapes")]
    chosen += [value for word, value in zip(argv, argv[1:]) if word == "--preset"]
    chosen += [word.split("=", 1)[1] for word in argv if word.startswith("--preset=")]
    if len(set(chosen)) > 1:
        raise SystemExit(f"error: {' and '.join(sorted(set(chosen)))} are two presets; give one")
    if chosen and chosen[0] not in PRESETS:
        raise SystemExit(f"error: unknown preset '{chosen[0]}'; choose one of {', '.join(PRESETS)}")
    defaults = replace(Args(**PRESETS[chosen[0]]), preset=chosen[0]) if chosen else Args()
    description = f"{__doc__.splitlines()[0]}\n\nPresets (--preset NAME): {', '.join(PRESETS)}."
    args = tyro.cli(Args, default=defaults, args=argv, description=description)
    if getattr(args, "diffexp", False):  # a script with --diffexp: both strategies become defaults, under the
        defaults = replace(defaults, dynamic_cfg=True, prompt_weighting=True)  # flags (--no-dynamic-cfg still wins)
        args = tyro.cli(Args, default=defaults, args=argv, description=description)
    return args


def flag(name):
    """The command-line spelling of an Args field: samples_per_epoch -> --samples-per-epoch."""
    return "--" + name.replace("_", "-")


def multiple(args, name, divisor_name, processes=1):
    """The rule that args.<name> is a multiple of args.<divisor_name> x processes, its arithmetic spelled out."""
    value, divisor = getattr(args, name), getattr(args, divisor_name) * processes
    per = f" x {processes} processes = {divisor}" if processes > 1 else ""
    why = f"is not a multiple of {flag(divisor_name)} {divisor // processes}{per}"
    return name, value % divisor == 0, f"{why} ({value} = {value // divisor} x {divisor} + {value % divisor})"


def check_args(args, processes):
    """One line and exit for bad input, before any model loads. Rewards and prompt files stop at once, each with its
    own line; then every number must be finite and every count >= 1 (the other rules divide by them); then the rules
    of every script, here, and this script's, flag_rules above: (field, holds, what its value must be) each."""
    for reward in (args.reward, args.eval_reward or args.reward):
        check_reward_name(reward)
    prompts = load_prompts(args.prompts) + (load_prompts(args.eval_unseen_prompts) if args.eval_unseen_prompts else [])
    for reward in (args.reward, args.eval_reward or args.reward):
        check_reward_prompts(reward, prompts)

    def broken(rules):  # each broken rule as a message: --adam-betas 0.9 1.0 must both be in [0, 1)
        shown = {n: " ".join(map(str, v)) if isinstance(v, tuple) else v for n, v in asdict(args).items()}
        return [f"{flag(name)} {shown[name]} {must}" for name, holds, must in rules if not holds]

    numbers = {n: v if isinstance(v, tuple) else (v,) for n, v in asdict(args).items() if isinstance(v, (float, tuple))}
    problems = broken([(name, all(map(math.isfinite, values)), "must be finite") for name, values in numbers.items()])
    problems += broken([(name, getattr(args, name) >= 1, "must be >= 1") for name in COUNTS + METHOD_COUNTS])
    tracker = args.report_to not in ("tensorboard", "wandb") or importlib.util.find_spec(args.report_to) is not None
    problems = problems or broken(
        [
            ("seed", args.seed >= 0, "must be >= 0"),
            ("eta", args.eta >= 0, "must be >= 0"),
            ("resolution", args.resolution % 8 == 0, "must be a multiple of 8"),
            ("mixed_precision", args.mixed_precision in ("fp16", "bf16", "no"), "must be fp16, bf16 or no"),
            ("report_to", args.report_to in ("none", "tensorboard", "wandb"), "must be none, tensorboard or wandb"),
            ("report_to", tracker, f"needs the {args.report_to} package: pip install {args.report_to}"),
            ("learning_rate", args.learning_rate > 0, "must be > 0"),
            ("adam_betas", all(0 <= beta < 1 for beta in args.adam_betas), "must both be in [0, 1)"),
            ("weight_decay", args.weight_decay >= 0, "must be >= 0"),
            ("max_grad_norm", args.max_grad_norm > 0, "must be > 0 (the norm the gradient is clipped to)"),
            multiple(args, "samples_per_update", "train_batch_size", processes),
            *flag_rules(args, processes),
        ]
    )
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


def default_run_name(args, processes):
    """The run folder's name without --run-name: the script, the preset, the flags that define the run beyond the
    preset's (not those the others imply: --diffexp --dynamic-cfg is --diffexp), the process count if > 1 and the
    seed, e.g. ddpo_diffexp_diffexp-fig4a_no-diffexp_seed0. Over 100 characters, it ends with a hash of the whole."""

    def words(name):  # a flag as typed: --diffexp, --no-diffexp, --model tiny, --adam-betas 0.9 0.999
        value = getattr(args, name)
        if isinstance(value, bool):
            return [flag(name) if value else "--no-" + flag(name)[2:]]
        return [flag(name), *map(str, value if isinstance(value, tuple) else [value])]

    preset = ["--preset", args.preset] if args.preset else []
    defining = [f.name for f in fields(args) if f.name not in (*SAFE_TO_CHANGE_ON_RESUME, "preset", "seed")]

    def differences(names):  # the defining fields in which `--preset P --<name> <value> ...` still differs from args
        again = parse_args(preset + [word for name in names for word in words(name)])
        return [name for name in defining if getattr(again, name) != getattr(args, name)]

    changed = []  # grown by the first defining flag still different: the flags the preset and they imply are left out
    while missing := differences(changed):
        changed = [name for name in defining if name in (*changed, missing[0])]
    parts = [os.path.splitext(os.path.basename(__file__))[0], *preset[1:]]
    parts += [words(n)[0][2:] if len(words(n)) == 1 else f"{flag(n)[2:]}={'-'.join(words(n)[1:])}" for n in changed]
    parts += [f"{processes}processes"] if processes > 1 else []
    body = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts).replace("*", "x"))  # 2*a+b: 2xa+b; a/b: a-b
    if len(name := f"{body}_seed{args.seed}") > 100:
        tail = f"_{hashlib.sha1(name.encode()).hexdigest()[:8]}_seed{args.seed}"
        name = body[: 100 - len(tail)] + tail
    return name


def start_run(args):
    """Check the flags, start the processes, find the run folder and, on --resume, read its last checkpoint. Returns
    (accelerator, run_dir, state), state being the checkpoint's ({} on a fresh start). The folder is only read here:
    a start that fails later (a bad model id, no network) writes nothing. A finished run exits at once."""
    processes = int(os.environ.get("WORLD_SIZE", 1))  # set in each process by the launchers (torchrun)
    check_args(args, processes)  # before Accelerator(...), which meets `--report-to tensorbaord` with a traceback
    on_gpu = torch.cuda.is_available()  # else cpu=True: several processes over gloo; bf16 runs there, fp16 is fp32
    precision = args.mixed_precision if on_gpu or args.mixed_precision == "bf16" else "no"
    log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(mixed_precision=precision, cpu=not on_gpu, log_with=log_with, project_dir=args.output_dir)
    if accelerator.num_processes != processes:  # mpirun counts its processes in its own variables (PMI_SIZE)
        check_args(args, accelerator.num_processes)
    if not (accelerator.is_main_process and sys.stderr.isatty()):  # in a log file every redraw of a bar stays
        disable_library_progress_bars()
    run_dir = os.path.join(args.output_dir, args.run_name or default_run_name(args, accelerator.num_processes))
    folder, state = load_last_checkpoint(run_dir, accelerator) if args.resume else (None, {})
    if args.resume:
        check_resume(args, run_dir, folder)
        if state["epoch"] >= args.epochs:  # a finished run resumes as a no-op and changes no file
            accelerator.print(f"{run_dir} is complete ({state['epoch']} of {args.epochs} epochs); nothing to do")
            raise SystemExit  # exit code 0
        accelerator.print(f"resuming from {folder} at epoch {state['epoch']}")
    return accelerator, run_dir, state


def checkpoint_folders(run_dir):
    """The run's complete checkpoint folders, oldest first (a `.tmp` folder is a write that did not finish)."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith("epoch_")) if os.path.isdir(folder) else []
    return [os.path.join(folder, name) for name in names if not name.endswith(".tmp")]


def load_last_checkpoint(run_dir, accelerator):
    """(folder, training state) of the newest checkpoint that loads, or (None, {}): one that does not (a truncated
    or corrupt file) is skipped, with a warning, for the one before it."""
    from safetensors.torch import load_file

    for folder in reversed(checkpoint_folders(run_dir)):
        try:
            state = torch.load(os.path.join(folder, "training_state.pt"), map_location="cpu", weights_only=False)
            load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))  # what load_lora_weights reads
            return folder, state
        except Exception as error:  # EOFError, UnpicklingError, RuntimeError, SafetensorError, OSError
            accelerator.print(f"warning: checkpoint {folder} does not load ({first_line(error)}); trying an older one")
    return None, {}


def check_resume(args, run_dir, checkpoint):
    """--resume needs a checkpoint, and the flags that define the run must be the ones it was started with."""
    if checkpoint is None:
        raise SystemExit(f"error: --resume: no checkpoint that loads in {run_dir}")
    try:
        with open(os.path.join(run_dir, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: --resume: cannot read {run_dir}/args.json ({error}), the flags the run started with")
    given = json.loads(json.dumps(asdict(args)))  # tuples as lists, as they were saved
    names = sorted((set(saved) | set(given)) - set(SAFE_TO_CHANGE_ON_RESUME))
    changed = [f"{flag(n)} {given.get(n)} (was {saved.get(n)})" for n in names if saved.get(n) != given.get(n)]
    safe = ", ".join(map(flag, SAFE_TO_CHANGE_ON_RESUME[:3]))
    if changed:
        raise SystemExit(
            f"error: --resume with other flags than {run_dir}: {'; '.join(changed)} (only {safe} may change)"
        )


def open_run_folder(args, accelerator, run_dir, state, unet, optimizer):
    """Once the models have loaded: refuse a folder with checkpoints unless --resume, lock it, drop the log lines of
    the epochs this run redoes (all, on a fresh start), write args.json, start the --report-to trackers and, on
    --resume, load the checkpoint's LoRA weights, AdamW moments and fp16 loss scale."""
    from peft.utils import set_peft_model_state_dict

    if not args.resume and checkpoint_folders(run_dir):
        raise SystemExit(f"error: {run_dir} has checkpoints; pass --resume to continue it or choose another --run-name")
    accelerator.wait_for_everyone()  # every process has checked the folder and loaded its models
    if accelerator.is_main_process:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        lock_run(os.path.join(run_dir, "run.lock"))
        for path in (os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "eval.jsonl")):
            lines = open(path).readlines() if os.path.exists(path) else []
            with open(path, "w") as f:
                f.writelines(line for line in lines if json.loads(line)["epoch"] < state.get("epoch", 0))
        if not args.resume:
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump(asdict(args), f, indent=2)
    if args.report_to != "none":  # tensorboard writes into runs/<run_name>/; wandb logs run <run_name> of <script>
        name, script = os.path.basename(run_dir), os.path.splitext(os.path.basename(__file__))[0]
        project = name if args.report_to == "tensorboard" else script
        accelerator.init_trackers(project, init_kwargs={"wandb": {"config": asdict(args), "name": name}})
    if "lora" in state:
        set_peft_model_state_dict(unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])


def lock_run(path):
    """Hold an exclusive lock on `path` (which holds this pid) while this process lives: a second run of the folder
    stops in one line; a run killed with -9 leaves no lock behind."""
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise SystemExit(
            f"error: {path} is held by process {lock.read().strip()}, which is running this folder already"
        )
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    atexit.register(lock.close)  # keeps the file open, and so locked, until this process exits


def append_jsonl(path, record):
    """Append `record` as one line of JSON; a NaN or infinite number is written as null (bare NaN is not JSON)."""
    with open(path, "a") as f:
        f.write(json.dumps(json.loads(json.dumps(record), parse_constant=lambda nan_or_infinity: None)) + "\n")


def report(accelerator, values, step, grids=None):
    """Send the finite numbers of `values` (and the PIL images of `grids`, {tag: image}) to the --report-to trackers
    at `step` (the epoch); the .jsonl files stay the record."""
    numbers = {key: value for key, value in values.items() if isinstance(value, (int, float)) and math.isfinite(value)}
    accelerator.log(numbers, step=step)  # nothing without a tracker
    for tracker in accelerator.trackers:
        for tag, grid in (grids or {}).items():
            options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({tag: np.asarray(grid)[None]}, step=step, **options)  # (1, H, W, 3) uint8


def log_epoch(accelerator, run_dir, metrics, lora_parameters, line):
    """The epoch's metrics to metrics.jsonl and the trackers, and `line` to the terminal. With several processes,
    each one's LoRA sum too: every replica must hold the same LoRA after the all-reduced updates."""
    if accelerator.num_processes > 1:
        lora_sum = torch.stack([p.detach().double().sum() for p in lora_parameters]).sum()[None]
        metrics["lora_sum_per_process"] = accelerator.gather(lora_sum).tolist()
    if accelerator.is_main_process:
        append_jsonl(os.path.join(run_dir, "metrics.jsonl"), metrics)
        report(accelerator, {f"train/{key}": value for key, value in metrics.items()}, metrics["epoch"])
        tqdm.write(line)


def save_checkpoint(args, accelerator, run_dir, epoch, unet, optimizer, **state):
    """After every save_every-th epoch and the last, checkpoints/epoch_<N>: the LoRA in diffusers' format (for
    load_lora_weights) and all that --resume needs. It is written as <folder>.tmp and renamed: a crash or a full disk
    leaves the previous checkpoint whole and no partial folder behind."""
    from peft.utils import get_peft_model_state_dict

    if (epoch + 1) % args.save_every and epoch + 1 != args.epochs:
        return
    if accelerator.is_main_process:
        folder = os.path.join(run_dir, "checkpoints", f"epoch_{epoch + 1:04d}")
        unet = accelerator.unwrap_model(unet)
        state = dict(state, epoch=epoch + 1, lora=get_peft_model_state_dict(unet), optimizer=optimizer.state_dict())
        if accelerator.scaler is not None:  # fp16's loss scale: a resumed run must not restart it at 2^16
            state["scaler"] = accelerator.scaler.state_dict()
        shutil.rmtree(folder + ".tmp", ignore_errors=True)
        try:
            os.makedirs(folder + ".tmp")
            save_lora(unet, folder + ".tmp")
            torch.save(state, os.path.join(folder + ".tmp", "training_state.pt"))
            shutil.rmtree(folder, ignore_errors=True)  # one that did not load, which this run redid
            os.replace(folder + ".tmp", folder)
        except OSError as error:  # ENOSPC (disk full), EDQUOT, EIO, ...
            shutil.rmtree(folder + ".tmp", ignore_errors=True)
            why = f"error: cannot write {folder} ({error.strerror or error})"
            print(f"{why}; the previous checkpoint is intact", file=sys.stderr)
            raise SystemExit(1)
    accelerator.wait_for_everyone()


def run_summary(run_dir, seconds):
    """The line a run ends with: the evaluation reward first, last and best, and where the grids and LoRA are."""
    path, where = os.path.join(run_dir, "eval.jsonl"), f"grids in {run_dir}/samples, LoRA in {run_dir}/checkpoints"
    lines = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    if not lines:
        return f"done in {seconds:.0f} s (no evaluation); {where}"
    first, last, best = lines[0], lines[-1], max(lines, key=lambda line: line["seen_reward_mean"])
    seen = [f"{line['seen_reward_mean']:.4g} (epoch {line['epoch']})" for line in (first, last, best)]
    summary = f"done in {seconds:.0f} s: seen {last['eval_reward']} reward {seen[0]} -> {seen[1]}, best {seen[2]}"
    if "seen_images" in last:  # the standard error of one evaluation's mean, std / sqrt(n) (older logs lack n)
        summary += f", each +- {last['seen_reward_std'] / last['seen_images'] ** 0.5:.2g} (standard error)"
    if "unseen_reward_mean" in last:
        summary += f"; unseen {first['unseen_reward_mean']:.4g} -> {last['unseen_reward_mean']:.4g}"
    return f"{summary}; {where}"


if __name__ == "__main__":
    try:
        main(parse_args())
    except SystemExit as stop:  # bad input, or a model or folder that cannot be used: one "error:" line, code 2
        if not isinstance(stop.code, str):
            raise
        print(stop.code, file=sys.stderr)
        sys.exit(2)
