"""First figures from a GPU: the scripts' sampler against diffusers' and the FLOP floor, one training epoch of each
method in fp16 through the script itself, one SDXL AlignProp step, and the LoRA training step's TFLOP/s.

Everything runs on the real architectures with random weights (`--model random:sd15` at 512 px, `random:sdxl` at
1024 px; nothing is downloaded) and the offline reward towers (`tiny=True`: common.py's reward modules on
tiny_world.py's small CLIP towers, since no reward weights can be had offline; a real ViT-L/14 tower is about
0.2 TFLOP an image, under 0.1% of an epoch). The parts, in the order they run:

  0. the device, the library versions, and a bf16 8192^3 matrix product: the peak this GPU really reaches;
  1. sampling: 50 DDIM steps with CFG, batch 8 at 512 px, in fp16 and bf16: ddpo_diffexp.sample_trajectories (with
     the text encoding the scripts do per batch) against diffusers' StableDiffusionPipeline.__call__ on the same
     LoRA UNet, scheduler, steps, guidance, eta and batch. FLOPs are counted on the very call that is timed
     (scale.flops, FlopCounterMode), so MFU = counted FLOPs / seconds / the data-sheet peak;
  2. the LoRA training step: forward + backward of the guided UNet call (Eq. 4) on 8 samples (16 rows), fp16
     and bf16, under autocast as accelerate runs it: achieved TFLOP/s and MFU;
  3. one epoch of every method at a reduced sample count (the preset's settings otherwise; DDPO fig4a with
     DiffExp, AlignProp fig4a with per-step truncation, one B2-DiffuRL stage, CoCA), each a fresh
     `python <script>` process in the preset's fp16, i.e. with accelerate's loss scaler: seconds of the epoch
     (sampling, reward, update; its evaluation timed apart and left out), torch.cuda.max_memory_allocated, the
     metrics (finite?) and the scaler's last scale and skipped steps;
  4. SDXL at 1024 px: one AlignProp optimiser step of the diffexp-fig10b preset, its time and peak memory.

Each part stops being started once --budget seconds have passed, so the command ends in time with what it has.
Results: <out>/results.json (every figure) and <out>/table.md, printed too. The table's predictions (scale.py's
per-epoch FLOPs and memory of the same reduced runs) are counted on the meta device, which takes a minute of CPU:
`--no-predictions` leaves them out, and `--table <out>/results.json` adds them later, on any machine.

    python benchmarks/gpu.py                       # on a CUDA GPU, about 5 minutes on an H200
    python benchmarks/gpu.py --smoke --out /tmp/g  # every part at tiny size on a CPU (the test suite runs parts)
    python benchmarks/gpu.py --table benchmarks/results/gpu_nvidia_h200/results.json   # rebuild table.md
"""

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):
    if path not in sys.path:
        sys.path.insert(0, path)

import common  # noqa: E402
import scale  # noqa: E402
import worlds  # noqa: E402

TERA = 1e12
# dense fp16 / bf16 tensor-core peaks from NVIDIA's data sheets (no sparsity), by torch.cuda.get_device_name
DATASHEET_PEAK_TFLOPS = {"NVIDIA H200": 989, "NVIDIA H100 80GB HBM3": 989, "NVIDIA A100-SXM4-80GB": 312}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ASSUMED_UTILISATION = 0.40  # what scale.py assumed before these measurements: the table tests that assumption

# Part 3 and 4: (name, script, preset, reduced flags). Reduced: fewer samples per epoch (and per update, so that
# one epoch holds at least one optimiser step); everything else is the preset's.
METHOD_RUNS = [
    ("ddpo_diffexp fig4a", "ddpo_diffexp", "diffexp-fig4a", "--samples-per-epoch 16 --samples-per-update 16"),
    ("alignprop_diffexp fig4a", "alignprop_diffexp", "diffexp-fig4a", "--samples-per-epoch 8 --samples-per-update 8"),
    ("b2_diffurl template1, stage 0", "b2_diffurl", "b2-template1", "--samples-per-epoch 20 --samples-per-update 8"),
    ("ddpo_coca coca-aesthetic", "ddpo_coca", "coca-aesthetic", "--samples-per-epoch 16 --samples-per-update 16"),
]
SDXL_RUN = ("alignprop_diffexp fig10b (SDXL)", "alignprop_diffexp", "diffexp-fig10b", "--samples-per-epoch 2 "
            "--samples-per-update 2")  # fmt: skip
# flags of every method run: one epoch, an evaluation of 4 images (timed apart), no checkpoint but the last
RUN_FLAGS = "--epochs 1 --eval-every 1000 --save-every 1000 --eval-images-per-prompt 1"
EVAL_PROMPTS = ["a cat", "a dog", "a horse", "a monkey"]  # the training prompts too: their number costs nothing
# --smoke: the same parts on the tiny model at 32 px, 2-4 steps, a CPU (fp16 needs a GPU: fp32 there)
SMOKE_FLAGS = "--model tiny --resolution 32 --num-steps 4 --sample-batch-size 2 --train-batch-size 2"
SMOKE_FLAGS += " --mixed-precision no"
SMOKE_RUNS = {
    "ddpo_diffexp": "--samples-per-epoch 4 --samples-per-update 4",
    "alignprop_diffexp": "--samples-per-epoch 4 --samples-per-update 4",
    "b2_diffurl": "--samples-per-epoch 4 --samples-per-update 2 --num-branches 2",
    "ddpo_coca": "--samples-per-epoch 4 --samples-per-update 4 --train-batch-size 1 --backward-passes-per-update 4 "
    "--similarity-window 2",
}


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function, repeats, warmups=1):
    """(median seconds of `repeats` calls after `warmups`, the last call's result)."""
    for _ in range(warmups):
        result = function()
    seconds = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        result = function()
        synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), result


def peak_gb():
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------------------
# 0. The device
# ----------------------------------------------------------------------------------------------------------


def device_facts(smoke):
    import accelerate
    import diffusers
    import peft
    import transformers

    facts = dict(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        peft=peft.__version__,
        accelerate=accelerate.__version__,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d"),
    )
    if not torch.cuda.is_available():
        return facts | dict(device="cpu", datasheet_peak_tflops=None, matmul_tflops=None)
    name = torch.cuda.get_device_name()
    size = 1024 if smoke else 8192
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    seconds, _ = timed(lambda: a @ b, repeats=10, warmups=3)
    return facts | dict(
        device=name,
        memory_gb=torch.cuda.get_device_properties(0).total_memory / 1e9,
        datasheet_peak_tflops=DATASHEET_PEAK_TFLOPS.get(name),
        matmul_tflops=2 * size**3 / seconds / TERA,
    )


def counted_flops(function):
    """scale.flops of one call, run with the memory-efficient attention kernel, which FlopCounterMode counts (the
    timed calls use whichever kernel torch picks; the FLOPs are the same)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return scale.flops(function)


def mfu(flops, seconds, facts):
    peak = facts.get("datasheet_peak_tflops")
    return flops / seconds / (peak * TERA) if peak else None


# ----------------------------------------------------------------------------------------------------------
# 1. Sampling: the scripts' sampler against diffusers' pipeline
# ----------------------------------------------------------------------------------------------------------


def build_pipeline(model, device, dtype):
    """The pipeline and its UNet with the scripts' LoRA (rank 4), as a method script loads them."""
    pipeline = worlds.load_pipeline(model, device, dtype)
    common.add_lora(pipeline.unet, 4)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sampling(pipeline, settings, facts, repeats):
    """Images per second of ddpo_diffexp.sample_trajectories and of diffusers' __call__ on the same work."""
    import ddpo_diffexp

    batch, steps, resolution, guidance, eta = (settings[k] for k in ("batch", "steps", "resolution", "cfg", "eta"))
    device, dtype = pipeline.unet.device, pipeline.unet.dtype
    prompts = [f"a photo of a {animal}" for animal in ("cat", "dog", "fox", "owl", "cow", "pig", "bee", "elk")][:batch]
    side = resolution // 8

    def ours():
        pipeline.scheduler.set_timesteps(steps, device=device)  # once per run in the scripts: negligible
        null_embeds = common.encode_prompts(pipeline, [""], resolution)
        prompt_embeds = common.encode_prompts(pipeline, prompts, resolution)
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn((batch, 4, side, side), generator=generator).to(device, dtype)
        scales = torch.full((batch, steps), guidance)
        return ddpo_diffexp.sample_trajectories(
            pipeline, pipeline.unet, prompt_embeds, null_embeds, scales, latents, eta, generator
        )[2]

    def theirs():
        generator = torch.Generator(device).manual_seed(0)
        return pipeline(
            prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, eta=eta, height=resolution,
            width=resolution, output_type="pt", generator=generator,
        ).images  # fmt: skip

    # accelerate runs a prepared model's forward under autocast in the weights' precision: both samplers do here
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        flops = counted_flops(ours)
        # interleaved rounds, so that a clock or thermal drift hits both alike
        ours_seconds, theirs_seconds = [], []
        for _ in range(repeats):
            ours_seconds.append(timed(ours, repeats=1, warmups=0 if ours_seconds else 1)[0])
            theirs_seconds.append(timed(theirs, repeats=1, warmups=0 if theirs_seconds else 1)[0])
        images = theirs()
    ours_s, theirs_s = statistics.median(ours_seconds), statistics.median(theirs_seconds)
    result = dict(
        settings=settings,
        scripts_seconds=ours_s,
        diffusers_seconds=theirs_s,
        scripts_images_per_second=batch / ours_s,
        diffusers_images_per_second=batch / theirs_s,
        time_ratio=ours_s / theirs_s,  # the goal: at most 1.05
        counted_tflop=flops / TERA,
        scripts_tflops=flops / ours_s / TERA,
        scripts_mfu=mfu(flops, ours_s, facts),
        rounds=dict(scripts=ours_seconds, diffusers=theirs_seconds),
        diffusers_images_finite=bool(torch.isfinite(images).all()),
    )
    return result


# ----------------------------------------------------------------------------------------------------------
# 2. The LoRA training step
# ----------------------------------------------------------------------------------------------------------


def training_step(pipeline, settings, facts, repeats):
    """Forward + backward of the guided UNet call on `batch` samples (2 x batch rows), LoRA gradients only."""
    batch, resolution = settings["batch"], settings["resolution"]
    unet, device, dtype = pipeline.unet, pipeline.unet.device, pipeline.unet.dtype
    lora = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents = torch.randn((batch, 4, side, side), generator=generator).to(device, dtype)
    with torch.no_grad():
        prompt_embeds = common.encode_prompts(pipeline, ["a photo of a cat"] * batch, resolution)
        null_embeds = common.encode_prompts(pipeline, [""], resolution)
    scales = torch.full((batch,), 5.0)

    def forward():
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            return common.guided_noise_prediction(unet, latents, 500, prompt_embeds, null_embeds, scales)

    def forward_backward():
        forward().float().square().mean().backward()
        for parameter in lora:
            parameter.grad = None

    reset_peak()
    with torch.no_grad():
        forward_flops = counted_flops(forward)
        forward_seconds, _ = timed(forward, repeats)
    step_flops = counted_flops(forward_backward)
    step_seconds, _ = timed(forward_backward, repeats, warmups=2)
    return dict(
        settings=settings,
        forward_seconds=forward_seconds,
        forward_tflops=forward_flops / forward_seconds / TERA,
        forward_mfu=mfu(forward_flops, forward_seconds, facts),
        step_seconds=step_seconds,
        step_counted_tflop=step_flops / TERA,
        step_tflops=step_flops / step_seconds / TERA,
        step_mfu=mfu(step_flops, step_seconds, facts),
        peak_gb=peak_gb(),
    )


# ----------------------------------------------------------------------------------------------------------
# 3 and 4. A method's epoch, through its script
# ----------------------------------------------------------------------------------------------------------


def run_script_measured(script, flags, result_path):
    """Run `script`'s main on `flags` with the offline reward towers (tiny=True), as `python <script> flags` would,
    and write what the run measured: each evaluation's seconds (to leave out of the epoch's), the peak memory, the
    fp16 loss scale after the last optimiser step, and the run's metrics."""
    module = importlib.import_module(script)
    args = dataclasses.replace(module.parse_args(flags), tiny=True)  # no reward weights offline: tiny towers
    measured = dict(evaluation_seconds=[], loss_scale=None, loss_scaler=None)
    run_evaluation, optimizer_step = module.run_evaluation, module.optimizer_step

    def timed_evaluation(*arguments):
        synchronize()
        start = time.perf_counter()
        run_evaluation(*arguments)
        synchronize()
        measured["evaluation_seconds"].append(time.perf_counter() - start)

    def watched_optimizer_step(accelerator, *arguments):
        result = optimizer_step(accelerator, *arguments)
        measured["loss_scaler"] = accelerator.scaler is not None
        measured["loss_scale"] = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
        return result

    module.run_evaluation, module.optimizer_step = timed_evaluation, watched_optimizer_step
    reset_peak()
    start = time.perf_counter()
    try:
        module.main(args)
    finally:  # the module as it was, for a caller that imported it too (the tests)
        module.run_evaluation, module.optimizer_step = run_evaluation, optimizer_step
    measured["wall_seconds"] = time.perf_counter() - start
    measured["peak_gb"] = peak_gb()
    run_dir = os.path.join(args.output_dir, args.run_name)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        measured["metrics"] = [json.loads(line) for line in f]
    # the epoch's `seconds` include the evaluation before it (epoch 0), not the one after the last epoch
    measured["epoch_seconds"] = measured["metrics"][0]["seconds"] - measured["evaluation_seconds"][0]
    with open(result_path, "w") as f:
        json.dump(measured, f, indent=2)


def method_argv(name, script, preset, flags, folder, smoke):
    """(flags beyond the preset, the script's argv, run name) of one method run, its prompt file written in `folder`."""
    sdxl = "SDXL" in name
    prompt_file = os.path.join(folder, "prompts.txt")
    with open(prompt_file, "w") as f:  # no X_test.txt beside it: one evaluation set; SDXL's 1024 px: one batch
        f.write("\n".join(EVAL_PROMPTS[: 2 if sdxl else 4]) + "\n")
    model = "random:sdxl" if sdxl else "random:sd15"
    argv = ["--preset", preset, "--model", model, *flags.split(), *RUN_FLAGS.split(), "--prompts", prompt_file]
    if smoke:
        argv = ["--preset", preset, *RUN_FLAGS.split(), "--prompts", prompt_file, *SMOKE_FLAGS.split()]
        flags = SMOKE_RUNS[script] + (" --model tiny-sdxl" if sdxl else "")
        argv += flags.split()
    run_name = name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    return flags, argv + ["--output-dir", folder, "--run-name", run_name], run_name


def method_run(name, script, preset, flags, folder, smoke, timeout):
    """One method's epoch in a fresh process (`gpu.py --run-script`): (its measurements or the error, log tail)."""
    flags, argv, run_name = method_argv(name, script, preset, flags, folder, smoke)
    result_path = os.path.join(folder, run_name + ".json")
    command = [sys.executable, os.path.abspath(__file__), "--run-script", script, "--result", result_path, "--", *argv]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        returncode, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as error:
        returncode, output = "timeout", (error.stdout or b"").decode() + (error.stderr or b"").decode()
    entry = dict(name=name, script=script, preset=preset, flags=flags, argv=argv, returncode=returncode,
                 process_seconds=time.perf_counter() - start)  # fmt: skip
    if returncode == 0 and os.path.exists(result_path):
        with open(result_path) as f:
            entry |= json.load(f)
        metrics = entry["metrics"][-1]
        numbers = [v for k, v in metrics.items() if k in ("reward_mean", "loss", "grad_norm")]
        entry["metrics_finite"] = all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers)
    else:
        entry["log_tail"] = output[-3000:]
    return entry


# ----------------------------------------------------------------------------------------------------------
# The table, with scale.py's predictions of the same reduced runs
# ----------------------------------------------------------------------------------------------------------


def predictions(results):
    """scale.py's per-epoch FLOPs and training-step memory of each method run as it was run (its argv)."""
    units, predicted = {}, {}
    for entry in results.get("methods", []):
        module = importlib.import_module(entry["script"])
        args = module.parse_args(entry["argv"])
        architecture, _ = scale.model_setting(args)
        if architecture not in ("sd15", "sdxl"):
            continue
        key = (architecture, args.resolution)
        units[key] = units.get(key) or scale.unit_costs(*key)
        run = dict(script=entry["script"], args=args, argv=entry["argv"], architecture=architecture,
                   kind="alignprop" if entry["script"] == "alignprop_diffexp" else "ddpo")  # fmt: skip
        flops, memory, _ = scale.run_costs(run, units[key])
        predicted[entry["name"]] = dict(epoch_pflop=flops[0] / 1e15, memory_gb=memory)
    return predicted


def table(results):
    facts = results["facts"]
    peak = facts.get("datasheet_peak_tflops")
    lines = [f"Measured on {facts['device']} on {facts['date']} (torch {facts['torch']}, diffusers "
             f"{facts['diffusers']}); bf16 8192^3 matmul: {fmt(facts.get('matmul_tflops'), 0)} TFLOP/s; "
             f"data-sheet dense peak: {peak or 'n/a'} TFLOP/s.", ""]  # fmt: skip
    settings = next(iter(results.get("sampling", {}).values()), {}).get("settings", {})
    lines += [f"Sampling, {settings.get('steps')} DDIM steps, CFG {settings.get('cfg')}, eta {settings.get('eta')}, "
              f"batch {settings.get('batch')}, {settings.get('resolution')} px ({results.get('model')} with LoRA; "
              "MFU: counted FLOPs / time / the data-sheet peak):", "",
              "| precision | scripts' sampler img/s | diffusers' img/s | time ratio (goal <= 1.05) | counted TFLOP | "
              "TFLOP/s | MFU |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for precision, row in results.get("sampling", {}).items():
        lines.append(
            f"| {precision} | {fmt(row['scripts_images_per_second'], 2)} | "
            f"{fmt(row['diffusers_images_per_second'], 2)} | {fmt(row['time_ratio'], 3)} | "
            f"{fmt(row['counted_tflop'], 0)} | {fmt(row['scripts_tflops'], 0)} | {pct(row['scripts_mfu'])} |"
        )
    lines += ["", f"LoRA training step: the guided UNet call's forward + backward, {settings.get('batch')} samples "
              f"({2 * (settings.get('batch') or 0)} rows), {settings.get('resolution')} px, under autocast:", "",
              "| precision | forward TFLOP/s | forward MFU | step s | step TFLOP/s | step MFU | peak GB |",
              "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for precision, row in results.get("training_step", {}).items():
        lines.append(
            f"| {precision} | {fmt(row['forward_tflops'], 0)} | {pct(row['forward_mfu'])} | "
            f"{fmt(row['step_seconds'], 3)} | {fmt(row['step_tflops'], 0)} | {pct(row['step_mfu'])} | "
            f"{fmt(row['peak_gb'], 1)} |"
        )
    predicted = results.get("predictions", {})
    lines += ["", "One epoch of each method at a reduced sample count, fp16 with accelerate's loss scaler, through the "
              "script (evaluation left out; predicted: scale.py's FLOPs at the 40% of the peak it assumed before "
              "these figures, and its training-step memory):", "",
              "| run | flags beyond the preset | ok | epoch s | predicted s | ratio | peak GB | predicted GB | ratio | "
              "skipped steps | loss scale |", "|" + " --- |" * 11]  # fmt: skip
    for entry in results.get("methods", []):
        ok = entry["returncode"] == 0 and entry.get("metrics_finite")
        guess = predicted.get(entry["name"], {})
        seconds = entry.get("epoch_seconds")
        guess_seconds = None
        if guess and peak:
            guess_seconds = guess["epoch_pflop"] * 1e15 / (peak * TERA * ASSUMED_UTILISATION)
        metrics = (entry.get("metrics") or [{}])[-1]
        lines.append(
            f"| {entry['name']} | `{entry['flags']}` | {'yes' if ok else 'NO: ' + str(entry['returncode'])} | "
            f"{fmt(seconds, 1)} | {fmt(guess_seconds, 1)} | {ratio(seconds, guess_seconds)} | "
            f"{fmt(entry.get('peak_gb'), 1)} | "
            f"{fmt(guess.get('memory_gb'), 1)} | {ratio(entry.get('peak_gb'), guess.get('memory_gb'))} | "
            f"{metrics.get('skipped_steps', 'n/a')} | {entry.get('loss_scale')} |"
        )
    return "\n".join(lines)


def fmt(value, digits):
    return "n/a" if value is None else f"{value:,.{digits}f}"


def pct(value):
    return "n/a" if value is None else f"{100 * value:.0f}%"


def ratio(measured, predicted):
    return "n/a" if not measured or not predicted else f"{measured / predicted:.2f}"


# ----------------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------------


def measure(options):
    """Run parts 0-4 within options.budget seconds; returns the results dict (also written as it grows)."""
    start = time.perf_counter()
    smoke = options.smoke
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not smoke and device != "cuda":
        raise SystemExit("error: gpu.py needs a CUDA GPU; on a CPU, run it with --smoke (tiny sizes)")
    results = dict(facts=device_facts(smoke), budget_seconds=options.budget, smoke=smoke)
    os.makedirs(options.out, exist_ok=True)

    def save():
        results["seconds"] = time.perf_counter() - start
        with open(os.path.join(options.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)

    def time_left():
        return options.budget - (time.perf_counter() - start)

    save()
    print(f"device: {json.dumps(results['facts'])}", flush=True)
    model = "tiny" if smoke else "random:sd15"
    results["model"] = model
    settings = dict(batch=2, steps=4, resolution=32) if smoke else dict(batch=8, steps=50, resolution=512)

    def sampling_and_training_step(precision):
        if device == "cpu" and precision == "fp16":
            return  # fp16 matrix products: a GPU's
        pipeline = build_pipeline(model, device, DTYPES[precision])
        results.setdefault("sampling", {})[precision] = sampling(
            pipeline, dict(settings, cfg=5.0, eta=1.0), results["facts"], 1 if smoke else 3
        )
        print(f"{precision}: sampling {json.dumps(results['sampling'][precision])}", flush=True)
        results.setdefault("training_step", {})[precision] = training_step(
            pipeline, dict(settings), results["facts"], 3 if smoke else 10
        )
        print(f"{precision}: training step {json.dumps(results['training_step'][precision])}", flush=True)
        del pipeline
        reset_peak()

    def method(name, script, preset, flags):
        with tempfile.TemporaryDirectory() as folder:
            entry = method_run(name, script, preset, flags, folder, smoke, timeout=max(30, time_left() - 10))
        results.setdefault("methods", []).append(entry)
        shown = {k: entry.get(k) for k in ("returncode", "epoch_seconds", "peak_gb", "loss_scale", "log_tail")}
        print(f"{name}: {json.dumps(shown)}", flush=True)

    # the order of importance, for a budget that runs out: fp16 (the scripts' default), the methods, SDXL, bf16
    parts = [("sampling and training step fp16", 40, lambda: sampling_and_training_step("fp16"))]
    parts = parts if "fp16" in options.precisions else []
    runs = METHOD_RUNS + [SDXL_RUN]
    if options.methods is not None:  # in the order given
        runs = [run for method in options.methods for run in runs if method == ("sdxl" if run is SDXL_RUN else run[1])]
    parts += [(run[0], 30, lambda run=run: method(*run)) for run in runs]
    if "bf16" in options.precisions:
        parts += [("sampling and training step bf16", 40, lambda: sampling_and_training_step("bf16"))]
    for name, seconds_needed, part in parts:
        if time_left() < seconds_needed:
            results.setdefault("skipped", []).append(f"{name}: out of time")
            print(f"{name}: skipped, out of time", flush=True)
            continue
        part()
        save()
    save()
    return results


def merge(paths):
    """One results dict from several commands' results.json (a run whose budget ran out, then the rest): the
    later value of each figure wins, a method's failed try is kept under `attempts`, every command's facts kept."""
    merged = dict(facts=None, commands=[], sampling={}, training_step={}, methods=[], attempts=[])
    for path in paths:
        with open(path) as f:
            results = json.load(f)
        merged["facts"] = merged["facts"] or results["facts"]
        merged["model"] = results.get("model", merged.get("model"))
        merged["commands"].append(dict(file=os.path.basename(path), facts=results["facts"],
                                       seconds=results.get("seconds"), skipped=results.get("skipped", [])))  # fmt: skip
        merged["sampling"] |= results.get("sampling", {})
        merged["training_step"] |= results.get("training_step", {})
        for entry in results.get("methods", []):
            if entry["returncode"] != 0:
                merged["attempts"].append(entry)
                continue
            merged["methods"] = [kept for kept in merged["methods"] if kept["name"] != entry["name"]] + [entry]
    order = [run[0] for run in METHOD_RUNS + [SDXL_RUN]]
    merged["methods"].sort(key=lambda entry: order.index(entry["name"]) if entry["name"] in order else len(order))
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on a CPU: the code paths, in seconds")
    parser.add_argument("--out", help="results folder (default: benchmarks/results/gpu_<device name>)")
    parser.add_argument("--budget", type=float, default=360, help="seconds after which no part is started")
    parser.add_argument("--methods", nargs="*", help="only these scripts' runs (and 'sdxl'), e.g. ddpo_diffexp")
    parser.add_argument("--precisions", nargs="*", default=list(DTYPES), help="of the sampling and training step")
    parser.add_argument("--no-predictions", action="store_true", help="leave scale.py's predictions out")
    parser.add_argument("--table", help="rebuild table.md (with predictions) from this results.json")
    parser.add_argument("--merge", nargs="+", help="merge these results.json files into --out/results.json")
    parser.add_argument("--run-script", help=argparse.SUPPRESS)  # internal: one method run in this process
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("script_flags", nargs="*", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.run_script:
        return run_script_measured(options.run_script, options.script_flags, options.result)
    if options.merge:
        results = merge(options.merge)
        os.makedirs(options.out, exist_ok=True)
        with open(os.path.join(options.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    elif options.table:
        with open(options.table) as f:
            results = json.load(f)
        options.out = os.path.dirname(options.table)
    else:
        if options.out is None:
            name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            options.out = os.path.join(ROOT, "benchmarks", "results", "gpu_" + name.lower().replace(" ", "_"))
        results = measure(options)
    if not options.no_predictions and not results.get("smoke"):
        results["predictions"] = predictions(results)
        with open(os.path.join(options.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    text = table(results)
    with open(os.path.join(options.out, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
