"""How many network calls an epoch makes: formulas read off the scripts' code, and a counter that checks them.

The formulas (`ddpo_epoch`, `alignprop_epoch`, `b2_stage`, `evaluation`) count, for ONE process (with P
processes every count below is the total over all processes: the batches are split, not repeated):

- `unet_calls`: calls of the UNet. Every guided prediction is ONE call on a doubled batch (the unconditional
  and the conditional rows, `common.guided_noise_prediction`); `unet_rows` counts the rows those calls
  process, and `sample_evals` the (sample, step) guided predictions (= unet_rows / 2). Training forwards are
  included in `unet_calls`; `unet_grad_calls` says how many of them keep a graph.
- `unet_backward`: backward passes through a UNet call (one per training forward that receives a gradient).
- `vae_decode`, `vae_backward`, `reward_calls`, `reward_backward`, `text_encoder_calls`: the other networks.

`count_calls(module)` patches the network classes of one process and counts what really runs; `--micro-check`
runs each script's own `main()` on a micro configuration under it and prints measured and predicted counts
as JSON (tests/test_benchmarks.py compares them). Usage:

    python benchmarks/call_counts.py                # the per-epoch table at the scripts' paper settings
    python benchmarks/call_counts.py --micro-check  # lines "COUNTS {case, measured, predicted}" (JSON)
"""

import contextlib
import json
import math
import os
import sys
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

KEYS = (
    "unet_calls",
    "unet_grad_calls",
    "unet_rows",
    "sample_evals",
    "unet_backward",
    "vae_decode",
    "vae_backward",
    "reward_calls",
    "reward_backward",
    "text_encoder_calls",
)


def _counts(**values):
    counts = Counter({key: 0 for key in KEYS})
    counts.update(values)
    return counts


# ----------------------------------------------------------------------------------------------------------
# Formulas, one per script, with the script's own variable names
# ----------------------------------------------------------------------------------------------------------


def ddpo_epoch(args):
    """ddpo_diffexp.py and ddpo_coca.py, one epoch without evaluation (sections 2 and 5 of main()).

    Sampling: N / B batches, each one text-encoder call, T guided UNet calls on 2B rows, one VAE decode, one
    reward call. Training: inner_epochs x N / b micro-batches, each trained_steps = int(T x timestep_fraction)
    guided UNet forwards on 2b rows with a backward each.
    """
    batches = args.samples_per_epoch // args.sample_batch_size
    micro_batches = args.inner_epochs * args.samples_per_epoch // args.train_batch_size
    trained_steps = max(1, int(args.num_steps * args.timestep_fraction))
    train_calls = micro_batches * trained_steps
    return _counts(
        unet_calls=batches * args.num_steps + train_calls,
        unet_grad_calls=train_calls,
        unet_rows=2 * args.samples_per_epoch * args.num_steps + 2 * args.train_batch_size * train_calls,
        sample_evals=args.samples_per_epoch * args.num_steps + args.train_batch_size * train_calls,
        unet_backward=train_calls,
        vae_decode=batches,
        reward_calls=batches,
        text_encoder_calls=batches,
    )


def alignprop_epoch(args, batch_grad_steps=None):
    """alignprop_diffexp.py, one epoch without evaluation (sections 2-5 of main(), batch by batch).

    N / b batches of b trajectories. A batch runs a step without grad when none of its trajectories keeps that
    step's graph, and gradient-checkpointed otherwise (K per batch: K for --truncation fixed): a checkpointed UNet
    call runs forward once while sampling and once more in backward (recomputation), and has one backward. Then
    one VAE decode and one reward call, both with a backward. `batch_grad_steps` lists the checkpointed steps of
    each batch for --truncation per_step / gaussian (data-dependent; `expected_min_start` and T / 2 are means).
    """
    batches = args.samples_per_epoch // args.train_batch_size
    if batch_grad_steps is None:
        batch_grad_steps = [args.grad_steps] * batches
    grad_calls = sum(batch_grad_steps)  # checkpointed steps over all batches
    calls = batches * args.num_steps + grad_calls  # + one recomputation per checkpointed step
    return _counts(
        unet_calls=calls,
        unet_grad_calls=2 * grad_calls,
        unet_rows=2 * args.train_batch_size * calls,
        sample_evals=args.train_batch_size * calls,
        unet_backward=grad_calls,
        vae_decode=batches,
        vae_backward=batches,
        reward_calls=batches,
        reward_backward=batches,
        text_encoder_calls=batches,
    )


def truncation_start_distribution(num_steps):
    """P(start = j), j = 0 .. T - 1, of `truncation_starts` with --truncation gaussian.

    start = int(N(0.84 T, (0.1 T)^2)), redrawn until it is in [1, T - 1].
    """
    mean, std = 0.84 * num_steps, 0.1 * num_steps

    def cdf(x):
        return 0.5 * (1 + math.erf((x - mean) / (std * math.sqrt(2))))

    weights = [0.0] + [cdf(j + 1) - cdf(j) for j in range(1, num_steps)]  # int() = floor for x >= 1
    total = sum(weights)
    return [w / total for w in weights]


def expected_min_start(num_steps, batch_size):
    """E[min of batch_size independent truncation starts]: the first checkpointed step of a batch."""
    probabilities = truncation_start_distribution(num_steps)

    def survival(j):
        return sum(probabilities[j:])  # P(start >= j)

    return sum(survival(j) ** batch_size for j in range(1, num_steps))  # E[min] = sum_{j >= 1} P(min >= j)


def b2_stage(args, stage, kept):
    """b2_diffurl.py, one stage without evaluation; `kept` = the kept trajectories of the stage (data-dependent).

    Sampling: N / B batches of G = B / n prefixes (n branches, 1 with --no-branch): T UNet calls each, the first
    branch_step on 2G rows, the rest on 2B rows; one text-encoder call (G prompts), one VAE decode and one reward
    call per batch. Training: inner_epochs x ceil(kept / b) micro-batches, each tau guided UNet forwards on 2b
    rows (padding rows included) with a backward each; tau = split_step(stage) grows with the stage.
    """
    import b2_diffurl

    first_interval = b2_diffurl.first_interval_steps(args.num_steps, args.first_interval_fraction)
    tau = args.num_steps if args.no_bpt else b2_diffurl.split_step(stage, args.epochs, args.num_steps, first_interval)
    branch_step = args.num_steps - first_interval if args.no_bpt else args.num_steps - tau
    branches = 1 if args.no_branch else args.num_branches
    batches = args.samples_per_epoch // args.sample_batch_size
    prefixes = args.sample_batch_size // branches
    per_batch_evals = prefixes * branch_step + args.sample_batch_size * (args.num_steps - branch_step)
    train_calls = args.inner_epochs * math.ceil(kept / args.train_batch_size) * tau
    return _counts(
        unet_calls=batches * args.num_steps + train_calls,
        unet_grad_calls=train_calls,
        unet_rows=2 * batches * per_batch_evals + 2 * args.train_batch_size * train_calls,
        sample_evals=batches * per_batch_evals + args.train_batch_size * train_calls,
        unet_backward=train_calls,
        vae_decode=batches,
        reward_calls=batches,
        text_encoder_calls=batches,
    )


def evaluation(args, set_sizes):
    """One evaluation (`evaluate` per prompt set): E images per prompt, batches of sample_batch_size, no grad."""
    counts = _counts()
    for size in set_sizes:
        jobs = size * args.eval_images_per_prompt
        batches = math.ceil(jobs / args.sample_batch_size)
        counts += _counts(
            unet_calls=batches * args.num_steps,
            unet_rows=2 * jobs * args.num_steps,
            sample_evals=jobs * args.num_steps,
            vae_decode=batches,
            reward_calls=batches,
            text_encoder_calls=batches,
        )
    return counts


def evaluations_per_run(args):
    """Evaluations of a run: before every eval_every-th epoch (epoch 0 included) and after the last."""
    return len(range(0, args.epochs, args.eval_every)) + 1


# ----------------------------------------------------------------------------------------------------------
# Counting what really runs
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_calls(module):
    """Count the network calls of `module`'s main() by phase ("train" or "eval"): yields {phase: Counter}.

    Patches, for the duration: UNet2DConditionModel.forward and AutoencoderKL.decode (class level, so LoRA /
    accelerate wrappers still go through them), `module.encode_prompts` (the pipeline's text encoder; the CLIP
    rewards call their own text tower), `module.load_reward` (to wrap the reward it returns) and
    `module.run_evaluation` (to switch the phase). A backward is counted by a hook on
    the output tensor, which fires once when the gradient reaches that call's output.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    counts = {"train": Counter(), "eval": Counter()}
    phase = ["train"]

    def count(key, amount=1):
        counts[phase[0]][key] += amount

    def count_backward(tensor, key):
        if torch.is_grad_enabled() and tensor.requires_grad:
            current = phase[0]
            tensor.register_hook(lambda grad: counts[current].update({key: 1}))

    unet_forward, vae_decode = UNet2DConditionModel.forward, AutoencoderKL.decode
    encode_prompts, load_reward, run_evaluation = module.encode_prompts, module.load_reward, module.run_evaluation

    def counted_unet(self, sample, *args, **kwargs):
        output = unet_forward(self, sample, *args, **kwargs)
        count("unet_calls"), count("unet_rows", sample.shape[0]), count("sample_evals", sample.shape[0] // 2)
        result = output[0] if isinstance(output, tuple) else output.sample
        if torch.is_grad_enabled() and result.requires_grad:
            count("unet_grad_calls")
        count_backward(result, "unet_backward")
        return output

    def counted_decode(self, z, *args, **kwargs):
        output = vae_decode(self, z, *args, **kwargs)
        count("vae_decode")
        count_backward(output[0] if isinstance(output, tuple) else output.sample, "vae_backward")
        return output

    def counted_encode_prompts(*args, **kwargs):
        count("text_encoder_calls")
        return encode_prompts(*args, **kwargs)

    def counted_load_reward(*args, **kwargs):
        reward = load_reward(*args, **kwargs)
        forward = reward.forward

        def counted_forward(images, prompts):
            output = forward(images, prompts)
            count("reward_calls")
            count_backward(output, "reward_backward")
            return output

        reward.forward = counted_forward
        return reward

    def counted_evaluation(*args, **kwargs):
        phase[0] = "eval"
        try:
            return run_evaluation(*args, **kwargs)
        finally:
            phase[0] = "train"

    UNet2DConditionModel.forward, AutoencoderKL.decode = counted_unet, counted_decode
    module.encode_prompts, module.load_reward, module.run_evaluation = (
        counted_encode_prompts,
        counted_load_reward,
        counted_evaluation,
    )
    try:
        yield counts
    finally:
        UNet2DConditionModel.forward, AutoencoderKL.decode = unet_forward, vae_decode
        module.encode_prompts, module.load_reward, module.run_evaluation = encode_prompts, load_reward, run_evaluation


# ----------------------------------------------------------------------------------------------------------
# The check: each script's main() on a micro configuration, counted, against the formulas
# ----------------------------------------------------------------------------------------------------------

# one epoch of tests/conftest.py's micro run: 4 steps, 8 samples in batches of 4, 6 prompts, 1 image each
MICRO_FLAGS = (
    "--tiny --num-steps 4 --samples-per-epoch 8 --sample-batch-size 4 --train-batch-size 4 --samples-per-update 4 "
    "--eval-every 1 --eval-images-per-prompt 1 --save-every 1 --prompts unseen_animals "
    "--eval-unseen-prompts unseen_animals --epochs 1"
).split()
MICRO_CASES = {
    "ddpo_diffexp": ("ddpo_diffexp", ["--diffexp"]),
    "alignprop_diffexp": ("alignprop_diffexp", ["--reward", "aesthetic", "--diffexp"]),  # --truncation per_step
    "alignprop_diffexp --truncation fixed": (
        "alignprop_diffexp",
        ["--reward", "aesthetic", "--truncation", "fixed", "--grad-steps", "2", "--diffexp"],
    ),
    "alignprop_diffexp --truncation gaussian": (
        "alignprop_diffexp",
        ["--reward", "aesthetic", "--truncation", "gaussian"],
    ),
    "b2_diffurl": (
        "b2_diffurl",
        ["--epochs", "2", "--eval-every", "2", "--train-batch-size", "2", "--samples-per-update", "2"],
    ),
    "ddpo_coca": ("ddpo_coca", ["--similarity-window", "2"]),
}


def predicted_run_counts(module, args, metrics, batch_grad_steps):
    """Formula counts of a whole run of `module` with `args`: {"train": ..., "eval": ...}."""
    from common import load_prompts

    unseen = args.eval_unseen_prompts
    set_sizes = [len(load_prompts(args.prompts))] + ([len(load_prompts(unseen))] if unseen else [])
    train = _counts(text_encoder_calls=1)  # c_null, once at setup
    for epoch in range(args.epochs):
        if module.__name__ == "alignprop_diffexp":
            batches = args.samples_per_epoch // args.train_batch_size
            train += alignprop_epoch(
                args, batch_grad_steps[epoch * batches : (epoch + 1) * batches] if args.truncation != "fixed" else None
            )
        elif module.__name__ == "b2_diffurl":
            train += b2_stage(args, epoch, metrics[epoch]["kept_samples"])
        else:
            train += ddpo_epoch(args)
    evaluation_counts = _counts()
    for _ in range(evaluations_per_run(args)):
        evaluation_counts += evaluation(args, set_sizes)
    return {"train": train, "eval": evaluation_counts}


def run_counted(name, flags, output_dir):
    """Run `name`.main() in this process with `flags`, counted; returns (measured, predicted)."""
    import importlib

    import torch

    module = importlib.import_module(name)
    args = module.parse_args(flags + ["--output-dir", output_dir, "--run-name", "counted"])
    batch_grad_steps = []
    truncation_mask = getattr(module, "truncation_mask", None)
    if truncation_mask is not None:  # record the data-dependent truncation: the steps with graph of each batch
        module.truncation_mask = lambda *a, **k: (
            batch_grad_steps.append(int((mask := truncation_mask(*a, **k)).any(0).sum())) or mask
        )
    try:
        with count_calls(module) as counts:
            module.main(args)
    finally:
        if truncation_mask is not None:
            module.truncation_mask = truncation_mask
    with open(os.path.join(output_dir, "counted", "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    predicted = predicted_run_counts(module, args, metrics, batch_grad_steps)
    torch.set_grad_enabled(True)
    return {phase: dict(counts[phase]) for phase in counts}, {phase: dict(+predicted[phase]) for phase in predicted}


def micro_check():
    import tempfile

    import torch

    torch.set_num_threads(1)  # micro batches gain nothing from threads, and a busy machine makes them much slower
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(ROOT)
    for case, (name, extra) in MICRO_CASES.items():
        with tempfile.TemporaryDirectory() as folder:
            measured, predicted = run_counted(name, MICRO_FLAGS + extra, folder)
        print("COUNTS " + json.dumps(dict(case=case, measured=measured, predicted=predicted)), flush=True)


# ----------------------------------------------------------------------------------------------------------
# The table at the paper settings (the scripts' Args defaults)
# ----------------------------------------------------------------------------------------------------------


def paper_table():
    """Markdown rows: per-epoch counts of each script at its Args defaults, with the formula behind them."""
    import alignprop_diffexp
    import b2_diffurl
    import ddpo_coca
    import ddpo_diffexp
    from common import UNSEEN_PROMPT_SET, load_prompts

    def sizes(args, unseen_default):
        unseen = args.eval_unseen_prompts or unseen_default
        return [len(load_prompts(args.prompts))] + ([len(load_prompts(unseen))] if unseen else [])

    rows = []

    def row(script, setting, counts, note=""):
        rows.append((script, setting, counts, note))

    for module in (ddpo_diffexp, ddpo_coca):
        args = module.Args()
        row(
            f"`{module.__name__}.py`",
            f"T {args.num_steps}, N {args.samples_per_epoch}, B {args.sample_batch_size}, b {args.train_batch_size}",
            ddpo_epoch(args),
            "sampling N/B x T calls on 2B rows; training N/b x T forward + backward on 2b rows",
        )
        eval_counts = evaluation(args, sizes(args, UNSEEN_PROMPT_SET.get(args.prompts)))
        row(
            f"`{module.__name__}.py`",
            f"one evaluation ({args.eval_images_per_prompt} images per prompt; every {args.eval_every} epochs)",
            eval_counts,
            "no grad",
        )
    args = alignprop_diffexp.Args()
    batches = args.samples_per_epoch // args.train_batch_size
    kept = args.num_steps / 2  # per_step: sum_j (j + 1) / (T + 1), one draw per step for the whole batch
    row(
        "`alignprop_diffexp.py`",
        f"--truncation per_step (expected), T {args.num_steps}, N {args.samples_per_epoch}, b {args.train_batch_size}",
        Counter({k: round(v, 1) for k, v in alignprop_epoch(args, [kept] * batches).items()}),
        "N/b x (T + K) forwards (K recomputed by checkpointing), N/b x K backwards; step j kept with P (j+1)/(T+1)",
    )
    row(
        "`alignprop_diffexp.py`",
        f"--truncation fixed, K {args.grad_steps}",
        alignprop_epoch(args),
        "the memory-light setting (the release's *_k1 configs)",
    )
    starts = expected_min_start(args.num_steps, args.train_batch_size)
    expected = alignprop_epoch(args, [args.num_steps - starts] * batches)
    probabilities = truncation_start_distribution(args.num_steps)
    mean_k = sum(p * (args.num_steps - j) for j, p in enumerate(probabilities) if p)
    row(
        "`alignprop_diffexp.py`",
        "--truncation gaussian (expected)",
        Counter({k: round(v, 1) for k, v in expected.items()}),
        f"mean K per trajectory {mean_k:.2f}, but a batch checkpoints from its earliest start: E[T - min of "
        f"{args.train_batch_size}] = {args.num_steps - starts:.2f}",
    )
    row(
        "`alignprop_diffexp.py`",
        f"one evaluation ({args.eval_images_per_prompt} images per prompt; every {args.eval_every} epochs)",
        evaluation(args, sizes(args, UNSEEN_PROMPT_SET.get(args.prompts))),
        "no grad",
    )
    args = b2_diffurl.Args()
    groups = args.samples_per_epoch // args.num_branches
    for stage in (0, args.epochs - 1):
        first = b2_diffurl.first_interval_steps(args.num_steps, args.first_interval_fraction)
        tau = b2_diffurl.split_step(stage, args.epochs, args.num_steps, first)
        row(
            "`b2_diffurl.py`",
            f"stage {stage} (tau {tau}), at most kept ({2 * groups})",
            b2_stage(args, stage, 2 * groups),
            f"{args.samples_per_epoch // args.sample_batch_size} batches x T calls; training {args.inner_epochs} x "
            f"ceil(kept/b) x tau calls (kept is data-dependent, 0..{2 * groups})",
        )
    total = sum((b2_stage(args, s, 2 * groups) for s in range(args.epochs)), Counter())
    row(
        "`b2_diffurl.py`",
        f"all {args.epochs} stages, at most kept",
        total,
        "upper bound of a whole run (without evaluation)",
    )
    row(
        "`b2_diffurl.py`",
        f"one evaluation ({args.eval_images_per_prompt} images per prompt; every {args.eval_every} stages)",
        evaluation(args, sizes(b2_diffurl.parse_args([]), b2_diffurl.unseen_twin(args.prompts))),
        "no grad (+ one diversity-CLIP call per batch)",
    )
    return rows


def format_table(rows):
    def number(value):
        return f"{value:,.1f}" if isinstance(value, float) and value != int(value) else f"{int(value):,}"

    lines = [
        "| script | setting | UNet calls (rows) | sample evals | UNet backward | VAE decode (backward) | reward "
        "calls (backward) | text encoder | how |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for script, setting, c, note in rows:
        lines.append(
            f"| {script} | {setting} | {number(c['unet_calls'])} ({number(c['unet_rows'])}) | "
            f"{number(c['sample_evals'])} | {number(c['unet_backward'])} | "
            f"{number(c['vae_decode'])} ({number(c['vae_backward'])}) | {number(c['reward_calls'])} "
            f"({number(c['reward_backward'])}) | {number(c['text_encoder_calls'])} | {note} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    if "--micro-check" in sys.argv:
        micro_check()
    else:
        print(format_table(paper_table()))
