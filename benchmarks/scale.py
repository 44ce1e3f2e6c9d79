"""What each method costs at its paper setting on the real SD 1.5 / SDXL architectures, before renting a GPU.

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode runs each network once on the meta
device (no weights are allocated) with the code the scripts call: `common.guided_noise_prediction` (Eq. 4, one
UNet call on the doubled batch), the UNet with the scripts' LoRA (`common.add_lora`) forward and backward, the VAE
decode (and its backward for AlignProp), the text encoder(s) and the reward's vision tower. It counts matmuls,
convolutions and attention (2 FLOPs per multiply-add), the same convention as the estimates it is checked
against. An epoch's FLOPs are these unit costs times the calls per epoch of benchmarks/call_counts.py, whose
formulas tests/test_benchmarks.py checks against the calls the scripts really make.

Peak memory of a training step is measured on the meta device too: iteration_cost.TensorMemory adds up the
bytes of every storage an op creates and subtracts them when it is freed (autograd's saved tensors stay alive
until the backward), so the peak is the step's activation memory; weights, LoRA, its gradients and AdamW's state
are added from their sizes. With CUDA present, `--measure` times real calls on the random architecture instead.

    python benchmarks/scale.py                # the table (a CPU, about a minute)
    python benchmarks/scale.py --json out.json
    python benchmarks/scale.py --measure      # on a GPU: time one epoch slice of each method (see the README)
    python benchmarks/scale.py --overhead     # the sampler's overhead over bare UNet calls at SD 1.5 size (CPU)
"""

import argparse
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
# dense bf16 peaks (no sparsity) of the GPUs the table converts to time: NVIDIA's data sheets
GPUS = {"A100 80GB": dict(peak_tflops=312, memory_gb=80), "H100 SXM": dict(peak_tflops=989, memory_gb=80)}
UTILISATION = 0.40  # assumed model FLOP utilisation (ours; --measure reports the achieved one)
# reward vision towers at 224 px (configs of openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14-laion2B-s32B-b79K)
VISION_TOWERS = {
    "aesthetic": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=768),
    "clipscore": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                      patch_size=14, image_size=224, projection_dim=1024),
}  # fmt: skip


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
    4096 x 4096 attention matrix of SD 1.5 at 512 px for the backward: 10 GB more per sample); same FLOPs.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        return _unit_costs(architecture, resolution, dtype)


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
        lora_parameters=lora_parameters,
        # LoRA fp32 + its gradient + AdamW's two moments
        optimizer_bytes=4 * 4 * lora_parameters,
        unet_step_activation_bytes_per_sample=unet_activation,
        vae_backward_activation_bytes_per_image=vae_activation,
        unet_checkpointed_activation_bytes_per_sample=unet_checkpointed_activation,
    )


def epoch_flops(counts, unit, args, reward, images, prompts):
    """FLOPs of an epoch from call_counts' per-epoch counts: rows x per-row cost, images x per-image cost."""
    rows_backward = 2 * args.train_batch_size * counts["unet_backward"]  # each backward call runs 2b rows
    total = counts["unet_rows"] * unit["unet_forward_per_row"] + rows_backward * unit["unet_backward_per_row"]
    total += images * unit["vae_decode_per_image"] + prompts * unit["text_encoder_per_prompt"]
    total += images * unit["reward_forward_per_image"][reward]
    if counts["vae_backward"]:
        total += images * (unit["vae_backward_per_image"] + unit["reward_backward_per_image"][reward])
    return total


def method_rows(units):
    """One row per method at its paper preset (PRESETS.md), with the assumption behind data-dependent counts."""
    import alignprop_diffexp
    import b2_diffurl
    import ddpo_coca
    import ddpo_diffexp

    rows = []
    sd15, sdxl = units[("sd15", 512)], units[("sdxl", 1024)]

    def add(name, setting, unit, kind, args, counts, reward, prompts, note=""):
        total = epoch_flops(counts, unit, args, reward, args.samples_per_epoch, prompts)
        if kind == "alignprop" and unit["architecture"] == "sdxl":  # block checkpointing: one more forward per backward
            total += 2 * args.train_batch_size * counts["unet_backward"] * unit["unet_forward_per_row"]
        rows.append(dict(name=name, setting=setting, unit=unit, kind=kind, args=args, flops=total, note=note))

    args = ddpo_diffexp.parse_args(["--preset", "diffexp-fig4a"])
    add(
        "ddpo_diffexp.py --preset diffexp-fig4a",
        "SD 1.5, 512 px",
        sd15,
        "ddpo",
        args,
        call_counts.ddpo_epoch(args),
        "aesthetic",
        args.samples_per_epoch,
    )
    for preset, unit, setting in (("diffexp-fig4a", sd15, "SD 1.5, 512 px"), ("diffexp-fig10b", sdxl, "SDXL, 1024 px")):
        args = alignprop_diffexp.parse_args(["--preset", preset])
        batches = args.samples_per_epoch // args.train_batch_size
        counts = call_counts.alignprop_epoch(args, [args.num_steps / 2] * batches)  # per_step: E[K] = T / 2
        add(
            f"alignprop_diffexp.py --preset {preset}",
            setting,
            unit,
            "alignprop",
            args,
            counts,
            "aesthetic",
            args.samples_per_epoch,
            "per_step truncation: E[K] = T / 2 kept steps per batch",
        )
        k1 = alignprop_diffexp.parse_args(["--preset", preset, "--truncation", "fixed", "--grad-steps", "1"])
        add(
            "... --truncation fixed --grad-steps 1",
            setting,
            unit,
            "alignprop",
            k1,
            call_counts.alignprop_epoch(k1),
            "aesthetic",
            k1.samples_per_epoch,
            "K = 1 (the release's *_k1 configs)",
        )
    args = b2_diffurl.parse_args(["--preset", "b2-template1"])
    groups = args.samples_per_epoch // args.num_branches
    for stage in (0, args.epochs - 1):
        add(
            f"b2_diffurl.py --preset b2-template1, stage {stage}",
            "SD 1.4 (= SD 1.5's), 512 px",
            sd15,
            "ddpo",
            args,
            call_counts.b2_stage(args, stage, 2 * groups),
            "clipscore",
            groups,
            "upper bound: 2 kept trajectories per branch group",
        )
    args = ddpo_coca.parse_args(["--preset", "coca-aesthetic"])
    add("ddpo_coca.py --preset coca-aesthetic", "SD 1.4 (= SD 1.5's), 512 px", sd15, "ddpo", args,
        call_counts.ddpo_epoch(args), "aesthetic", args.samples_per_epoch,
        "the released _100 schedule changes optimiser steps, not FLOPs")  # fmt: skip
    return rows


def memory_gb(unit, kind, train_batch_size):
    """Peak of a training step: frozen weights + LoRA state + train_batch_size samples' activations. DDPO's family:
    one UNet call's forward + backward. AlignProp: its backward runs through the reward, the VAE decoder, then one
    recomputed UNet call at a time (checkpointing), so the peak is the larger of the two (the checkpointed inputs,
    a few latents per kept step, are left out)."""
    per_sample = unit["unet_step_activation_bytes_per_sample"]
    if kind == "alignprop":
        if unit["architecture"] == "sdxl":  # alignprop_diffexp.py checkpoints SDXL's UNet block by block too
            per_sample = unit["unet_checkpointed_activation_bytes_per_sample"]
        per_sample = max(per_sample, unit["vae_backward_activation_bytes_per_image"])
    return (unit["weight_bytes"] + unit["optimizer_bytes"] + train_batch_size * per_sample) / 1e9


def table(units):
    lines = [
        "| method (preset) | model | PFLOP per epoch | training-step memory (GB) | A100 min / epoch | H100 min / "
        "epoch | note |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in method_rows(units):
        minutes = [row["flops"] / (gpu["peak_tflops"] * TERA * UTILISATION) / 60 for gpu in GPUS.values()]
        memory = memory_gb(row["unit"], row["kind"], row["args"].train_batch_size)
        lines.append(
            f"| `{row['name']}` | {row['setting']} | {row['flops'] / 1e15:.1f} | {memory:.1f} "
            f"(b = {row['args'].train_batch_size}) | {minutes[0]:.1f} | {minutes[1]:.1f} | {row['note']} |"
        )
    return "\n".join(lines)


def units_table(units):
    lines = ["| unit (bf16, batch 1) | SD 1.5, 512 px | SDXL, 1024 px |", "| --- | --- | --- |"]
    sd15, sdxl = units[("sd15", 512)], units[("sdxl", 1024)]
    for label, key in [("UNet forward, TFLOP per row", "unet_forward_per_row"),
                       ("UNet backward with LoRA, TFLOP per row", "unet_backward_per_row"),
                       ("VAE decode, TFLOP per image", "vae_decode_per_image"),
                       ("VAE backward, TFLOP per image", "vae_backward_per_image"),
                       ("text encoder(s), TFLOP per prompt", "text_encoder_per_prompt")]:  # fmt: skip
        lines.append(f"| {label} | {sd15[key] / TERA:.3f} | {sdxl[key] / TERA:.3f} |")
    lines.append(
        f"| LoRA rank 4 parameters (M) | {sd15['lora_parameters'] / 1e6:.3f} | {sdxl['lora_parameters'] / 1e6:.3f} |"
    )
    lines.append(f"| frozen weights (GB, bf16) | {sd15['weight_bytes'] / 1e9:.2f} | {sdxl['weight_bytes'] / 1e9:.2f} |")
    for label, key in [
        ("training UNet call, activations per sample (GB)", "unet_step_activation_bytes_per_sample"),
        ("the same, the UNet checkpointed block by block (GB)", "unet_checkpointed_activation_bytes_per_sample"),
        ("VAE decode + backward, activations per image (GB)", "vae_backward_activation_bytes_per_image"),
    ]:
        lines.append(f"| {label} | {sd15[key] / 1e9:.2f} | {sdxl[key] / 1e9:.2f} |")  # fmt: skip
    return "\n".join(lines)


def measure():
    """With CUDA: time guided UNet calls and LoRA forward + backward on the random SD 1.5 architecture, bf16."""
    if not torch.cuda.is_available():
        raise SystemExit("error: --measure needs a CUDA GPU; without one, run the table (no flag)")
    device = "cuda"
    pipeline = tiny_world.random_pipeline("sd15", torch.bfloat16, device=device)
    unet = pipeline.unet
    lora = common.add_lora(unet, 4)
    latents = torch.randn(8, 4, 64, 64, device=device, dtype=torch.bfloat16)
    embeds = torch.randn(8, 77, 768, device=device, dtype=torch.bfloat16)
    scales = torch.full((8,), 5.0)
    unit = unit_costs("sd15", 512)
    results = {}
    for name, step, per_row in [
        ("sampling", lambda: common.guided_noise_prediction(unet, latents, 500, embeds, embeds, scales),
         unit["unet_forward_per_row"]),
        ("training", lambda: common.guided_noise_prediction(unet, latents, 500, embeds, embeds, scales).float()
         .mean().backward(), unit["unet_forward_per_row"] + unit["unet_backward_per_row"]),
    ]:  # fmt: skip
        context = torch.no_grad() if name == "sampling" else torch.enable_grad()
        with context:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            start = time.time()
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        seconds = (time.time() - start) / 10
        achieved = 16 * per_row / seconds / TERA  # 8 samples = 16 rows
        results[name] = dict(seconds_per_call=seconds, achieved_tflops=achieved)
    results["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    for parameter in lora:
        parameter.grad = None
    return results


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
    parser.add_argument("--measure", action="store_true", help="time real calls on a CUDA GPU")
    parser.add_argument("--overhead", action="store_true", help="the sampler against bare UNet calls, SD 1.5 size, CPU")
    options = parser.parse_args(argv)
    if options.overhead:
        result = overhead()
        print(json.dumps(result, indent=2))
        return
    if options.measure:
        results = measure()
        print(json.dumps(results, indent=2))
        if options.json:
            with open(options.json, "w") as f:
                json.dump(results, f, indent=2)
        return
    start = time.time()
    units = {("sd15", 512): unit_costs("sd15", 512), ("sdxl", 1024): unit_costs("sdxl", 1024)}
    print(units_table(units))
    print()
    print(table(units))
    peaks = ", ".join(f"{name} {gpu['peak_tflops']} TFLOP/s" for name, gpu in GPUS.items())
    seconds = time.time() - start
    print(
        f"\n(counted on the meta device in {seconds:.0f} s; time at {UTILISATION:.0%} of the dense bf16 peak: {peaks})"
    )
    if options.json:
        with open(options.json, "w") as f:
            json.dump({f"{a}@{r}": u for (a, r), u in units.items()}, f, indent=2)


if __name__ == "__main__":
    main()
