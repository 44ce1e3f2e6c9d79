"""DDPO with CoCA step-level rewards: the final reward spread over the denoising steps (LoRA on Stable Diffusion).

Papers
  Step-level Reward for Free in RL-based T2I Diffusion Model Fine-tuning
    (CoCA; Liao, Wei, Qu, Cheng; 2025; arXiv 2505.19196)
  Training Diffusion Models with Reinforcement Learning (DDPO; Black et al., ICLR 2024; arXiv 2305.13301)
  DiffExp: Efficient Exploration in Reward Fine-tuning for Text-to-Image Diffusion Models
    (Chae, Choi, Kim, Lee; AAAI 2025; arXiv 2502.14070), optional exploration flags that compose with CoCA

What it implements
  - DDPO unchanged (the policy, the sampler, the per-prompt advantages, the clipped loss) except its credit
    assignment: DDPO gives every step of a trajectory the same advantage A; CoCA gives step j its own r_j.
  - The policy is one DDIM step with eta = 1 (Song et al. 2021, eqs. 12 and 16; eta from DDPO's code,
    kvablack/ddpo-pytorch config/base.py):
      x0_hat = (x_t - sqrt(1 - abar_t) eps~) / sqrt(abar_t)
      x_{t-1} ~ N(mu, sigma_t^2 I),  mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps~
      sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    with classifier-free guidance inside it: eps~ = eps(x_t, t) + w (eps(x_t, t, c) - eps(x_t, t)).
  - CoCA's contribution of each step, with the steps numbered j = 0..T-1 in sampling order (j = 0 is the
    noisiest) and a window of w steps (T = K w):
      c_j = cos(x0_hat_j, x_0)  for j < T, the flattened latents; c_T = cos(x_0, x_0) = 1   (deviation 1)
      m_k = mean(c_{kw+1}, ..., c_{kw+w})       the similarity reached after the steps of window k
      g_0 = m_0 - c_0,  g_k = m_k - m_{k-1}      the gain of window k
      s_j = g_k / (w sum_k' g_k')  for j in window k, so that sum_j s_j = 1
  - Reward shaping: A = per-prompt z-scored final reward, clipped to +-5; return-to-go G_j = sum_{i >= j} s_i;
      r_j = A (alpha + (1 - alpha) G_j),  then z-scored again (deviation 4),
    and DDPO's clipped importance-sampling loss for step j uses r_j in place of A:
      loss = mean max(-r_j ratio, -r_j clip(ratio, 1 - eps, 1 + eps)),  ratio = p_theta(x_{t-1} | x_t, c) / p_old(...)
    alpha = 1 gives every step the same advantage, as DDPO; alpha = 0 (the default) is full CoCA.
  - DiffExp exploration (off by default): DiffExp Eq. 7 dynamic CFG w(t) = w_l if t > t_thres else w_h, and
    DiffExp Eq. 8 random prompt weighting c[i] <- c_null + w_prompt (c[i] - c_null), during the first 3/4 of training.

Deviations and assumptions
  1. c_0 is the similarity of the first step's x0_hat (predicted from the pure noise x_T) to x_0: the estimate
     before any action. The windows average c_1..c_T, the estimates after each action, the last one being x_0
     itself (c_T = 1); so the gain of window k is what its w actions added, and sum_k g_k = m_{K-1} - c_0
     telescopes. This is the indexing of the authors' released code; the summary only says "g_0 = m_0 - c_0".
  2. Negative gains (a window whose estimates move away from x_0) are kept: those steps get negative weights
     s_j, the weights still sum to 1, and G_j may leave [0, 1]. The summary does not say; the released code
     keeps them too.
  3. If sum_k g_k <= 1e-6 (a trajectory that never got closer to its own end; the normalisation would divide
     by zero or flip signs) the weights fall back to uniform, s_j = 1 / T.
  4. The second z-score of r_j (then the loss clips r_j to +-5 as DDPO clips A). The summary does not name the
     statistics. --step-normalisation batch (the default, ours): one mean and std over all T x samples_per_epoch
     values of the epoch (gathered over processes), std + 1e-6; no state. --step-normalisation released (the
     coca-aesthetic preset): the authors' code as it runs: these batch statistics until a prompt's 8th epoch,
     then the mean and pooled std of the OLDEST epoch in the prompt's buffer, not the current one (a per-prompt
     history of 16 epochs, kept in the checkpoints). Centring can flip the sign of a small r_j (a late step of a
     trajectory with A > 0).
  5. x0_hat is computed from the guided eps~ that samples the step, in fp32, by predicted_clean_latent (the same
     formula as step 3 of ddim_step_with_logprob, which stays a verbatim copy of this project's ddpo_diffexp.py,
     its own rewrite of DDPO's step, not kvablack/ddpo-pytorch's code).
  6. As in ddpo_diffexp.py: the log-probability is averaged over the latent's C*H*W elements, as DDPO's code
     (summed over 16,384 elements, a log-ratio of a few thousandths per element would be tens, and exp() of it
     overflows), and computed in fp32; per-prompt statistics use a buffer of each prompt's last 32 rewards (batch
     mean / std until a prompt has 16); random numbers come from generators seeded by (seed, epoch, process), so
     --resume reproduces an uninterrupted run; evaluation samples 10 images per prompt with fixed noise, plain
     CFG w_h and no exploration.
  7. DiffExp's w_l (--cfg-low) is not published: default 1.0 (no guidance), used only with --dynamic-cfg.
  8. Only lr, clip, window and alpha take CoCA's values; the rest keeps ddpo_diffexp.py's defaults. The released
     aesthetic runs (Lil-Shake/CoCA bash/train_coca_aesthetic.sh, config/config_coca.py:aesthetic, 4 GPUs) differ:
     SD 1.4, 256 images per epoch, clip range 5e-5, Adam beta2 0.999, and run names containing "_100", which in
     scripts/train_coca.py (and scripts/train.py, its DDPO baseline) make an optimiser step every 32 backward
     passes of one (sample, timestep): 100 steps per epoch instead of 2. --backward-passes-per-update 32 with
     --train-batch-size 1 is that schedule (the command below; ddpo_diffexp.py has the same flag for DDPO).

Commands
  CoCA's lr, clip, window and alpha on ddpo_diffexp.py's other defaults (deviation 8; 1 GPU;
  `accelerate launch --num_processes 4 ddpo_coca.py ...` for 4):
    python ddpo_coca.py --reward aesthetic --prompts animals
  The released aesthetic run's settings (deviation 8; PRESETS.md gives every value's source), on 4 GPUs:
    accelerate launch --num_processes 4 ddpo_coca.py --preset coca-aesthetic
  Tiny CPU run (offline, a few minutes on 2 cores; the plumbing, not a result):
    python ddpo_coca.py --tiny --reward jpeg_compressibility
  Shapes world (offline, a few minutes on 2 cores; what it learns, over seeds: benchmarks/README.md):
    python ddpo_coca.py --shapes
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
from collections import deque
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from typing import Optional

import numpy as np
import torch
import tyro
from accelerate import Accelerator
from accelerate.utils import gather_object
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from common import (
    first_line,
    add_lora,
    disable_library_progress_bars,
    encode_prompts,
    guidance_scale_schedule,
    guided_noise_prediction,
    images_to_pil,
    load_prompts,
    randomly_weight_prompts,
    save_lora,
    score_images,
    unseen_twin,
)

# hub ids and folders go to common.py's loaders; worlds.py builds the offline names (--model tiny, --tiny,
# the shapes rewards) from tiny_world.py and shapes_world.py
from worlds import SHAPES_MODEL, TINY_MODEL, check_reward_name, check_reward_prompts, load_pipeline, load_reward


@dataclass
class Args:
    # Shared arguments (the same, in the same order, in every script)
    model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    """hub id or local folder of an SD 1.x or SDXL pipeline (model_index.json names which); "tiny" and "tiny-sdxl"
    build the offline tiny models"""
    # --tiny samples 10 steps here: two CoCA windows of 5
    tiny: bool = False
    """preset for CPU: tiny model and rewards, 32 px, a few steps, small batches (explicit flags still win)"""
    shapes: bool = False
    """preset for the shapes world on CPU (shapes_world.py): its model, reward and prompts (explicit flags still win)"""
    preset: Optional[str] = None
    """a named experiment's flags, from PRESETS (after main(); --help lists them; explicit flags win)"""
    reward: str = "aesthetic"
    """reward to maximise: aesthetic, pickscore, clipscore, imagereward, hpsv2 (v2.0), hpsv2.1,
    jpeg_compressibility, jpeg_incompressibility, shapes, shapes_binary, shapes_learned; or an ensemble, a+b or
    2*a+b: the weighted sum of the members, each normalised by common.REWARD_SCALES, with each member logged"""
    eval_reward: Optional[str] = None
    """reward of the evaluation (default: the training reward); e.g. shapes for a run that optimises shapes_learned"""
    prompts: str = "animals"
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
    epochs: int = 200
    """number of epochs (sample, reward, update)"""
    num_steps: int = 50
    """DDIM sampling steps T"""
    eta: float = 1.0
    """DDIM eta: 0 is deterministic DDIM; a policy's log-probability (the DDPO family) needs eta > 0"""
    cfg_high: float = 5.0
    """classifier-free guidance scale w of sampling, in training and in evaluation"""
    resolution: int = 512
    """image height and width in pixels"""
    samples_per_epoch: int = 64
    """images sampled (reward queries) per epoch, over all processes"""
    sample_batch_size: int = 8
    """images per sampling batch, per process"""
    train_batch_size: int = 4
    """samples per training forward / backward, per process"""
    samples_per_update: int = 32
    """samples whose gradients one optimiser step accumulates, over all processes"""
    learning_rate: float = 1e-4
    """AdamW learning rate"""
    adam_betas: tuple[float, float] = (0.9, 0.99)
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
    # DiffExp arguments
    diffexp: bool = False
    """turn on both DiffExp strategies: --dynamic-cfg and --prompt-weighting default to on, and an explicit
    --no-dynamic-cfg or --no-prompt-weighting still turns one off"""
    dynamic_cfg: bool = False
    """DiffExp Eq. 7: guidance w_l while t > t_thres, then w_h"""
    prompt_weighting: bool = False
    """DiffExp Eq. 8: weight one random word of each prompt by w ~ U(prompt_weight_range)"""
    cfg_low: float = 1.0
    """w_l of DiffExp Eq. 7 (--cfg-high is its w_h): unpublished ("extremely low"); 1.0 = no guidance"""
    t_thres: int = 900
    """t_thres of DiffExp Eq. 7 on the 0..1000 timestep scale"""
    prompt_weight_range: tuple[float, float] = (1.0, 1.2)
    """range of the uniform prompt weight w_prompt of DiffExp Eq. 8"""
    explore_fraction: float = 0.75
    """fraction of the epochs (the first ones) that explore"""
    # Method-specific arguments
    clip_range: float = 1e-4
    """PPO clip range eps of the importance ratio"""
    advantage_clip: float = 5.0
    """advantages are clipped to [-advantage_clip, advantage_clip]"""
    timestep_fraction: float = 1.0
    """fraction of each trajectory's T steps trained (a random subset per sample)"""
    inner_epochs: int = 1
    """passes of updates over each epoch's samples"""
    stat_buffer_size: int = 32
    """per-prompt reward history for advantage normalisation"""
    stat_min_count: int = 16
    """below this many rewards of a prompt, normalise with the batch's mean / std"""
    backward_passes_per_update: int = 0
    """0: one optimiser step per --samples-per-update samples (all their trained timesteps), as DDPO; M > 0: one
    per M backward passes of (micro-batch, timestep), the released CoCA / DDPO runs' "_100" schedule with
    --train-batch-size 1 and M = 32 (Lil-Shake/CoCA scripts/train_coca.py: 100 optimiser steps per epoch)"""
    similarity_window: int = 5
    """w: steps per window of the similarity gains g_k; must divide --num-steps"""
    shaping_alpha: float = 0.0
    """alpha of r_j = A (alpha + (1 - alpha) G_j): 0 = full step-level credit, 1 = DDPO's equal credit"""
    step_normalisation: str = "batch"
    """second z-score of r_j: batch (one mean and std over the epoch's values) or released (the authors' code:
    batch statistics until a prompt's 8th epoch, then its oldest buffered epoch's; deviation 4)"""


# ----------------------------------------------------------------------------------------------------------
# Helpers of 2. Sample
# ----------------------------------------------------------------------------------------------------------


def epoch_seed(seed, epoch, process_index):
    """The seed of one (epoch, process): every draw is a function of --seed, so --resume redraws the same."""
    return (seed * 100_003 + epoch) * 1_009 + process_index


def exploration_settings(args, epoch):
    """Which DiffExp strategies this epoch uses: only in the first explore_fraction of training."""
    exploring = epoch < args.explore_fraction * args.epochs
    return args.dynamic_cfg and exploring, args.prompt_weighting and exploring


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


def predicted_clean_latent(scheduler, noise_pred, timestep, latents):
    """DDIM's estimate of the clean latent, x0_hat = (x_t - sqrt(1 - abar_t) eps~) / sqrt(abar_t), in fp32.

    The same formula as step 3 of ddim_step_with_logprob; noise_pred eps~ and latents x_t (B, C, h, w); timestep t.
    """
    timestep = torch.as_tensor(timestep, device=latents.device).long()  # t: () or (B,)
    alpha_prod_t = scheduler.alphas_cumprod.to(latents.device)[timestep].reshape(-1, 1, 1, 1)
    return (latents.float() - (1 - alpha_prod_t).sqrt() * noise_pred.float()) / alpha_prod_t.sqrt()


def similarity_to_final_latent(predicted_clean_latents, final_latents):
    """c_j = cos(x0_hat_j, x_0) of the flattened latents for j = 0..T-1, and c_T = cos(x_0, x_0) = 1 (deviation 1).

    predicted_clean_latents (B, T, C, h, w); final_latents x_0 (B, C, h, w). Returns c (B, T + 1) in fp32.
    """
    final = final_latents.float().flatten(1)  # (B, C*h*w)
    estimates = torch.cat([predicted_clean_latents.float().flatten(2), final[:, None]], dim=1)  # (B, T + 1, C*h*w)
    return torch.nn.functional.cosine_similarity(estimates, final[:, None], dim=-1)


@torch.no_grad()
def sample_trajectories(pipeline, unet, prompt_embeds, null_embeds, guidance_scales, latents, eta, generator):
    """Run the policy from x_T to x_0, keeping every latent and log-prob, and CoCA's similarities c_0..c_T.

    prompt_embeds (B, L, D); guidance_scales (B, T), the scale that samples each step; latents x_T (B, 4, h, w).
    Returns the trajectory (B, T + 1, 4, h, w), log_probs (B, T), similarities (B, T + 1) and the decoded images
    (B, 3, H, W) in [0, 1].
    """
    scheduler = pipeline.scheduler
    trajectory, log_probs, clean_estimates = [latents], [], []
    for step, t in enumerate(scheduler.timesteps):
        noise_pred = guided_noise_prediction(unet, latents, t, prompt_embeds, null_embeds, guidance_scales[:, step])
        clean_estimates.append(predicted_clean_latent(scheduler, noise_pred, t, latents))  # x0_hat_j, of eps~
        latents, log_prob = ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta, generator=generator)
        trajectory.append(latents)
        log_probs.append(log_prob)
    similarities = similarity_to_final_latent(torch.stack(clean_estimates, dim=1), latents)  # c_0..c_T, (B, T + 1)
    images = pipeline.vae.decode(latents.to(pipeline.vae.dtype) / pipeline.vae.config.scaling_factor).sample
    images = (images.float() / 2 + 0.5).clamp(0, 1)  # VAE output is in [-1, 1]
    return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1), similarities, images


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


def per_prompt_advantages(prompts, rewards, history, buffer_size, min_count):
    """DDPO's advantage: (r - mean_p) / (std_p + 1e-6) with each prompt's last `buffer_size` rewards.

    `history` (prompt -> deque of rewards) is updated in place; until a prompt has `min_count` rewards, the
    whole batch's mean and std stand in for its own.
    """
    prompts, rewards = np.array(prompts), np.asarray(rewards, dtype=np.float64)
    advantages = np.empty_like(rewards)
    for prompt in np.unique(prompts):
        selected = prompts == prompt
        buffer = history.setdefault(str(prompt), deque(maxlen=buffer_size))
        buffer.extend(rewards[selected].tolist())
        source = np.array(buffer) if len(buffer) >= min_count else rewards
        advantages[selected] = (rewards[selected] - source.mean()) / (source.std() + 1e-6)
    return advantages


def step_weights_from_similarity(similarities, window):
    """CoCA's per-step weights s_j from each trajectory's similarities c_0..c_T; (B, T + 1) -> (B, T).

    m_k = mean(c_{kw+1}, ..., c_{kw+w}); g_0 = m_0 - c_0, g_k = m_k - m_{k-1}; s_j = g_k / (w sum_k g_k) for the
    w steps j of window k, so that sum_j s_j = 1. Negative gains are kept (deviation 2); a total gain <= 1e-6
    gives uniform weights 1 / T (deviation 3).
    """
    batch_size, num_steps = similarities.shape[0], similarities.shape[1] - 1
    window_means = similarities[:, 1:].reshape(batch_size, num_steps // window, window).mean(dim=2)  # m_k, (B, K)
    previous = torch.cat([similarities[:, :1], window_means[:, :-1]], dim=1)  # c_0, m_0, ..., m_{K-2}; (B, K)
    gains = window_means - previous  # g_k, (B, K)
    total_gain = gains.sum(dim=1, keepdim=True)  # sum_k g_k = m_{K-1} - c_0 (telescoping), (B, 1)
    weights = (gains / (window * total_gain.clamp(min=1e-6))).repeat_interleave(window, dim=1)  # s_j, (B, T)
    return torch.where(total_gain > 1e-6, weights, torch.full_like(weights, 1.0 / num_steps))


def return_to_go(step_weights):
    """G_j = sum_{i >= j} s_i: the share of the final reward earned by step j and the steps after it; (B, T)."""
    return step_weights.flip(1).cumsum(1).flip(1)


def step_rewards(advantages, step_weights, alpha, advantage_clip):
    """CoCA's per-step rewards r_j = A (alpha + (1 - alpha) G_j), before their second normalisation.

    advantages: A (N,), DDPO's per-prompt z-scored rewards, clipped here to +-advantage_clip; step_weights: s (N, T).
    Returns r (N, T).
    """
    advantages = advantages.clamp(-advantage_clip, advantage_clip)
    return advantages[:, None] * (alpha + (1 - alpha) * return_to_go(step_weights))  # r_j, (N, T)


def shaped_step_advantages(advantages, step_weights, alpha, advantage_clip):
    """r_j z-scored with one mean and std over the epoch's N x T values (--step-normalisation batch, deviation 4)."""
    shaped = step_rewards(advantages, step_weights, alpha, advantage_clip)
    return (shaped - shaped.mean()) / (shaped.std(correction=0) + 1e-6)


def released_step_normalisation(prompts, shaped, history, buffer_size, min_count):
    """The released code's second z-score of r_j (--step-normalisation released; Lil-Shake/CoCA@d8233a5
    coca/stat_tracking.py, PerPromptStatTracker.update_temporal_rewards), reproduced as it runs.

    prompts: N; shaped: r (N, T); history: prompt -> deque(maxlen=buffer_size) of lists (as checkpoints hold them),
    updated in place. Each epoch a prompt's buffer gains TWO entries, the n_p means and the n_p stds of its samples'
    r over the T steps. Until the buffer holds min_count entries (the prompt's 8th epoch at 16), every value is
    z-scored with the mean and std of the whole N x T matrix; from then on with the mean and pooled std of the
    buffer's OLDEST (means, stds) pair only: one past epoch's values, the current one and the rest of the buffer
    unused. Returns (N, T).
    """
    prompts, values = np.array(prompts), shaped.double().numpy()
    normalised = np.empty_like(values)
    for prompt in np.unique(prompts):
        selected = prompts == prompt
        buffer = history.setdefault(str(prompt), deque(maxlen=buffer_size))
        buffer.extend([values[selected].mean(axis=1).tolist(), values[selected].std(axis=1).tolist()])
        if len(buffer) < min_count:
            mean, std = values.mean(), values.std()
        else:  # buffer[0], buffer[1]: the oldest epoch's means and stds (an even maxlen evicts them in pairs)
            means, stds = np.array(buffer[0]), np.array(buffer[1])
            mean = means.mean()
            std = np.sqrt(np.mean(means**2 + stds**2) - mean**2)  # that epoch's pooled std
        normalised[selected] = (values[selected] - mean) / (std + 1e-6)
    return torch.from_numpy(normalised)


def step_advantages(args, prompts, advantages, similarities, history):
    """CoCA's advantage r_j of every step, (N, T) in fp32, from DDPO's A (N,) and the similarities c_0..c_T (N, T + 1):
    the weights s_j, the shaping by G_j and the second z-score (deviation 4), over the epoch's values (batch) or as
    the released code (released; history: its per-prompt buffers)."""
    step_weights = step_weights_from_similarity(similarities, args.similarity_window)  # s_j, (N, T)
    advantages = torch.tensor(advantages)
    if args.step_normalisation == "batch":
        return shaped_step_advantages(advantages, step_weights, args.shaping_alpha, args.advantage_clip).float()
    shaped = step_rewards(advantages, step_weights, args.shaping_alpha, args.advantage_clip)  # r_j, (N, T)
    return released_step_normalisation(prompts, shaped, history, args.stat_buffer_size, args.stat_min_count).float()


def trained_steps_per_sample(args):
    """K: how many of each trajectory's T steps an epoch trains (--timestep-fraction of them, at least 1)."""
    return max(1, int(args.num_steps * args.timestep_fraction))


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
    # per-prompt buffers, restored on resume: rewards for A (deviation 6), (means, stds) of r_j for released's z-score
    reward_history = {p: deque(r, maxlen=args.stat_buffer_size) for p, r in state.get("reward_history", {}).items()}
    step_history = {p: deque(a, maxlen=args.stat_buffer_size) for p, a in state.get("step_history", {}).items()}
    trained_steps = trained_steps_per_sample(args)  # K

    for epoch in tqdm(range(start_epoch, args.epochs), "epochs", initial=start_epoch, total=args.epochs, **bars):
        epoch_start = time.time()
        # torch's global RNG, for anything not drawn from `generator`
        torch.manual_seed(epoch_seed(args.seed, epoch, accelerator.process_index))
        if epoch % args.eval_every == 0:
            evaluate_at(epoch)

        # ==================================================================================================
        # 2. Sample: trajectories with per-step log-probs; exploration (DiffExp Eqs. 7-8) lives here
        # ==================================================================================================
        use_dynamic_cfg, use_prompt_weighting = exploration_settings(args, epoch)
        # CPU: same draws on any device
        generator = torch.Generator().manual_seed(epoch_seed(args.seed, epoch, accelerator.process_index))
        # DiffExp Eq. 7: one scale per denoising step, the same for every sample of the epoch; (T,)
        step_scales = guidance_scale_schedule(timesteps, args.cfg_low, args.cfg_high, args.t_thres, use_dynamic_cfg)
        unet.eval()
        batches = []
        for _ in tqdm(range(samples_per_process // args.sample_batch_size), "sampling", leave=False, **bars):
            prompt_indices = torch.randint(len(train_prompts), (args.sample_batch_size,), generator=generator)
            prompts = [train_prompts[i] for i in prompt_indices]
            prompt_embeds = encode_prompts(pipeline, prompts, args.resolution)  # c, (B, L, D)
            if use_prompt_weighting:  # DiffExp Eq. 8 on one random word per prompt, w_prompt ~ U(low, high)
                prompt_embeds = randomly_weight_prompts(
                    pipeline, prompts, prompt_embeds, null_embeds, args.prompt_weight_range, generator
                )
            guidance_scales = step_scales.expand(args.sample_batch_size, -1)  # (B, T)
            latents = torch.randn((args.sample_batch_size, *latent_shape), generator=generator).to(
                accelerator.device, weight_dtype
            )
            trajectory, log_probs, similarities, images = sample_trajectories(
                pipeline, unet, prompt_embeds, null_embeds, guidance_scales, latents, args.eta, generator
            )
            # Store exactly what sampled each step (its c and w): training must recompute THAT policy.
            batch = dict(prompts=prompts, prompt_embeds=prompt_embeds, guidance_scales=guidance_scales)
            batch["similarities"] = similarities  # CoCA's c_0..c_T, (B, T + 1)
            batches.append(batch | dict(trajectory=trajectory, log_probs=log_probs, images=images))
        prompts = [p for batch in batches for p in batch["prompts"]]
        samples = {
            key: torch.cat([batch[key] for batch in batches])
            for key in ("prompt_embeds", "guidance_scales", "trajectory", "log_probs", "similarities", "images")
        }
        # samples: prompt_embeds (S, L, D), guidance_scales (S, T), trajectory (S, T+1, 4, h, w), log_probs (S, T)

        # ==================================================================================================
        # 3. Reward: r(x_0, c) for every sample, gathered from all processes
        # ==================================================================================================
        # (S,), and an ensemble's members {name: (S,)}
        rewards, member_rewards = score_in_batches(reward_fn, samples["images"], prompts, args.sample_batch_size)
        all_rewards = accelerator.gather(rewards.float().to(accelerator.device)).cpu().numpy()  # (samples_per_epoch,)
        all_prompts = (
            [p for part in gather_object([prompts]) for p in part] if accelerator.num_processes > 1 else prompts
        )
        stop_on_non_finite(accelerator, epoch, "reward", float(all_rewards.sum()))

        # ==================================================================================================
        # 4. Advantage and loss: A per prompt, spread over the steps by CoCA (s_j, G_j, r_j); clipped_policy_loss
        # ==================================================================================================
        all_advantages = per_prompt_advantages(
            all_prompts, all_rewards, reward_history, args.stat_buffer_size, args.stat_min_count
        )
        all_similarities = accelerator.gather(samples["similarities"].to(accelerator.device)).cpu()  # all c_0..c_T
        all_step_advantages = step_advantages(args, all_prompts, all_advantages, all_similarities, step_history)
        # every process computed the same advantages; keep this process's slice (gather order = process order): (S, T)
        advantages = all_step_advantages.view(accelerator.num_processes, -1, args.num_steps)[accelerator.process_index]

        # ==================================================================================================
        # 5. Update: DDPO-IS, DDPO's clipped surrogate of DiffExp Eq. 6 with r_j for A, over the sampled timesteps
        # ==================================================================================================
        unet.train()
        losses, approx_kls, clipfracs, grad_norms = [], [], [], []
        micro_batches = samples_per_process // args.train_batch_size  # the same on every process
        # backward passes (one per micro-batch and trained timestep) per optimiser step: by default those of
        # samples_per_update samples; with --backward-passes-per-update M, M (the released CoCA runs' "_100")
        backwards_per_update = args.backward_passes_per_update or micro_batches_per_update * trained_steps
        for inner_epoch in range(args.inner_epochs):
            backward_index = 0
            order = torch.randperm(samples_per_process, generator=generator)  # (S,): this process's samples
            # each sample visits its timesteps in its own random order; training the first K of them
            step_orders = torch.stack(
                [torch.randperm(args.num_steps, generator=generator) for _ in range(samples_per_process)]
            )[:, :trained_steps]  # (S, K)
            for micro_index in tqdm(range(micro_batches), "training", leave=False, **bars):
                slots = slice(micro_index * args.train_batch_size, (micro_index + 1) * args.train_batch_size)
                rows = order[slots]  # (b,)
                steps = step_orders[rows]  # (b, K)
                x_t = samples["trajectory"][rows[:, None], steps]  # (b, K, 4, h, w)
                x_prev = samples["trajectory"][rows[:, None], steps + 1]  # (b, K, 4, h, w)
                log_prob_old = samples["log_probs"][rows[:, None], steps]  # (b, K)
                scales = samples["guidance_scales"][rows[:, None], steps]  # (b, K)
                prompt_embeds = samples["prompt_embeds"][rows]  # (b, L, D)
                step_timesteps = timesteps[steps.to(timesteps.device)]  # (b, K)
                row_advantages = advantages[rows[:, None], steps].to(accelerator.device)  # r_j per trained step: (b, K)
                for k in range(trained_steps):
                    backward_index += 1
                    ends_update = backward_index % backwards_per_update == 0
                    # gradients accumulate locally; DDP all-reduces only on the backward that ends an update
                    with nullcontext() if ends_update else accelerator.no_sync(unet):
                        noise_pred = guided_noise_prediction(
                            unet, x_t[:, k], step_timesteps[:, k], prompt_embeds, null_embeds, scales[:, k]
                        )
                        _, log_prob = ddim_step_with_logprob(
                            pipeline.scheduler, noise_pred, step_timesteps[:, k], x_t[:, k], args.eta, x_prev[:, k]
                        )
                        loss, approx_kl, clipfrac = clipped_policy_loss(
                            log_prob, log_prob_old[:, k], row_advantages[:, k], args.clip_range, args.advantage_clip
                        )
                        # on the unclipped branch d loss = -r_j d ratio = -r_j ratio d log p, DiffExp Eq. 6's estimator
                        # at ratio = 1 with the step's r_j for r; a clipped sample gives no gradient. The update's
                        # gradient is the mean over its backward passes (its samples' trained timesteps)
                        accelerator.backward(loss / backwards_per_update)
                    losses.append(loss.item())
                    approx_kls.append(approx_kl.item())
                    clipfracs.append(clipfrac.item())
                    if ends_update:
                        grad_norm, skipped_in_a_row = optimizer_step(
                            accelerator, optimizer, lora_parameters, args.max_grad_norm, epoch, skipped_in_a_row
                        )
                        grad_norms.append(grad_norm)

        # ==================================================================================================
        # 6. Log, evaluate, checkpoint
        # ==================================================================================================
        loss_mean, approx_kl_mean, clipfrac_mean, grad_norm_mean, skipped_steps = process_means(
            accelerator, [np.mean(losses), np.mean(approx_kls), np.mean(clipfracs), *grad_norm_summary(grad_norms)]
        )
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
            dynamic_cfg=use_dynamic_cfg,
            prompt_weighting=use_prompt_weighting,
            seconds=round(time.time() - epoch_start, 3),
        )
        line = (
            f"epoch {epoch}: reward {metrics['reward_mean']:.4g} +- {metrics['reward_std']:.3g}, loss {loss_mean:.3g}, "
        )
        log_epoch(
            accelerator,
            run_dir,
            metrics,
            lora_parameters,
            line + f"kl {approx_kl_mean:.2e}, clipfrac {clipfrac_mean:.2f}",
        )
        if epoch + 1 == args.epochs:
            evaluate_at(epoch + 1)
        history = {p: list(r) for p, r in reward_history.items()}  # what a resumed run needs of this method
        save_checkpoint(
            args,
            accelerator,
            run_dir,
            epoch,
            unet,
            optimizer,
            reward_history=history,
            step_history={p: list(a) for p, a in step_history.items()},
            skipped_in_a_row=skipped_in_a_row,
        )
    accelerator.end_training()
    if accelerator.is_main_process:
        print(run_summary(run_dir, time.time() - run_start))


# ==========================================================================================================
# Evaluation (DiffExp Figures 4 and 6): fixed noise, plain CFG w_h, the mean reward against reward queries
# ==========================================================================================================


def run_evaluation(args, accelerator, pipeline, unet, reward_fn, eval_sets, null_embeds, latent_shape, run_dir, epoch):
    """Evaluate on the seen and unseen sets; append a line to eval.jsonl and save a grid of the first images."""
    unet.eval()
    line = dict(epoch=epoch, reward_queries=epoch * args.samples_per_epoch, eval_reward=args.eval_reward or args.reward)
    grids = {}
    for name, prompts in eval_sets.items():
        mean, std, member_means, grid = evaluate(
            args, accelerator, pipeline, unet, reward_fn, prompts, null_embeds, latent_shape
        )
        line[f"{name}_reward_mean"], line[f"{name}_reward_std"] = mean, std
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
def evaluate(args, accelerator, pipeline, unet, reward_fn, prompts, null_embeds, latent_shape):
    """Figures 4 / 6 protocol: eval_images_per_prompt images per prompt from fixed noise, plain CFG w_h.

    The jobs (prompt, image index) are split over processes; every job's noise depends only on its index, so
    the numbers do not depend on the number of processes. Returns (mean, std, member means, grid): the reward's
    mean and std over every image, the mean of each ensemble member's reward ({} for a single reward), and
    (prompt, reward, image) of each prompt's first image for the grid.
    """
    jobs = [prompt for prompt in prompts for _ in range(args.eval_images_per_prompt)]
    batch_size = args.sample_batch_size
    batches = [list(range(start, min(start + batch_size, len(jobs)))) for start in range(0, len(jobs), batch_size)]
    rewards, members, images_kept = {}, {}, {}
    for batch_index in range(accelerator.process_index, len(batches), accelerator.num_processes):
        indices = batches[batch_index]
        batch_prompts = [jobs[i] for i in indices]
        generator = torch.Generator().manual_seed(10_000_019 + args.seed * 1_009 + batch_index)  # fixed across evals
        latents = torch.randn((len(indices), *latent_shape), generator=generator).to(
            accelerator.device, pipeline.unet.dtype
        )
        prompt_embeds = encode_prompts(pipeline, batch_prompts, args.resolution)
        guidance_scales = torch.full((len(indices), args.num_steps), args.cfg_high)
        _, _, _, images = sample_trajectories(
            pipeline, unet, prompt_embeds, null_embeds, guidance_scales, latents, args.eta, generator
        )
        batch_rewards, batch_members = score_images(reward_fn, images, batch_prompts)  # (B,), {member: (B,)}
        for position, job in enumerate(indices):
            rewards[job] = batch_rewards[position].item()
            members[job] = {name: values[position].item() for name, values in batch_members.items()}
            if job % args.eval_images_per_prompt == 0:  # keep the first image of every prompt for the grid
                images_kept[job] = images[position].cpu()
    all_rewards, all_images = {}, {}
    for part in gather_object([rewards]):
        all_rewards.update(part)
    for part in gather_object([images_kept]):
        all_images.update(part)
    all_members = {}
    for part in gather_object([members]):
        all_members.update(part)
    values = np.array([all_rewards[i] for i in range(len(jobs))])
    # an ensemble's members, each a mean over every image ({} for a single reward)
    member_means = {name: float(np.mean([all_members[i][name] for i in range(len(jobs))])) for name in all_members[0]}
    grid = [(jobs[i], all_rewards[i], all_images[i]) for i in sorted(all_images)]
    return float(values.mean()), float(values.std()), member_means, grid


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
        epochs=12,
        num_steps=10,
        resolution=32,
        samples_per_epoch=32,
        sample_batch_size=16,
        train_batch_size=8,  # divides samples_per_update over 2 processes too
        samples_per_update=16,
        learning_rate=3e-3,
        mixed_precision="no",
        eval_every=4,
        eval_images_per_prompt=2,
        save_every=4,
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
        learning_rate=5e-3,  # 1e-2 overshoots: KL 0.2-2.9 and drift (benchmarks/README.md)
        clip_range=1e-3,
        mixed_precision="no",
        eval_every=5,
        eval_images_per_prompt=4,
        save_every=10,
    ),
    # CoCA's released aesthetic run (Lil-Shake/CoCA bash/train_coca_aesthetic.sh with
    # config/config_coca.py:aesthetic on 4 GPUs): run it with `accelerate launch --num_processes 4`
    "coca-aesthetic": dict(
        reward="aesthetic",
        prompts="animals",  # prompt_fn simple_animals: DDPO's 45 animals
        model="CompVis/stable-diffusion-v1-4",  # config_coca.py: pretrained.model
        epochs=100,  # config_coca.py:aesthetic num_epochs
        samples_per_epoch=256,  # sample.batch_size 4 x num_batches_per_epoch 16 x 4 GPUs
        sample_batch_size=4,  # sample.batch_size (per GPU)
        train_batch_size=1,  # train.batch_size
        backward_passes_per_update=32,  # run name "_100": gradient_accumulation_steps 32 backward passes
        clip_range=5e-5,  # config_coca.py:aesthetic train.clip_range
        learning_rate=1e-4,  # base.py
        adam_betas=(0.9, 0.999),  # base.py adam_beta1, adam_beta2
        similarity_window=5,  # base.py window_size
        shaping_alpha=0.0,  # base.py temporal_alpha
        step_normalisation="released",  # coca/stat_tracking.py update_temporal_rewards (buffer 32, min count 16)
    ),
}


def diffexp_flag_rules(args):
    """(field, holds, what its value must be) for DiffExp's flags: DiffExp Eq. 7's threshold, DiffExp Eq. 8's
    range, the exploring fraction."""
    return [
        ("t_thres", 0 <= args.t_thres < 1000, "must be in [0, 1000)"),
        ("prompt_weight_range", args.prompt_weight_range[0] <= args.prompt_weight_range[1], "is inverted (low > high)"),
        ("explore_fraction", 0 <= args.explore_fraction <= 1, "must be in [0, 1]"),
    ]


METHOD_COUNTS = ("inner_epochs", "stat_buffer_size", "stat_min_count", "similarity_window")  # each must be >= 1


def flag_rules(args, processes):
    """(field, holds, what its value must be) for this script's flags; the shared ones hold (no batch size is 0)."""
    # an optimiser step must see every process's backward passes: M (--backward-passes-per-update) divides the epoch's
    per_epoch = args.samples_per_epoch // (args.train_batch_size * processes) * trained_steps_per_sample(args)
    passes = args.backward_passes_per_update
    return diffexp_flag_rules(args) + [
        ("eta", args.eta > 0, "must be > 0: the policy's log-probability needs sigma_t > 0"),
        multiple(args, "samples_per_epoch", "sample_batch_size", processes),
        multiple(args, "samples_per_epoch", "samples_per_update"),
        ("timestep_fraction", 0 < args.timestep_fraction <= 1, "must be in (0, 1]"),
        ("clip_range", args.clip_range > 0, "must be > 0"),
        ("advantage_clip", args.advantage_clip > 0, "must be > 0"),
        ("backward_passes_per_update", passes >= 0, "must be >= 0"),
        (
            "backward_passes_per_update",
            passes <= 0 or per_epoch % passes == 0,
            f"does not divide the epoch's {per_epoch} backward passes per process (samples per process / "
            "--train-batch-size x trained steps)",
        ),
        multiple(args, "num_steps", "similarity_window"),
        ("shaping_alpha", 0 <= args.shaping_alpha <= 1, "must be in [0, 1]"),
        ("step_normalisation", args.step_normalisation in ("batch", "released"), "must be batch or released"),
        (
            "stat_buffer_size",
            args.step_normalisation != "released" or args.stat_buffer_size % 2 == 0,
            "must be even with --step-normalisation released: its buffers hold (means, stds) pairs",
        ),
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
