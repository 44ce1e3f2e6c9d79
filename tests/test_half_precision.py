"""Half precision, proven rather than assumed: the real SD 1.5 / SDXL architectures built offline from configs/
(`--model random:sd15`, `random:sdxl`), the DDPO log-probability in fp32 from half-precision UNet outputs, a bf16
run of the scripts on the tiny model (fast), and one bf16 training step of every method on the full-size SD 1.5
architecture (slow, opt-in: `pytest -m slow`)."""

import math

import pytest
import torch

import common
import tiny_world
from conftest import MICRO_FLAGS, lora_tensors, read_jsonl, run_script, with_values


def parameter_count(module):
    return sum(parameter.numel() for parameter in module.parameters())


def test_the_committed_configs_are_the_published_architectures():
    """Parameter counts of the configs' modules on the meta device (nothing allocated) against the published ones:
    SD 1.5's UNet 859.52 M, VAE 83.65 M, CLIP ViT-L/14 text 123.06 M; SDXL's UNet 2567.46 M and its OpenCLIP
    bigG text encoder with projection 694.66 M; LoRA rank 4 on SD 1.5's attention projections 0.80 M."""
    sd15 = tiny_world.random_pipeline("sd15", torch.float32, device="meta")
    counts = {name: round(parameter_count(getattr(sd15, name)) / 1e6, 2) for name in ("unet", "vae", "text_encoder")}
    assert counts == {"unet": 859.52, "vae": 83.65, "text_encoder": 123.06}
    assert round(sum(p.numel() for p in common.add_lora(sd15.unet, 4)) / 1e6, 2) == 0.80
    sdxl = tiny_world.random_pipeline("sdxl", torch.float32, device="meta")
    assert round(parameter_count(sdxl.unet) / 1e6, 2) == 2567.46
    assert round(parameter_count(sdxl.text_encoder_2) / 1e6, 2) == 694.66
    assert common.is_sdxl(sdxl) and sdxl.vae.config.force_upcast and sdxl.vae.config.scaling_factor == 0.13025
    assert "HDRJ-One/runwayml-stable-diffusion-v1-5" in tiny_world.architecture_config("sd15")["_source"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_ddpo_log_probability_is_fp32_from_half_precision_outputs(dtype):
    import ddpo_diffexp

    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**tiny_world.SD15_SCHEDULER_CONFIG)
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    noise_pred = torch.randn(2, 4, 8, 8, generator=generator)
    t = scheduler.timesteps[-1]  # the last step: the smallest sigma, where half precision would lose most
    prev_half, log_prob_half = ddpo_diffexp.ddim_step_with_logprob(
        scheduler, noise_pred.to(dtype), t, latents.to(dtype), 1.0, generator=torch.Generator().manual_seed(1)
    )
    assert log_prob_half.dtype == torch.float32 and torch.isfinite(log_prob_half).all()
    assert prev_half.dtype == dtype  # the latent chain stays in the weights' precision
    # x_{t-1} is rounded to half precision before it is scored, so training, which rescores the stored (rounded)
    # sample from the same inputs, recomputes exactly the sampling's log-probability: the PPO ratio starts at 1
    log_prob_of_rounded = ddpo_diffexp.ddim_step_with_logprob(
        scheduler, noise_pred.to(dtype).float(), t, latents.to(dtype).float(), 1.0, prev_sample=prev_half.float()
    )[1]
    assert torch.equal(log_prob_half, log_prob_of_rounded)


def test_a_bf16_run_on_the_tiny_model_trains_fp32_lora(sdxl_ensemble_runs):
    """conftest.ENSEMBLE_RUNS runs ddpo_diffexp.py with --mixed-precision bf16 (a CPU runs bf16; fp16 only on a GPU)."""
    run = sdxl_ensemble_runs("ddpo_diffexp.py")
    (metrics,) = read_jsonl(run / "metrics.jsonl")
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    lora = lora_tensors(run / "checkpoints" / "epoch_0001")
    assert {tensor.dtype for tensor in lora.values()} == {torch.float32}  # LoRA parameters stay fp32
    assert max(float(t.abs().max()) for name, t in lora.items() if "lora_B" in name or "lora.up" in name) > 0


# one bf16 step of every method on the full-size SD 1.5 architecture: 256 px, 4 DDIM steps, 2 samples of one prompt
# (so that the DDPO family's per-prompt advantages are +-1, not 0), each sample its own batch
FULL_SIZE_FLAGS = "--model random:sd15 --mixed-precision bf16 --resolution 256 --num-steps 4 --samples-per-epoch 2 "
FULL_SIZE_FLAGS += "--sample-batch-size 1 --train-batch-size 1 --samples-per-update 2 --epochs 1"
FULL_SIZE_EXTRA = {
    "ddpo_diffexp.py": ["--diffexp"],
    "alignprop_diffexp.py": ["--diffexp", "--truncation", "fixed", "--grad-steps", "1"],
    "b2_diffurl.py": ["--num-branches", "2", "--samples-per-epoch", "2", "--sample-batch-size", "2"],
    "ddpo_coca.py": ["--similarity-window", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(FULL_SIZE_EXTRA))
def test_one_bf16_step_of_every_method_on_the_real_sd15_architecture(script, tmp_path):
    prompt_file = tmp_path / "one.txt"
    prompt_file.write_text("a red apple\n")
    flags = with_values(MICRO_FLAGS, prompts=str(prompt_file), eval_unseen_prompts=str(prompt_file), eval_every="100")
    run_script(script, [*flags, *FULL_SIZE_FLAGS.split(), *FULL_SIZE_EXTRA[script], "--run-name", "r"], tmp_path)
    (metrics,) = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    lora = lora_tensors(tmp_path / "r" / "checkpoints" / "epoch_0001")
    assert {tensor.dtype for tensor in lora.values()} == {torch.float32}
    assert max(float(t.abs().max()) for name, t in lora.items() if "lora_B" in name or "lora.up" in name) > 0


def test_fp16_weights_with_a_gradient_scaler_step_the_fp32_lora(tiny_pipeline):
    """What accelerate does on a GPU under --mixed-precision fp16 (autocast + GradScaler), run here on the CPU:
    the scaled backward reaches the LoRA parameters, which common.add_lora keeps in fp32, since GradScaler
    refuses to unscale fp16 gradients (checked below with an fp16 copy)."""
    import copy

    unet = copy.deepcopy(tiny_pipeline.unet).half()
    lora = common.add_lora(unet, 4)
    assert {parameter.dtype for parameter in lora} == {torch.float32}
    optimizer = torch.optim.AdamW(lora, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    embeds = common.encode_prompts(tiny_pipeline, ["a cat", "a dog"], 32).half()
    null_embeds = common.encode_prompts(tiny_pipeline, [""], 32).half()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)).half()

    def scaled_backward():
        with torch.autocast("cpu", dtype=torch.float16):
            noise_pred = common.guided_noise_prediction(unet, latents, 500, embeds, null_embeds, torch.full((2,), 5.0))
        assert noise_pred.dtype == torch.float16
        scaler.scale(noise_pred.float().pow(2).mean()).backward()

    before = [parameter.detach().clone() for parameter in lora]
    scaled_backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(lora, 1.0)
    scaler.step(optimizer)
    scaler.update()
    assert math.isfinite(float(grad_norm)) and float(grad_norm) > 0
    assert max(float((after.detach() - b).abs().max()) for after, b in zip(lora, before)) > 0  # the step was applied
    for parameter in lora:  # the failure add_lora's fp32 cast prevents
        parameter.data = parameter.data.half()
    optimizer.zero_grad()
    scaled_backward()
    with pytest.raises(ValueError, match="Attempting to unscale FP16 gradients"):
        scaler.unscale_(torch.optim.AdamW(lora, lr=1e-3))


SCRIPTS = ["ddpo_diffexp.py", "alignprop_diffexp.py", "b2_diffurl.py", "ddpo_coca.py"]


@pytest.fixture
def fp16_accelerator():
    """accelerate's fp16 setting as a GPU has it (native AMP, a GradScaler at 2^16), on this CPU: accelerate builds
    no scaler for a CPU, so the test hands it a real torch.amp.GradScaler; its shared state is reset around it."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # another test's Accelerator fixed mixed_precision="no"
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    accelerator.native_amp, accelerator.scaler = True, torch.amp.GradScaler("cpu", init_scale=2.0**16)
    yield accelerator
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_fp16_overflow_skips_the_step_and_only_17_in_a_row_stop_the_run(script, tiny_pipeline, fp16_accelerator,
                                                                          tmp_path, capsys):  # fmt: skip
    """Issue 30: the loss scaler's skipped step must not stop the run. An injected infinite gradient is skipped
    (LoRA and AdamW state unchanged, the scale halved, the norm counted as skipped), a finite step after it applies
    and resets the count, the checkpoint keeps the scale, and the 17th skip in a row stops the run in one line."""
    import copy
    import importlib

    module = importlib.import_module(script[:-3])
    unet = copy.deepcopy(tiny_pipeline.unet)
    lora = common.add_lora(unet, 4)
    optimizer = fp16_accelerator.prepare(torch.optim.AdamW(lora, lr=1e-2))
    scaler = fp16_accelerator.scaler

    def step(loss_factor, skipped_in_a_row):
        fp16_accelerator.backward(sum((parameter**2).sum() for parameter in lora) * loss_factor)
        return module.optimizer_step(fp16_accelerator, optimizer, lora, 1.0, 0, skipped_in_a_row)

    grad_norm, skipped = step(1.0, 0)  # a finite step is applied
    assert math.isfinite(grad_norm) and grad_norm > 0 and skipped == 0 and scaler.get_scale() == 2.0**16
    before = [parameter.detach().clone() for parameter in lora]
    adam_before = copy.deepcopy(optimizer.state_dict()["state"])
    grad_norm, skipped = step(math.inf, 0)  # an overflow: skipped, nothing changes but the scale
    assert not math.isfinite(grad_norm) and skipped == 1 and scaler.get_scale() == 2.0**15
    assert all(torch.equal(parameter, old) for parameter, old in zip(lora, before))
    adam_after = optimizer.state_dict()["state"]
    assert all(torch.equal(adam_after[i][key], adam_before[i][key]) for i in adam_before for key in adam_before[i])
    assert module.grad_norm_summary([grad_norm, 2.0, 4.0]) == [3.0, 1]  # the epoch's mean leaves the skip out
    assert math.isnan(module.grad_norm_summary([grad_norm])[0])
    grad_norm, skipped = step(1.0, skipped)  # the next finite step applies and ends the run of skips
    assert math.isfinite(grad_norm) and skipped == 0
    assert any(not torch.equal(parameter, old) for parameter, old in zip(lora, before))

    module.save_checkpoint(
        module.Args(epochs=1), fp16_accelerator, str(tmp_path), 0, unet, optimizer, skipped_in_a_row=0
    )
    saved = torch.load(tmp_path / "checkpoints" / "epoch_0001" / "training_state.pt", weights_only=False)
    assert saved["scaler"]["scale"] == 2.0**15  # a resumed run continues at the scale it had reached

    for _ in range(16):
        grad_norm, skipped = step(math.inf, skipped)
    assert skipped == 16 and scaler.get_scale() == 2.0**-1
    with pytest.raises(SystemExit) as stop:
        step(math.inf, skipped)
    assert stop.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "17 fp16 steps in a row" in error, error


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_non_finite_gradient_without_a_loss_scaler_stops_the_run(script, tiny_pipeline, capsys, request):
    import copy
    import importlib

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    module = importlib.import_module(script[:-3])
    accelerator = Accelerator(cpu=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    assert accelerator.scaler is None
    lora = common.add_lora(copy.deepcopy(tiny_pipeline.unet), 4)
    optimizer = accelerator.prepare(torch.optim.AdamW(lora, lr=1e-2))
    accelerator.backward(sum((parameter**2).sum() for parameter in lora) * math.inf)
    before = [parameter.detach().clone() for parameter in lora]
    with pytest.raises(SystemExit) as stop:
        module.optimizer_step(accelerator, optimizer, lora, 1.0, 3, 0)
    assert stop.value.code == 1 and "epoch 3: non-finite gradient norm" in capsys.readouterr().err
    assert all(torch.equal(parameter, old) for parameter, old in zip(lora, before))
