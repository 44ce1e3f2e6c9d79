"""What each method costs at its paper presets on the real SD 1.5 / SDXL architectures, before renting a GPU.

One row per GPU preset of every script (each script's PRESETS, less the CPU presets "tiny" and "shapes"; AlignProp's
presets also with --truncation fixed --grad-steps 1), read from the PRESETS dicts, so a new preset gets its row.
The model (SDXL when args.model names "xl", SD 1.5's architecture otherwise) and the resolution come from the
preset's args. Per row: the epochs, the FLOPs of an epoch and of the whole run, the training step's memory
(predicted, and measured where the preset ran on a GPU), and the minutes per epoch and hours per run on an H200.
The time is calibrated, not assumed: the FLOPs at the utilisation that benchmarks/gpu.py measured on an H200 for
the same training step (H200_RESULTS; `calibration` says which run prices which row).

What is counted: the sampling UNet calls (`common.guided_noise_prediction`, Eq. 4: one call on the doubled batch),
the training UNet calls with the scripts' LoRA (`common.add_lora`) forward and backward, the VAE decode (and its
backward for AlignProp), the text encoder(s), and the reward's vision tower (and its backward for AlignProp).
What is not: evaluation (every eval_every epochs: it samples every prompt's eval images), the reward's text tower,
data loading and Python overhead, checkpoints; in the memory column, the reward model's weights and activations.

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode runs each network once on the meta
device (no weights are allocated) with the code the scripts call. It counts matmuls, convolutions and attention
(2 FLOPs per multiply-add), the same convention as the estimates it is checked against. An epoch's FLOPs are these
unit costs times the calls per epoch of benchmarks/call_counts.py, whose formulas tests/test_benchmarks.py checks
against the calls the scripts really make. Units are counted in bf16; the presets' fp16 has the same FLOPs, bytes
and dense peak (SDXL's VAE runs in fp32 under fp16: memory_gb doubles its bytes). The reward's tower is the
preset's reward mapped by REWARD_TOWERS (an ensemble sums its members').

Peak memory of a training step is measured on the meta device too: iteration_cost.TensorMemory adds up the
bytes of every storage an op creates and subtracts them when it is freed (autograd's saved tensors stay alive
until the backward), so the peak is the step's activation memory; weights, LoRA, its gradients and AdamW's state
are added from their sizes. Attention is counted as the memory-efficient kernel a GPU runs
(efficient_attention_on_meta). Against the H200's measured peaks the predictions are within 20% (benchmarks/README.md).

    python benchmarks/scale.py                # the table (a CPU, under a minute)
    python benchmarks/scale.py --json out.json
    python benchmarks/scale.py --overhead     # the sampler's overhead over bare UNet calls at SD 1.5 size (CPU)
"""

import argparse
import contextlib
import importlib
import json
import os
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import call_counts  # noqa: E402
import common  # noqa: E402
import tiny_world  # noqa: E402
from iteration_cost import TensorMemory  # noqa: E402

TERA = 1e12
H200_PEAK_TFLOPS = 989  # dense fp16 / bf16 tensor-core peak, no sparsity (NVIDIA's data sheet; the H100 SXM's too)
# benchmarks/gpu.py's figures: the time of every row is priced with the utilisation a measured epoch reached
H200_RESULTS = os.path.join(ROOT, "benchmarks", "results", "gpu_nvidia_h200", "results.json")
# reward vision towers at 224 px (configs of openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
VISION_TOWERS = {
    "aesthetic": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=768),
    "clipscore": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=1024),
}  # fmt: skip
TOWER_NAMES = {"aesthetic": "CLIP ViT-L/14", "clipscore": "CLIP ViT-H/14"}
# The tower of VISION_TOWERS each reward runs on its images (common.load_reward). PickScore and HPSv2 are fine-tuned
# ViT-H/14 CLIPs, CLIPScore's architecture; ImageReward's BLIP ViT-L/16 has no entry, and ViT-L/14 stands in for it
# (256 patches against its 196: an overcount). The JPEG rewards run no network. The rows' notes name the stand-ins.
REWARD_TOWERS = {
    "aesthetic": "aesthetic",
    "clipscore": "clipscore",
    "pickscore": "clipscore",
    "hpsv2": "clipscore",
    "hpsv2.1": "clipscore",
    "imagereward": "aesthetic",
    "jpeg_compressibility": None,
    "jpeg_incompressibility": None,
}
SCRIPTS = ("ddpo_diffexp", "alignprop_diffexp", "b2_diffurl", "ddpo_coca")
CPU_PRESETS = ("tiny", "shapes")  # the tiny and shapes worlds: they run on a CPU and get no row
# What the table counts and what it leaves out, printed under it (and said in the module docstring)
COUNTED = (
    "sampling UNet calls, training UNet forward + backward (LoRA), VAE decode (+ backward for AlignProp), "
    "text encoder(s), the reward's vision tower (+ backward for AlignProp)"
)
NOT_COUNTED = (
    "evaluation (every eval_every epochs), the reward's text tower, data loading and Python overhead, "
    "checkpoints; in the memory column, the reward model's weights and activations"
)


def reward_towers(reward):
    """The VISION_TOWERS entries a reward spec runs per image, one per member: "pickscore" -> ["clipscore"],
    "hpsv2+aesthetic+pickscore" -> ["clipscore", "aesthetic", "clipscore"] (a weight changes the reward, not its
    cost); a tower's own name is also accepted."""
    towers = []
    for _, name in common.parse_reward_spec(reward):
        if REWARD_TOWERS[name] is not None:
            towers.append(REWARD_TOWERS[name])
    return towers


def flops(function):
    """FLOPs of one call of `function()` (forward, and backward if it runs one), counted by FlopCounterMode."""
    counter = FlopCounterMode(display=False)
    with counter:
        function()
    return counter.get_total_flops()


def peak_bytes(function):
    """Peak live bytes of the tensors `function()` creates (iteration_cost.TensorMemory: each storage once)."""
    with TensorMemory() as meter:
        function()
    return meter.peak


def unit_costs(architecture, resolution, dtype=torch.bfloat16):
    """FLOPs per row / image / prompt of each network, and the activation peaks of the training steps, on meta.

    Attention runs as the memory-efficient SDPA kernel, what a GPU uses (the math kernel would store every
    4096 x 4096 attention matrix of SD 1.5 at 512 px for the backward: 7.9 GB more per sample); same FLOPs.
    """
    with efficient_attention_on_meta():
        return _unit_costs(architecture, resolution, dtype)


@contextlib.contextmanager
def efficient_attention_on_meta():
    """Route F.scaled_dot_product_attention to the memory-efficient kernel's op. On the meta device torch picks the
    math kernel whatever sdpa_kernel allows (torch._fused_sdp_choice: 0), whose saved attention matrices made the
    predicted activations 4.7x what an H200 measured (benchmarks/README.md, "First figures from a GPU")."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def efficient(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or dropout_p or is_causal or enable_gqa:  # none of the UNets' or VAEs' calls
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, None, True, scale=scale)[0]

    functional.scaled_dot_product_attention = efficient
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _unit_costs(architecture, resolution, dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    pipeline = tiny_world.random_pipeline(architecture, dtype, device="meta")
    unet, vae = pipeline.unet, pipeline.vae
    lora = common.add_lora(unet, 4)
    side = resolution // 8
    latents = torch.zeros(1, 4, side, side, device="meta", dtype=dtype)
    width = 2048 if architecture == "sdxl" else 768
    length = 78 if architecture == "sdxl" else 77  # SDXL: 77 tokens + the packed pooled / size-id row
    embeds = torch.zeros(1, length, width, device="meta", dtype=dtype)
    scales = torch.full((1,), 7.5)

    def guided():
        return common.guided_noise_prediction(unet, latents, 500, embeds, embeds, scales)

    def guided_backward():
        guided().float().sum().backward()

    with torch.no_grad():
        unet_forward = flops(guided) / 2  # per row: the call runs the doubled (uncond, cond) batch of 1 sample
    unet_forward_backward = flops(guided_backward) / 2
    for parameter in lora:
        parameter.grad = None

    def decode():
        return vae.decode(latents / vae.config.scaling_factor).sample

    with torch.no_grad():
        vae_forward = flops(decode)
    vae_forward_backward = flops(lambda: decode().float().sum().backward())
    images = torch.zeros(1, 3, 224, 224, device="meta")
    towers = {}
    for name, config in VISION_TOWERS.items():
        with torch.device("meta"):
            tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        tower.requires_grad_(False)
        with torch.no_grad():
            forward = flops(lambda: tower(pixel_values=images).image_embeds)
        pixels = images.clone().requires_grad_(True)
        towers[name] = (forward, flops(lambda: tower(pixel_values=pixels).image_embeds.sum().backward()))
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    with torch.no_grad():
        text = flops(lambda: pipeline.text_encoder(ids)[0])
        if architecture == "sdxl":
            text += flops(lambda: pipeline.text_encoder_2(ids)[0])
    # activation peaks, per sample, on top of the live weights (created before the meter): one training UNet call
    # (forward + backward, 2 rows), and the VAE decoder's forward + backward (AlignProp)
    unet_activation = peak_bytes(guided_backward)
    vae_activation = peak_bytes(lambda: decode().float().sum().backward())
    unet.enable_gradient_checkpointing()  # what alignprop_diffexp.py adds on SDXL: the UNet recomputed block by block
    unet_checkpointed_activation = peak_bytes(guided_backward)
    unet.disable_gradient_checkpointing()
    weight_bytes = sum(p.numel() * p.element_size() for m in (unet, vae, pipeline.text_encoder) for p in m.parameters())
    if architecture == "sdxl":
        weight_bytes += sum(p.numel() * p.element_size() for p in pipeline.text_encoder_2.parameters())
    lora_parameters = sum(p.numel() for p in lora)
    return dict(
        architecture=architecture,
        resolution=resolution,
        unet_forward_per_row=unet_forward,
        unet_backward_per_row=unet_forward_backward - unet_forward,
        vae_decode_per_image=vae_forward,
        vae_backward_per_image=vae_forward_backward - vae_forward,
        reward_forward_per_image={name: value[0] for name, value in towers.items()},
        reward_backward_per_image={name: value[1] - value[0] for name, value in towers.items()},
        text_encoder_per_prompt=text,
        weight_bytes=weight_bytes,
        vae_weight_bytes=sum(p.numel() * p.element_size() for p in vae.parameters()),
        lora_parameters=lora_parameters,
        # LoRA fp32 + its gradient + AdamW's two moments
        optimizer_bytes=4 * 4 * lora_parameters,
        unet_step_activation_bytes_per_sample=unet_activation,
        vae_backward_activation_bytes_per_image=vae_activation,
        unet_checkpointed_activation_bytes_per_sample=unet_checkpointed_activation,
    )


def epoch_flops(counts, unit, args, reward, images, prompts):
    """FLOPs of an epoch from call_counts' per-epoch counts: rows x per-row cost, images x per-image cost. `reward`
    is a reward spec (an ensemble runs each member's tower, reward_towers) or a VISION_TOWERS name."""
    rows_backward = 2 * args.train_batch_size * counts["unet_backward"]  # each backward call runs 2b rows
    total = counts["unet_rows"] * unit["unet_forward_per_row"] + rows_backward * unit["unet_backward_per_row"]
    total += images * unit["vae_decode_per_image"] + prompts * unit["text_encoder_per_prompt"]
    towers = reward_towers(reward)
    total += images * sum(unit["reward_forward_per_image"][tower] for tower in towers)
    if counts["vae_backward"]:
        total += images * unit["vae_backward_per_image"]
        total += images * sum(unit["reward_backward_per_image"][tower] for tower in towers)
    return total


def model_setting(args):
    """(architecture, label) of a preset's model: SDXL's when its name says "xl", SD 1.5's otherwise (SD 1.4 has
    SD 1.5's architecture)."""
    if "xl" in args.model.lower():
        return "sdxl", "SDXL"
    if "v1-4" in args.model:
        return "sd15", "SD 1.4 (= SD 1.5's)"
    return "sd15", "SD 1.5"


K1 = ["--truncation", "fixed", "--grad-steps", "1"]  # AlignProp's memory-light setting (the release's *_k1 configs)


def preset_runs():
    """Every run the table prices, before any FLOPs: the GPU presets of each script in SCRIPTS, in its PRESETS order
    (all but CPU_PRESETS), and each AlignProp preset again with K1 unless it is K = 1 already. Each run: its name
    (the command line, the key of table's `measured`), script, preset, argv, parsed args, architecture, resolution,
    setting (the model in words) and kind ("alignprop" or "ddpo": memory_gb's)."""
    import importlib

    runs = []
    for script in SCRIPTS:
        module = importlib.import_module(script)
        for preset in module.PRESETS:
            if preset in CPU_PRESETS:
                continue
            variants = [[]]
            if script == "alignprop_diffexp":
                args = module.parse_args(["--preset", preset])
                if not (args.truncation == "fixed" and args.grad_steps == 1):
                    variants.append(K1)
            for extra in variants:
                argv = ["--preset", preset] + extra
                args = module.parse_args(argv)
                architecture, model = model_setting(args)
                runs.append(
                    dict(
                        name=" ".join([f"{script}.py"] + argv),
                        script=script,
                        preset=preset,
                        argv=argv,
                        args=args,
                        architecture=architecture,
                        resolution=args.resolution,
                        setting=f"{model}, {args.resolution} px",
                        kind=run_kind(script),
                    )
                )
    return runs


def epoch_plan(run):
    """(call counts of each epoch, images per epoch, text-encoder prompts per epoch, notes) of one of preset_runs'
    runs. Where a count is data-dependent, the note says which value stands in for it."""
    args = run["args"]
    if run["script"] == "b2_diffurl":  # an epoch is a stage; tau, the trained steps, grows stage by stage
        groups = args.samples_per_epoch // args.num_branches
        counts = [call_counts.b2_stage(args, stage, 2 * groups) for stage in range(args.epochs)]
        return counts, args.samples_per_epoch, groups, ["upper bound: 2 kept trajectories per branch group"]
    if run["script"] == "alignprop_diffexp":
        batches = args.samples_per_epoch // args.train_batch_size
        if args.truncation == "fixed":
            counts = call_counts.alignprop_epoch(args)
            note = f"K = {args.grad_steps}" + (" (the release's *_k1 configs)" if run["argv"][2:] == K1 else "")
        elif args.truncation == "per_step":
            counts = call_counts.alignprop_epoch(args, [args.num_steps / 2] * batches)
            note = "per_step truncation: E[K] = T / 2 kept steps per batch"
        else:  # gaussian: a batch checkpoints from its earliest start
            kept = args.num_steps - call_counts.expected_min_start(args.num_steps, args.train_batch_size)
            counts = call_counts.alignprop_epoch(args, [kept] * batches)
            note = f"gaussian truncation: E[K] = {kept:.1f} kept steps per batch (its earliest start)"
        return [counts] * args.epochs, args.samples_per_epoch, args.samples_per_epoch, [note]
    notes = []
    if args.backward_passes_per_update:
        notes.append(f"an optimiser step per {args.backward_passes_per_update} backward passes changes no FLOPs")
    return [call_counts.ddpo_epoch(args)] * args.epochs, args.samples_per_epoch, args.samples_per_epoch, notes


def run_costs(run, unit):
    """(FLOPs of each epoch, training-step memory in GB, notes) of a run (preset_runs' dict: script, args, argv,
    architecture, kind) on `unit` (unit_costs of its architecture and resolution). benchmarks/gpu.py prices its
    reduced runs with it too."""
    args = run["args"]
    counts_by_epoch, images, prompts, notes = epoch_plan(run)
    flops_by_epoch = []
    for counts in counts_by_epoch:
        total = epoch_flops(counts, unit, args, args.reward, images, prompts)
        if run["kind"] == "alignprop" and run["architecture"] == "sdxl":
            # alignprop_diffexp.py checkpoints SDXL's UNet block by block: one more forward per backward
            total += 2 * args.train_batch_size * counts["unet_backward"] * unit["unet_forward_per_row"]
        flops_by_epoch.append(total)
    return flops_by_epoch, memory_gb(unit, run["kind"], args.train_batch_size), notes


def preset_rows(units):
    """preset_runs with their costs on `units` ({(architecture, resolution): unit_costs(...)}, one per pair the runs
    need): each run's dict plus unit, reward, epochs, flops_by_epoch (B2: by stage), run_flops (their sum: the
    whole run, evaluation left out), memory_gb (memory_gb's training step) and note."""
    rows = []
    for run in preset_runs():
        args = run["args"]
        unit = units[(run["architecture"], run["resolution"])]
        flops_by_epoch, memory, notes = run_costs(run, unit)
        if run["script"] == "b2_diffurl":
            notes.insert(0, f"stages 0 to {args.epochs - 1}: trained steps tau grow, so does the cost")
        if args.reward not in VISION_TOWERS:
            towers = " + ".join(TOWER_NAMES[tower] for tower in reward_towers(args.reward)) or "no network"
            notes.append(f"reward {args.reward} counted as {towers}")
        rows.append(
            dict(
                run,
                unit=unit,
                reward=args.reward,
                epochs=args.epochs,
                flops_by_epoch=flops_by_epoch,
                run_flops=sum(flops_by_epoch),
                memory_gb=memory,
                note="; ".join(notes),
            )
        )
    return rows


def measured_runs(units, path=H200_RESULTS):
    """The epochs benchmarks/gpu.py measured on an H200 (fp16, one epoch at a reduced sample count, evaluation
    left out), each with its FLOPs (run_costs of the run as it ran) and the utilisation they reached:
    u = FLOPs / seconds / H200_PEAK_TFLOPS. [] without the results file."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        results = json.load(f)
    runs = []
    for entry in results["methods"]:
        args = importlib.import_module(entry["script"]).parse_args(entry["argv"])
        architecture, _ = model_setting(args)
        run = dict(script=entry["script"], preset=entry["preset"], args=args, argv=entry["argv"],
                   architecture=architecture, kind=run_kind(entry["script"]))  # fmt: skip
        flops_by_epoch, _, _ = run_costs(run, units[(architecture, args.resolution)])
        utilisation = flops_by_epoch[0] / entry["epoch_seconds"] / (H200_PEAK_TFLOPS * TERA)
        runs.append(run | dict(name=entry["name"], seconds=entry["epoch_seconds"], peak_gb=entry["peak_gb"],
                               utilisation=utilisation, date=results["facts"]["date"]))  # fmt: skip
    return runs


def run_kind(script):
    """memory_gb's kind: AlignProp backpropagates through the sampling chain, the DDPO family through one step."""
    return "alignprop" if script == "alignprop_diffexp" else "ddpo"


def calibration(row, runs):
    """(the measured run whose utilisation prices `row`, whether `row` is that run's own preset). The run with the
    same training step: the same script (else the same kind), model and train batch size; at these batch sizes a
    UNet call costs about as much for 2 rows as for 16, so the batch size sets the utilisation."""
    step = (row["architecture"], row["kind"], row["args"].train_batch_size)
    same_step = [run for run in runs if (run["architecture"], run["kind"], run["args"].train_batch_size) == step]
    pool = [run for run in same_step if run["script"] == row["script"]] or same_step
    pool = pool or [run for run in runs if run["architecture"] == row["architecture"]]
    if not pool:
        return None, False
    own = [run for run in pool if run["script"] == row["script"] and run["preset"] == row["preset"]]
    own = own if row["argv"] == ["--preset", row["preset"]] else []  # AlignProp's K = 1 rows are other runs
    return (own or sorted(pool, key=lambda run: run["utilisation"]))[0], bool(own)


def memory_gb(unit, kind, train_batch_size):
    """Peak of a training step: frozen weights + LoRA state + train_batch_size samples' activations. DDPO's family:
    one UNet call's forward + backward. AlignProp: its backward runs through the reward, the VAE decoder, then one
    recomputed UNet call at a time (checkpointing), so the peak is the larger of the two (the checkpointed inputs,
    a few latents per kept step, are left out)."""
    per_sample, weights = unit["unet_step_activation_bytes_per_sample"], unit["weight_bytes"]
    vae_activation = unit["vae_backward_activation_bytes_per_image"]
    if unit["architecture"] == "sdxl":  # SDXL's VAE overflows fp16, so it runs in fp32 (force_upcast): twice the bytes
        vae_activation *= 2
        weights += unit["vae_weight_bytes"]
    if kind == "alignprop":
        if unit["architecture"] == "sdxl":  # alignprop_diffexp.py checkpoints SDXL's UNet block by block too
            per_sample = unit["unet_checkpointed_activation_bytes_per_sample"]
        per_sample = max(per_sample, vae_activation)
    return (weights + unit["optimizer_bytes"] + train_batch_size * per_sample) / 1e9


def table(units, runs=None):
    """The markdown table of preset_rows. The H200 columns price each row's FLOPs at the utilisation of the
    measured run calibration() picks (`runs`: measured_runs'); the memory column beside the prediction is the
    peak torch.cuda.max_memory_allocated measured for the row's own preset, blank for the others."""
    rows = preset_rows(units)
    runs = measured_runs(units) if runs is None else runs
    header = ["run", "model", "epochs", "evaluations (not counted)", "PFLOP / epoch", "PFLOP / run",
              "predicted memory (GB)", "measured memory, H200 (GB)", "H200 min / epoch", "H200 h / run",
              "H200 time from", "note"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]

    def per_epoch(values, digits=1):  # B2's stages differ: first to last
        first, last = f"{values[0]:.{digits}f}", f"{values[-1]:.{digits}f}"
        return first if first == last else f"{first} to {last}"

    for row in rows:
        evaluations = call_counts.evaluations_per_run(row["args"])
        run, own = calibration(row, runs)
        cells = [f"`{row['name']}`", row["setting"], str(row["epochs"]), str(evaluations),
                 per_epoch([value / 1e15 for value in row["flops_by_epoch"]]), f"{row['run_flops'] / 1e15:,.0f}",
                 f"{row['memory_gb']:.1f} (b = {row['args'].train_batch_size})",
                 f"{run['peak_gb']:.1f}" if own else ""]  # fmt: skip
        if run is None:
            cells += ["", "", "no measured run"]
        else:
            rate = run["utilisation"] * H200_PEAK_TFLOPS * TERA  # FLOP/s
            source = f"measured {run['date']}" if own else f"u of `{run['name']}`"
            cells += [per_epoch([value / rate / 60 for value in row["flops_by_epoch"]]),
                      f"{row['run_flops'] / rate / 3600:,.1f}", f"{source} ({run['utilisation']:.1%})"]  # fmt: skip
        lines.append("| " + " | ".join(cells + [row["note"]]) + " |")
    return "\n".join(lines)


def footer(seconds):
    """What the table assumes, counts and leaves out, wrapped for the README (lines of at most 116 characters)."""
    import textwrap

    paragraphs = [
        f"Counted on the meta device in {seconds:.0f} s. Memory is one process's peak at its train batch size b, "
        "predicted; measured (torch.cuda.max_memory_allocated) where the preset itself ran on the H200. Time is that "
        "of one H200: the FLOPs of the row at the utilisation u (achieved FLOP/s / the 989 TFLOP/s dense peak) that "
        "benchmarks/gpu.py measured on the run with the same training step, i.e. the row's own epoch scaled by its "
        "FLOPs where it ran (\"measured\"). u was 3-9%: at these batch sizes a UNet call takes about as long for 2 "
        "rows as for 16, so other GPUs are not priced by their peak. The FLOPs are totals over all processes: P GPUs "
        "take about 1 / P of the time.",
        f"Counted: {COUNTED}.",
        f"Not counted: {NOT_COUNTED}.",
    ]
    return "\n\n".join(textwrap.fill(paragraph, 116) for paragraph in paragraphs)  # markdown paragraphs


ARCHITECTURE_NAMES = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def units_table(units):
    keys = sorted(units)
    header = " | ".join(f"{ARCHITECTURE_NAMES[architecture]}, {resolution} px" for architecture, resolution in keys)
    lines = [f"| unit (bf16, batch 1) | {header} |", "| --- |" + " --- |" * len(keys)]

    def line(label, key, scale, digits):
        lines.append(f"| {label} | " + " | ".join(f"{units[k][key] / scale:.{digits}f}" for k in keys) + " |")

    for label, key in [("UNet forward, TFLOP per row", "unet_forward_per_row"),
                       ("UNet backward with LoRA, TFLOP per row", "unet_backward_per_row"),
                       ("VAE decode, TFLOP per image", "vae_decode_per_image"),
                       ("VAE backward, TFLOP per image", "vae_backward_per_image"),
                       ("text encoder(s), TFLOP per prompt", "text_encoder_per_prompt")]:  # fmt: skip
        line(label, key, TERA, 3)
    line("LoRA rank 4 parameters (M)", "lora_parameters", 1e6, 3)
    line("frozen weights (GB, bf16)", "weight_bytes", 1e9, 2)
    for label, key in [
        ("training UNet call, activations per sample (GB)", "unet_step_activation_bytes_per_sample"),
        ("the same, the UNet checkpointed block by block (GB)", "unet_checkpointed_activation_bytes_per_sample"),
        ("VAE decode + backward, activations per image (GB)", "vae_backward_activation_bytes_per_image"),
    ]:
        line(label, key, 1e9, 2)
    return "\n".join(lines)


def overhead(resolution=256, steps=4, repeats=3):
    """iteration_cost.bench_sampling (ddpo_diffexp.py's section 2 against the bare guided UNet calls, the floor) on
    the random SD 1.5 architecture with LoRA, fp32 on this CPU, at `resolution` (512 px calls take ~10 s each here)."""
    import types

    import iteration_cost
    import worlds

    pipeline = worlds.load_pipeline("random:sd15", "cpu", torch.float32)
    common.add_lora(pipeline.unet, 4)
    pipeline.unet.register_to_config(sample_size=resolution // 8)  # the benchmark's latents follow sample_size
    options = types.SimpleNamespace(batch=1, steps=steps, repeats=repeats)
    return iteration_cost.bench_sampling(pipeline, resolution, options)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--overhead", action="store_true", help="the sampler against bare UNet calls, SD 1.5 size, CPU")
    options = parser.parse_args(argv)
    if options.overhead:
        result = overhead()
        print(json.dumps(result, indent=2))
        return
    start = time.time()
    keys = sorted({(run["architecture"], run["resolution"]) for run in preset_runs()})
    units = {key: unit_costs(*key) for key in keys}
    print(units_table(units))
    print()
    print(table(units))
    print()
    print(footer(time.time() - start))
    if options.json:
        with open(options.json, "w") as f:
            json.dump({f"{a}@{r}": u for (a, r), u in units.items()}, f, indent=2)


if __name__ == "__main__":
    main()
