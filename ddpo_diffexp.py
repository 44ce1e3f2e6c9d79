"""DDPO with DiffExp exploration: policy-gradient reward fine-tuning of Stable Diffusion (LoRA).

Papers
  DiffExp: Efficient Exploration in Reward Fine-tuning for Text-to-Image Diffusion Models
    (Chae, Choi, Kim, Lee; AAAI 2025; arXiv 2502.14070)
  Training Diffusion Models with Reinforcement Learning (DDPO; Black et al., ICLR 2024; arXiv 2305.13301)

What it implements
  - The denoising process as an MDP whose policy is one DDIM step (DiffExp Eq. 3) with eta = 1 (DDPO's code,
    kvablack/ddpo-pytorch config/base.py; DiffExp's text gives no eta):
      x0_hat = (x_t - sqrt(1 - abar_t) eps~) / sqrt(abar_t)
      x_{t-1} ~ N(mu, sigma_t^2 I),  mu = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma_t^2) eps~
      sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
  - Classifier-free guidance inside the policy (Eq. 4): eps~ = eps(x_t, t) + w (eps(x_t, t, c) - eps(x_t, t)).
  - The objective of Eq. 5, max E_c E_{x_0 ~ p_theta(x_0 | c)} r(x_0, c), by its policy gradient (Eq. 6),
    sum_t grad log p(x_{t-1} | x_t, c) r(x_0, c), in DDPO's clipped importance-sampling form (DDPO-IS):
      loss = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)).
  - DiffExp exploration during the first 3/4 of training, never in evaluation:
      DiffExp Eq. 7 dynamic CFG: w(t) = w_l if t > t_thres else w_h;
      DiffExp Eq. 8 random prompt weighting: c[i] <- c_null + w_prompt (c[i] - c_null), w_prompt ~ U(1, 1.2), for all
      the tokens of one random word i.

Deviations and assumptions
  1. w_l (--cfg-low) is not published ("extremely low"). Default 1.0: the plain conditional prediction, i.e.
     no guidance, the lowest scale that still follows the prompt on the early steps (w < 1 moves toward the
     unconditional model). With t_thres = 900 it applies to the first 5 of 50 steps.
  2. The log-probability is the Gaussian log-density averaged over the latent's C*H*W elements (as DDPO's
     code; a sum overflows the ratio with clip 1e-4), and it is computed in fp32.
  3. Advantages use DDPO's per-prompt statistics: a buffer of each prompt's last 32 rewards (batch mean / std
     until a prompt has 16), std + 1e-6, clipped to +-5.
  4. Random numbers come from generators seeded by (seed, epoch, process), so a resumed run draws exactly what
     an uninterrupted one draws, without saving RNG states.
  5. Evaluation (Figures 4 and 6) samples 10 images per prompt with fixed noise, plain CFG w_h, eta 1, and
     reports the mean reward against the number of training reward queries.

Commands
  Paper setting (1 GPU; `accelerate launch --num_processes 4 ddpo_diffexp.py ...` for 4):
    python ddpo_diffexp.py --preset diffexp-fig4a   (Fig. 4 (a); PRESETS.md gives every value's source)
  Tiny CPU run (offline, about a minute on 2 cores; the tiny aesthetic reward rises, jpeg_compressibility barely moves):
    python ddpo_diffexp.py --tiny --reward aesthetic
  Shapes world (offline, 123-223 s on 2 idle cores, by machine; seeds 0-19: seen exact reward 0.483 -> 0.589
  [0.572, 0.607], a rise on every seed, +0.10 or more on 11 of 20; benchmarks/README.md):
    python ddpo_diffexp.py --shapes
"""

import atexit
import contextlib
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
    tiny: bool = False
    """preset for CPU: tiny model and rewards, 32 px, a few steps, small batches (explicit flags still win)"""
    shapes: bool = False
    """preset for the shapes world on CPU (shapes_world.py): its model, reward and prompts (explicit flags still win)"""
    preset: Optional[str] = None
    """a named experiment's flags, from PRESETS at the top of the script (--help lists them; explicit flags win)"""
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
    """classifier-free guidance scale w (w_h of DiffExp Eq. 7): the only scale without dynamic CFG, and in evaluation"""
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
    learning_rate: float = 3e-4
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
    """w_l of DiffExp Eq. 7: unpublished ("extremely low"); 1.0 = no guidance"""
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


# Named presets (--preset NAME; --tiny and --shapes name the first two): each sets the flags of one experiment,
# and every value says where it comes from. Flags given on the command line override a preset's.
PRESETS = {
    # ours: everything small enough for 2 CPU cores (the tiny world, tiny_world.py), the plumbing a user runs first
    "tiny": dict(
        model=TINY_MODEL,
        tiny=True,
        epochs=12,
        num_steps=8,
        resolution=32,
        samples_per_epoch=32,
        sample_batch_size=16,
        train_batch_size=8,  # divides samples_per_update over 2 processes too
        samples_per_update=16,
        learning_rate=1e-2,
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
    # DiffExp Figure 4 (a): DDPO with DiffExp, Aesthetic on the 45 animals of Table 1. The defaults are DiffExp's
    # DDPO setting (supplementary: 50 steps, CFG 5.0, 64 images per iteration, clip 1e-4, lr 3e-4, AdamW (0.9, 0.99));
    # it gives no update schedule or length, which come from its baseline, kvablack/ddpo-pytorch config/dgx.py
    "diffexp-fig4a": dict(
        reward="aesthetic",
        prompts="animals",
        diffexp=True,
        samples_per_update=32,  # ours: dgx.py's 2 optimiser steps an epoch, at DiffExp's 64 images (dgx.py: 128 of 256)
        epochs=200,  # dgx.py:aesthetic num_epochs; the exploring first 3/4 is then epochs 0-149
    ),
    # DiffExp Figure 4 (b): PickScore on the 135 animal-activity prompts of Table 1 (Table 2 lists the unseen ones)
    "diffexp-fig4b": dict(
        reward="pickscore",
        prompts="animal_activities",
        diffexp=True,
        samples_per_update=32,  # ours, as diffexp-fig4a
        epochs=200,  # as diffexp-fig4a
    ),
    # The DDPO baseline of CoCA's released aesthetic run (Lil-Shake/CoCA bash/train_ddpo_aesthetic.sh with
    # config/config_coca.py:aesthetic on 4 GPUs): run it with `accelerate launch --num_processes 4`
    "coca-ddpo-aesthetic": dict(
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
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Helpers of 1. Setup
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    """Parse flags on top of the defaults, or of the named preset (--preset NAME, --tiny, --shapes) if one is given."""
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
    if args.diffexp:  # both strategies become the defaults, and the flags are parsed again on top of them: an
        # explicit --no-prompt-weighting or --no-dynamic-cfg still wins (DiffExp's Fig. 9 ablation)
        defaults = replace(defaults, dynamic_cfg=True, prompt_weighting=True)
        args = tyro.cli(Args, default=defaults, args=argv, description=description)
    return args


def flag(name):
    """The command-line spelling of an Args field: samples_per_epoch -> --samples-per-epoch."""
    return "--" + name.replace("_", "-")


def divisibility_problem(args, name, divisor_name, num_processes=1):
    """None if args.<name> is a multiple of args.<divisor_name> x num_processes, else the arithmetic, spelled out."""
    value, divisor = getattr(args, name), getattr(args, divisor_name) * num_processes
    if value % divisor == 0:
        return None
    per = f" x {num_processes} processes = {divisor}" if num_processes > 1 else ""
    return (
        f"{flag(name)} {value} is not a multiple of {flag(divisor_name)} {getattr(args, divisor_name)}{per} "
        f"({value} = {value // divisor} x {divisor} + {value % divisor})"
    )


def shared_flag_problems(args, num_processes):
    """The problems of the flags every script shares, and of any float flag that is NaN or infinite.

    Rewards and prompt files are checked first and stop at once (each with its own error line): they are looked
    up on disk, and a later check could not say anything useful about a run without them.
    """
    rewards = (args.reward, args.eval_reward or args.reward)
    for reward in rewards:
        check_reward_name(reward)
    prompts = load_prompts(args.prompts) + (load_prompts(args.eval_unseen_prompts) if args.eval_unseen_prompts else [])
    for reward in rewards:
        check_reward_prompts(reward, prompts)
    problems = []
    for field in fields(args):
        value = getattr(args, field.name)
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else [value])):
            problems.append(f"{flag(field.name)} {value} must be finite")
    counts = ("epochs", "num_steps", "samples_per_epoch", "sample_batch_size", "train_batch_size")
    counts += ("samples_per_update", "eval_every", "save_every", "eval_images_per_prompt", "lora_rank")
    problems += [f"{flag(name)} {getattr(args, name)} must be >= 1" for name in counts if getattr(args, name) < 1]
    if problems:  # the checks below would divide by these, or compare NaN
        return problems
    if args.seed < 0:
        problems.append(f"--seed {args.seed} must be >= 0")
    if args.eta < 0:
        problems.append(f"--eta {args.eta} must be >= 0")
    if args.resolution % 8:
        problems.append(f"--resolution {args.resolution} must be a multiple of 8")
    if args.mixed_precision not in ("fp16", "bf16", "no"):
        problems.append(f"--mixed-precision {args.mixed_precision} must be fp16, bf16 or no")
    if args.report_to not in ("none", "tensorboard", "wandb"):
        problems.append(f"--report-to {args.report_to} must be none, tensorboard or wandb")
    elif args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        problems.append(
            f"--report-to {args.report_to} needs the {args.report_to} package: pip install {args.report_to}"
        )
    if args.learning_rate <= 0:
        problems.append(f"--learning-rate {args.learning_rate} must be > 0")
    if not all(0 <= beta < 1 for beta in args.adam_betas):
        problems.append(f"--adam-betas {' '.join(map(str, args.adam_betas))} must both be in [0, 1)")
    if args.weight_decay < 0:
        problems.append(f"--weight-decay {args.weight_decay} must be >= 0")
    if args.max_grad_norm <= 0:
        problems.append(f"--max-grad-norm {args.max_grad_norm} must be > 0 (the norm the gradient is clipped to)")
    problems.append(divisibility_problem(args, "samples_per_update", "train_batch_size", num_processes))
    return [problem for problem in problems if problem]


def diffexp_flag_problems(args):
    """The problems of DiffExp's flags: DiffExp Eq. 7's threshold, DiffExp Eq. 8's range, the exploring fraction."""
    problems = []
    if not 0 <= args.t_thres < 1000:
        problems.append(f"--t-thres {args.t_thres} must be in [0, 1000)")
    low, high = args.prompt_weight_range
    if low > high:
        problems.append(f"--prompt-weight-range {low} {high} is inverted (low > high)")
    if not 0 <= args.explore_fraction <= 1:
        problems.append(f"--explore-fraction {args.explore_fraction} must be in [0, 1]")
    return problems


def method_flag_problems(args, num_processes):
    """The problems of this script's own flags (the shared ones hold: no batch size is 0)."""
    problems = diffexp_flag_problems(args)
    if args.eta <= 0:
        problems.append(f"--eta {args.eta} must be > 0: the policy's log-probability needs sigma_t > 0")
    problems.append(divisibility_problem(args, "samples_per_epoch", "sample_batch_size", num_processes))
    problems.append(divisibility_problem(args, "samples_per_epoch", "samples_per_update"))
    if not 0 < args.timestep_fraction <= 1:
        problems.append(f"--timestep-fraction {args.timestep_fraction} must be in (0, 1]")
    if args.clip_range <= 0:
        problems.append(f"--clip-range {args.clip_range} must be > 0")
    if args.advantage_clip <= 0:
        problems.append(f"--advantage-clip {args.advantage_clip} must be > 0")
    if args.backward_passes_per_update < 0:
        problems.append(f"--backward-passes-per-update {args.backward_passes_per_update} must be >= 0")
    elif args.backward_passes_per_update and not any(problems):
        # every optimiser step must see all processes' backward passes: the epoch's count must divide by M
        per_epoch = args.samples_per_epoch // (args.train_batch_size * num_processes) * trained_steps_per_sample(args)
        if per_epoch % args.backward_passes_per_update:
            problems.append(
                f"--backward-passes-per-update {args.backward_passes_per_update} does not divide the epoch's "
                f"{per_epoch} backward passes per process (samples per process / --train-batch-size x trained steps)"
            )
    counts = ("inner_epochs", "stat_buffer_size", "stat_min_count")
    problems += [f"{flag(name)} {getattr(args, name)} must be >= 1" for name in counts if getattr(args, name) < 1]
    return [problem for problem in problems if problem]


def trained_steps_per_sample(args):
    """K: how many of each trajectory's T steps an epoch trains (--timestep-fraction of them, at least 1)."""
    return max(1, int(args.num_steps * args.timestep_fraction))


def check_args(args, num_processes):
    """One line and exit for bad input, before any model loads: the shared flags' problems, then the method's."""
    problems = shared_flag_problems(args, num_processes)
    problems = problems or method_flag_problems(args, num_processes)  # the method's checks assume the shared ones
    if problems:
        raise SystemExit("error: " + "; ".join(problems))


# flags that may change when a run is resumed: how often it evaluates, saves and reports, and where it is; every
# other flag defines the experiment, and a resumed run that changed one would silently continue a different one.
# --epochs too: DiffExp explores in its first 3/4 and B2-DiffuRL's stage schedule follows it
SAFE_TO_CHANGE_ON_RESUME = ("eval_every", "save_every", "report_to", "resume", "output_dir", "run_name")


def default_run_name(args, num_processes):
    """The run folder's name when --run-name is not given: the script, the preset (none for the defaults), the flags
    that define the run beyond the preset's, the process count (if > 1: each process draws its own numbers) and the
    seed, e.g. ddpo_diffexp_diffexp-fig4a_no-diffexp_seed0.

    Two commands that train different runs get different names; the same command with --resume, or with another of
    the SAFE_TO_CHANGE_ON_RESUME flags, gets the same one. A flag that the others imply is left out (--diffexp turns
    on --dynamic-cfg and --prompt-weighting). A name over 100 characters is cut, and ends with a hash of the whole.
    """

    def words(name, value):  # a flag as typed: --diffexp, --no-diffexp, --model tiny, --adam-betas 0.9 0.999
        if isinstance(value, bool):
            return [flag(name) if value else "--no-" + flag(name)[2:]]
        return [flag(name), *map(str, value if isinstance(value, tuple) else [value])]

    preset = ["--preset", args.preset] if args.preset else []
    defining = [field.name for field in fields(args) if field.name not in SAFE_TO_CHANGE_ON_RESUME]
    defining = [name for name in defining if name not in ("preset", "seed")]  # named on their own

    def differences(names):  # the defining fields in which `--preset P --<name> <value> ...` differs from args
        again = parse_args(preset + [word for name in names for word in words(name, getattr(args, name))])
        return [name for name in defining if getattr(again, name) != getattr(args, name)]

    changed = differences([])  # the flags whose values differ from the preset's
    while extra := [name for name in differences(changed) if name not in changed]:  # an implication overridden:
        changed = [name for name in defining if name in changed + extra]  # --diffexp --no-dynamic-cfg
    for name in list(changed):  # leave out a flag that the others imply: --diffexp --dynamic-cfg is --diffexp
        if not differences([other for other in changed if other != name]):
            changed.remove(name)
    parts = [os.path.splitext(os.path.basename(__file__))[0]] + ([args.preset] if args.preset else [])
    for name in changed:
        value = getattr(args, name)
        if isinstance(value, bool):
            parts.append(words(name, value)[0][2:])  # diffexp, no-diffexp
        else:
            parts.append(f"{flag(name)[2:]}={'-'.join(words(name, value)[1:])}")  # reward=pickscore
    parts += [f"{num_processes}processes"] if num_processes > 1 else []
    body = re.sub(r"[^A-Za-z0-9._=+-]+", "-", "_".join(parts).replace("*", "x"))  # 2*a+b: 2xa+b; a/b: a-b
    name = f"{body}_seed{args.seed}"
    if len(name) > 100:
        tail = f"_{hashlib.sha1(name.encode()).hexdigest()[:8]}_seed{args.seed}"
        name = body[: 100 - len(tail)] + tail
    return name


def checkpoint_folders(run_dir):
    """The run's complete checkpoint folders, oldest first (a `.tmp` folder is a write that did not finish)."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted(n for n in os.listdir(folder) if n.startswith("epoch_")) if os.path.isdir(folder) else []
    return [os.path.join(folder, name) for name in names if not name.endswith(".tmp")]


def load_last_checkpoint(run_dir, accelerator):
    """(folder, training state) of the newest checkpoint that loads, or (None, {}) if none does.

    A checkpoint that does not load (a truncated or corrupt file) is skipped, with a warning, for the one before it.
    """
    from safetensors.torch import load_file

    for folder in reversed(checkpoint_folders(run_dir)):
        try:
            state = torch.load(os.path.join(folder, "training_state.pt"), map_location="cpu", weights_only=False)
            load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))  # what load_lora_weights reads
            return folder, state
        except Exception as error:  # EOFError, UnpicklingError, RuntimeError, SafetensorError, OSError
            accelerator.print(
                f"warning: checkpoint {folder} does not load ({first_line(error)}); trying the one before it"
            )
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
    changed = [
        f"{flag(name)} {given.get(name)} (was {saved.get(name)})"
        for name in sorted(set(saved) | set(given))
        if name not in SAFE_TO_CHANGE_ON_RESUME and saved.get(name) != given.get(name)
    ]
    if changed:
        safe = ", ".join(flag(name) for name in SAFE_TO_CHANGE_ON_RESUME[:3])
        raise SystemExit(
            f"error: --resume with other flags than {run_dir}: {'; '.join(changed)} (only {safe} may change)"
        )


def process_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def lock_run(path):
    """Hold the lock file `path` (created atomically, holding this pid) until this process exits.

    A live holder stops this run with one line; a lock whose process is gone (killed with -9) is taken over.
    """
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = int(f.read().strip() or 0)
            except (OSError, ValueError):  # being written this instant, or unreadable: look again
                holder = 0
            if holder and process_alive(holder):
                raise SystemExit(f"error: {path} is held by process {holder}, which is running this folder already")
            if holder:  # stale: its process is gone
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
            else:
                time.sleep(0.1)
            continue
        with os.fdopen(descriptor, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: os.path.exists(path) and os.remove(path))
        return
    raise SystemExit(f"error: cannot take the lock {path}; remove it if no run of this folder is going on")


def keep_lines_before(path, epoch):
    """Drop log lines of epochs that a resumed run redoes, so that every epoch is logged once."""
    if os.path.exists(path):
        with open(path) as f:
            lines = [line for line in f if json.loads(line)["epoch"] < epoch]
        with open(path, "w") as f:
            f.writelines(lines)


def append_jsonl(path, record):
    """Append `record` as one line of JSON; a NaN or infinite number is written as null (bare NaN is not JSON)."""

    def finite_or_none(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return [finite_or_none(v) for v in value] if isinstance(value, (list, tuple)) else value

    with open(path, "a") as f:
        f.write(json.dumps({key: finite_or_none(value) for key, value in record.items()}, allow_nan=False) + "\n")


def report(accelerator, values, step, grids=None):
    """Send the finite numbers of `values` (and the PIL images of `grids`, {tag: image}) to the --report-to
    trackers at `step` (the epoch); the .jsonl files stay the record. Nothing without a tracker."""
    if not accelerator.trackers:
        return
    numbers = {key: value for key, value in values.items() if isinstance(value, (int, float)) and math.isfinite(value)}
    accelerator.log(numbers, step=step)
    for tracker in accelerator.trackers:
        for tag, grid in (grids or {}).items():
            image = np.asarray(grid)[None]  # (1, H, W, 3) uint8
            options = {"dataformats": "NHWC"} if tracker.name == "tensorboard" else {}
            tracker.log_images({tag: image}, step=step, **options)


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
    Returns (x_{t-1} in latents' dtype, log_prob (B,) fp32). Assumes an epsilon-predicting model and a scheduler
    without sample clipping or thresholding (SD 1.x's DDIM config).
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
    # 7. Gaussian log-density, averaged over the C*H*W latent elements (DDPO's code: a sum overflows the ratio)
    log_prob = (
        -((prev_sample.float() - mean) ** 2) / (2 * std_dev**2) - torch.log(std_dev) - math.log(math.sqrt(2 * math.pi))
    )
    return prev_sample, log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@torch.no_grad()
def sample_trajectories(pipeline, unet, prompt_embeds, null_embeds, guidance_scales, latents, eta, generator):
    """Run the policy from x_T to x_0, keeping every latent and log-prob.

    prompt_embeds (B, L, D); guidance_scales (B, T), the scale that samples each step; latents x_T (B, 4, h, w).
    Returns the trajectory (B, T + 1, 4, h, w), log_probs (B, T) and the decoded images (B, 3, H, W) in [0, 1].
    """
    scheduler = pipeline.scheduler
    trajectory, log_probs = [latents], []
    for step, t in enumerate(scheduler.timesteps):
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


def score_in_batches(reward_fn, images, prompts, batch_size):
    """(rewards (S,), {member: (S,)}) of images (S, 3, H, W), batch_size at a time (the reward models' memory)."""
    scored = [
        score_images(reward_fn, images[i : i + batch_size], prompts[i : i + batch_size])
        for i in range(0, len(prompts), batch_size)
    ]
    rewards = torch.cat([batch_rewards for batch_rewards, _ in scored])
    return rewards, {name: torch.cat([members[name] for _, members in scored]) for name in scored[0][1]}


def member_reward_means(accelerator, member_rewards):
    """{"reward_<member>_mean": the mean over every process's samples} of an ensemble's members ({} for one reward)."""
    return {
        f"reward_{name}_mean": float(accelerator.gather(values.detach().float().to(accelerator.device)).mean())
        for name, values in member_rewards.items()
    }


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


def clipped_policy_loss(log_prob, log_prob_old, advantages, clip_range, advantage_clip):
    """DDPO-IS / PPO clipped surrogate for one timestep of a batch; returns (loss, approx_kl, clipfrac).

    ratio = p_theta(x_{t-1} | x_t, c) / p_old(x_{t-1} | x_t, c) = exp(log_prob - log_prob_old)
    loss = mean(max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))), A = clip(advantage, -5, 5)
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
        _, _, images = sample_trajectories(
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


def save_checkpoint(folder, unet, optimizer, state):
    """Write the LoRA (diffusers format) and the training state, atomically: a crash or a full disk leaves the
    previous checkpoint whole and no partial folder behind."""
    from peft.utils import get_peft_model_state_dict

    temporary = folder + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        os.makedirs(temporary)
        save_lora(unet, temporary)
        training_state = dict(state, lora=get_peft_model_state_dict(unet), optimizer=optimizer.state_dict())
        scaler = getattr(optimizer, "scaler", None)  # accelerate's under fp16 (a GPU), else None
        if scaler is not None:  # fp16's loss scale: a resumed run must not restart it at 2^16
            training_state["scaler"] = scaler.state_dict()
        torch.save(training_state, os.path.join(temporary, "training_state.pt"))
        os.replace(temporary, folder)
    except OSError as error:  # ENOSPC (disk full), EDQUOT, EIO, ...
        shutil.rmtree(temporary, ignore_errors=True)
        print(
            f"error: cannot write {folder} ({error.strerror or error}); the previous checkpoint is intact",
            file=sys.stderr,
        )
        raise SystemExit(1)


def run_summary(run_dir, seconds):
    """The line a run ends with: the evaluation reward at the first and the last evaluation, the best one, and
    where the sample grids and the LoRA checkpoints are."""
    path = os.path.join(run_dir, "eval.jsonl")
    lines = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    where = f"grids in {os.path.join(run_dir, 'samples')}, LoRA in {os.path.join(run_dir, 'checkpoints')}"
    if not lines:
        return f"done in {seconds:.0f} s (no evaluation); {where}"
    first, last = lines[0], lines[-1]
    best = max(lines, key=lambda line: line["seen_reward_mean"])
    error = ""
    if "seen_images" in last:  # the standard error of one evaluation's mean, std / sqrt(n): how far apart is apart
        error = f", each +- {last['seen_reward_std'] / math.sqrt(last['seen_images']):.2g} (standard error)"
    unseen = ""
    if "unseen_reward_mean" in last:
        unseen = f"; unseen {first['unseen_reward_mean']:.4g} -> {last['unseen_reward_mean']:.4g}"
    return (
        f"done in {seconds:.0f} s: seen {last['eval_reward']} reward {first['seen_reward_mean']:.4g} (epoch "
        f"{first['epoch']}) -> {last['seen_reward_mean']:.4g} (epoch {last['epoch']}), best "
        f"{best['seen_reward_mean']:.4g} (epoch {best['epoch']}){error}{unseen}; {where}"
    )


def main(args):
    # ======================================================================================================
    # 1. Setup: processes, models, LoRA, optimiser, resume
    # ======================================================================================================
    # Every flag is checked before anything is built: Accelerator(...) would meet `--report-to tensorbaord` or
    # `--mixed-precision bf` with a traceback. The process count comes from WORLD_SIZE, which the launchers set in
    # each process (accelerate launch through torchrun); a plain `python script.py` is one process.
    run_start = time.time()
    num_processes = int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, num_processes)
    # without CUDA, cpu=True makes a multi-process launch (accelerate launch --multi_gpu, torchrun) use gloo on CPU;
    # a CPU runs bf16 (weights and autocast) but not fp16, which falls back to fp32 there
    on_gpu = torch.cuda.is_available()
    mixed_precision = args.mixed_precision if on_gpu or args.mixed_precision == "bf16" else "no"
    log_with = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        mixed_precision=mixed_precision, cpu=not on_gpu, log_with=log_with, project_dir=args.output_dir
    )
    if accelerator.num_processes != num_processes:  # mpirun counts its processes in its own variables (PMI_SIZE)
        check_args(args, accelerator.num_processes)
    # progress bars on the main process in a terminal only: written to a file (nohup, a batch system's log) every
    # redraw of a bar stays in it, hundreds of fragments; there the log is the epoch and evaluation lines (tqdm.write)
    progress_bars = accelerator.is_main_process and sys.stderr.isatty()
    if not progress_bars:
        disable_library_progress_bars()  # the models' loading and download bars too
    script = os.path.splitext(os.path.basename(__file__))[0]
    run_name = args.run_name or default_run_name(args, accelerator.num_processes)
    run_dir = os.path.join(args.output_dir, run_name)
    # The run folder is only read until the models have loaded: a start that fails (a bad model id, no network)
    # writes nothing, so its corrected rerun starts as if it had never happened.
    checkpoint, state = load_last_checkpoint(run_dir, accelerator) if args.resume else (None, {})
    if args.resume:
        check_resume(args, run_dir, checkpoint)
        if state["epoch"] >= args.epochs:  # a finished run resumes as a no-op and changes no file
            accelerator.print(f"{run_dir} is complete ({state['epoch']} of {args.epochs} epochs); nothing to do")
            return
    start_epoch = state.get("epoch", 0)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[accelerator.mixed_precision]
    train_prompts = load_prompts(args.prompts)
    unseen_name = args.eval_unseen_prompts or unseen_twin(args.prompts)
    eval_sets = {"seen": train_prompts} | ({"unseen": load_prompts(unseen_name)} if unseen_name else {})

    pipeline = load_pipeline(args.model, accelerator.device, weight_dtype)
    reward_dtype = weight_dtype if args.half_precision_rewards else torch.float32  # fp32 unless asked
    reward_fn = load_reward(args.reward, accelerator.device, reward_dtype, tiny=args.tiny, shapes=args.shapes)
    eval_reward = args.eval_reward or args.reward
    eval_reward_fn = (
        reward_fn
        if eval_reward == args.reward
        else load_reward(eval_reward, accelerator.device, reward_dtype, tiny=args.tiny, shapes=args.shapes)
    )
    if not args.resume and checkpoint_folders(run_dir):  # after the loads: a bad --model or reward is named first
        raise SystemExit(f"error: {run_dir} has checkpoints; pass --resume to continue it or choose another --run-name")
    accelerator.wait_for_everyone()  # every process has checked the folder and loaded its models
    if accelerator.is_main_process:
        os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
        lock_run(os.path.join(run_dir, "run.lock"))  # one process writes this folder at a time
        for log in ("metrics.jsonl", "eval.jsonl"):  # drop the epochs this run redoes (all, on a fresh start)
            keep_lines_before(os.path.join(run_dir, log), start_epoch)
        if not args.resume:
            with open(os.path.join(run_dir, "args.json"), "w") as f:
                json.dump(asdict(args), f, indent=2)
    if args.report_to != "none":  # tensorboard writes into runs/<run_name>/; wandb logs run <run_name> of <script>
        project = run_name if args.report_to == "tensorboard" else script
        accelerator.init_trackers(project, init_kwargs={"wandb": {"config": asdict(args), "name": run_name}})
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
    if checkpoint is not None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(pipeline.unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])
        accelerator.print(f"resumed from {checkpoint} at epoch {start_epoch}")
    # DDP over the UNet: the LoRA gradients are all-reduced (averaged) across processes at every optimiser step.
    unet, optimizer = accelerator.prepare(pipeline.unet, optimizer)
    samples_per_process = args.samples_per_epoch // accelerator.num_processes
    micro_batches_per_update = args.samples_per_update // (args.train_batch_size * accelerator.num_processes)
    skipped_in_a_row = state.get("skipped_in_a_row", 0)  # optimiser steps the fp16 loss scaler skipped in a row

    # Method-specific setup
    # per-prompt reward buffers of the advantage normalisation (deviation 3), restored on resume
    reward_history = {p: deque(r, maxlen=args.stat_buffer_size) for p, r in state.get("reward_history", {}).items()}
    trained_steps = trained_steps_per_sample(args)  # K

    for epoch in tqdm(
        range(start_epoch, args.epochs),
        desc="epochs",
        initial=start_epoch,
        total=args.epochs,
        disable=not progress_bars,
    ):
        epoch_start = time.time()
        # torch's global RNG, for anything not drawn from `generator`
        torch.manual_seed(epoch_seed(args.seed, epoch, accelerator.process_index))
        if epoch % args.eval_every == 0:
            run_evaluation(
                args, accelerator, pipeline, unet, eval_reward_fn, eval_sets, null_embeds, latent_shape, run_dir, epoch
            )

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
        for _ in tqdm(
            range(samples_per_process // args.sample_batch_size),
            desc="sampling",
            leave=False,
            disable=not progress_bars,
        ):
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
            trajectory, log_probs, images = sample_trajectories(
                pipeline, unet, prompt_embeds, null_embeds, guidance_scales, latents, args.eta, generator
            )
            # Store exactly what sampled each step (its c and w): training must recompute THAT policy.
            batches.append(
                dict(
                    prompts=prompts,
                    prompt_embeds=prompt_embeds,
                    guidance_scales=guidance_scales,
                    trajectory=trajectory,
                    log_probs=log_probs,
                    images=images,
                )
            )
        prompts = [p for batch in batches for p in batch["prompts"]]
        samples = {
            key: torch.cat([batch[key] for batch in batches])
            for key in ("prompt_embeds", "guidance_scales", "trajectory", "log_probs", "images")
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
        # 4. Advantage and loss: per-prompt normalised rewards A; the clipped loss is clipped_policy_loss
        # ==================================================================================================
        all_advantages = per_prompt_advantages(
            all_prompts, all_rewards, reward_history, args.stat_buffer_size, args.stat_min_count
        )
        # every process computed the same advantages; keep this process's slice (gather order = process order)
        advantages = torch.tensor(all_advantages, dtype=torch.float32).reshape(accelerator.num_processes, -1)[
            accelerator.process_index
        ]

        # ==================================================================================================
        # 5. Update: DDPO-IS (DiffExp Eq. 6) over the sampled timesteps, accumulated over samples_per_update
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
            for micro_index in tqdm(range(micro_batches), desc="training", leave=False, disable=not progress_bars):
                slots = slice(micro_index * args.train_batch_size, (micro_index + 1) * args.train_batch_size)
                rows = order[slots]  # (b,)
                steps = step_orders[rows]  # (b, K)
                x_t = samples["trajectory"][rows[:, None], steps]  # (b, K, 4, h, w)
                x_prev = samples["trajectory"][rows[:, None], steps + 1]  # (b, K, 4, h, w)
                log_prob_old = samples["log_probs"][rows[:, None], steps]  # (b, K)
                scales = samples["guidance_scales"][rows[:, None], steps]  # (b, K)
                prompt_embeds = samples["prompt_embeds"][rows]  # (b, L, D)
                step_timesteps = timesteps[steps.to(timesteps.device)]  # (b, K)
                row_advantages = advantages[rows].to(accelerator.device)  # A, one per sample: (b,)
                for k in range(trained_steps):
                    backward_index += 1
                    ends_update = backward_index % backwards_per_update == 0
                    # gradients accumulate locally; DDP all-reduces only on the backward that ends an update
                    with nullcontext() if ends_update else accelerator.no_sync(unet):
                        noise_pred = guided_noise_prediction(
                            unet, x_t[:, k], step_timesteps[:, k], prompt_embeds, null_embeds, scales[:, k]
                        )
                        _, log_prob = ddim_step_with_logprob(
                            pipeline.scheduler,
                            noise_pred,
                            step_timesteps[:, k],
                            x_t[:, k],
                            args.eta,
                            prev_sample=x_prev[:, k],
                        )
                        loss, approx_kl, clipfrac = clipped_policy_loss(
                            log_prob, log_prob_old[:, k], row_advantages, args.clip_range, args.advantage_clip
                        )
                        # DiffExp Eq. 6: d loss = -A d ratio = -A ratio d log p (ratio ~ 1); the update's gradient is
                        # the mean over its backward passes (its samples' trained timesteps)
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
        statistics = torch.tensor(
            [np.mean(losses), np.mean(approx_kls), np.mean(clipfracs), *grad_norm_summary(grad_norms)],
            device=accelerator.device,
        )
        loss_mean, approx_kl_mean, clipfrac_mean, grad_norm_mean, skipped_steps = (
            accelerator.gather(statistics).view(-1, 5).mean(0).tolist()
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
        if accelerator.num_processes > 1:  # every replica must hold the same LoRA after the all-reduced updates
            metrics["lora_sum_per_process"] = accelerator.gather(
                torch.stack([p.detach().double().sum() for p in lora_parameters]).sum()[None]
            ).tolist()
        if accelerator.is_main_process:
            append_jsonl(os.path.join(run_dir, "metrics.jsonl"), metrics)
            report(accelerator, {f"train/{key}": value for key, value in metrics.items()}, epoch)
            tqdm.write(
                f"epoch {epoch}: reward {metrics['reward_mean']:.4g} +- {metrics['reward_std']:.3g}, "
                f"loss {loss_mean:.3g}, kl {approx_kl_mean:.2e}, clipfrac {clipfrac_mean:.2f}"
            )
        last_epoch = epoch + 1 == args.epochs
        if last_epoch:
            run_evaluation(
                args,
                accelerator,
                pipeline,
                unet,
                eval_reward_fn,
                eval_sets,
                null_embeds,
                latent_shape,
                run_dir,
                epoch + 1,
            )
        if (epoch + 1) % args.save_every == 0 or last_epoch:
            if accelerator.is_main_process:
                history = {p: list(r) for p, r in reward_history.items()}
                save_checkpoint(
                    os.path.join(run_dir, "checkpoints", f"epoch_{epoch + 1:04d}"),
                    accelerator.unwrap_model(unet),
                    optimizer,
                    dict(epoch=epoch + 1, reward_history=history, skipped_in_a_row=skipped_in_a_row),
                )
            accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        print(run_summary(run_dir, time.time() - run_start))


if __name__ == "__main__":
    try:
        main(parse_args())
    except SystemExit as stop:  # bad input, or a model or folder that cannot be used: one "error:" line, code 2
        if not isinstance(stop.code, str):
            raise
        print(stop.code, file=sys.stderr)
        sys.exit(2)
