"""SDXL through the scripts' own code: the tiny SDXL (tiny_world.py, `--model tiny-sdxl`) against diffusers' SDXL
pipeline, DiffExp Eq. 8 over both tokenizers, the fp16 VAE upcast, and AlignProp training an SDXL LoRA that
StableDiffusionXLPipeline loads."""

import math

import pytest
import torch

import common
import tiny_world
import worlds
from conftest import MICRO_FLAGS, read_jsonl, run_script, with_values


@pytest.fixture(scope="module")
def sdxl():
    return worlds.load_pipeline(worlds.TINY_SDXL_MODEL, "cpu", torch.float32)


def test_the_packed_conditioning_is_what_the_sdxl_pipeline_feeds_its_unet(sdxl):
    prompts = ["a dolphin riding a bike", "a cat"]
    embeds = common.encode_prompts(sdxl, prompts, 32)  # (B, 77 + 1, 64)
    assert embeds.shape == (2, 78, 64)
    sequence, negative, pooled, negative_pooled = sdxl.encode_prompt(prompts, device="cpu")
    assert torch.allclose(embeds[:, :77], sequence, atol=1e-6)
    null_embeds = common.encode_prompts(sdxl, [""], 32)
    assert null_embeds[:, :77].abs().max() == 0 and negative.abs().max() == 0  # force_zeros_for_empty_prompt
    conditioning = common.unet_conditioning(sdxl.unet, embeds)
    assert torch.allclose(conditioning["added_cond_kwargs"]["text_embeds"], pooled, atol=1e-6)
    time_ids = sdxl._get_add_time_ids(
        (32, 32), (0, 0), (32, 32), dtype=torch.float32, text_encoder_projection_dim=32
    )  # what the pipeline adds for a 32 px image
    assert torch.equal(conditioning["added_cond_kwargs"]["time_ids"], time_ids.expand(2, -1))
    assert negative_pooled.abs().max() == 0 and common.unet_conditioning(sdxl.unet, null_embeds)[
        "added_cond_kwargs"
    ]["text_embeds"].abs().max() == 0  # fmt: skip
    # Eq. 4 from the packed tensors equals the UNet called as the pipeline calls it
    latents, t, w = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), 501, 7.5
    ours = common.guided_noise_prediction(sdxl.unet, latents, t, embeds, null_embeds, torch.full((2,), w))
    added = dict(text_embeds=torch.cat([negative_pooled, pooled]), time_ids=time_ids.expand(4, -1))
    noise = sdxl.unet(
        torch.cat([latents, latents]), t, encoder_hidden_states=torch.cat([negative, sequence]), added_cond_kwargs=added
    ).sample
    uncond, cond = noise.chunk(2)
    assert torch.allclose(ours, uncond + w * (cond - uncond), atol=1e-5)


def test_prompt_weighting_marks_the_same_word_in_both_tokenizers_and_never_the_pooled_row(sdxl):
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.tokenizer.pad_token != "!"  # they differ as SDXL's do
    prompts = common.load_prompts("animal_activities")[:20] + common.load_prompts("drawbench_challenging")[:20]
    generator = torch.Generator().manual_seed(0)
    mask = common.random_word_token_mask(sdxl, prompts, generator)
    assert mask.shape == (40, 78) and not mask[:, -1].any() and mask.any(1).all()
    for tokenizer in (sdxl.tokenizer, sdxl.tokenizer_2):  # the chosen positions hold one whole word in each
        ids = common.token_ids(tokenizer, prompts)
        for row, prompt in enumerate(prompts[:20]):
            chosen = tokenizer.decode(ids[row, mask[row, :77]]).strip()
            assert chosen in prompt.lower().split(), (chosen, prompt)
    embeds = common.encode_prompts(sdxl, prompts[:2], 32)
    null_embeds = common.encode_prompts(sdxl, [""], 32)
    weighted = common.weight_prompt_embeds(embeds, null_embeds, mask[:2], torch.tensor([1.2, 1.2]))
    changed = (weighted != embeds).any(-1)  # (2, 78)
    assert torch.equal(changed, mask[:2] & (embeds != 0).any(-1))  # the word's tokens, in both halves of D
    assert torch.equal(weighted[:, -1], embeds[:, -1])  # pooled embedding and size ids untouched
    assert (
        (weighted[:, :, :32] != embeds[:, :, :32]).any(-1) == (weighted[:, :, 32:] != embeds[:, :, 32:]).any(-1)
    ).all()
    sdxl_with_other_merges = type("Pipeline", (), dict(unet=sdxl.unet, tokenizer=sdxl.tokenizer))()
    sdxl_with_other_merges.tokenizer_2 = tiny_world.build_tiny_tokenizer(words=("dolphin",))
    with pytest.raises(ValueError, match="split 'a dolphin' differently"):
        common.random_word_token_mask(sdxl_with_other_merges, ["a dolphin"], generator)


def test_fp16_keeps_the_sdxl_vae_in_fp32_and_decodes_half_latents():
    sdxl_half = worlds.load_pipeline(worlds.TINY_SDXL_MODEL, "cpu", torch.float16)
    assert sdxl_half.unet.dtype == torch.float16 and sdxl_half.vae.dtype == torch.float32  # force_upcast
    latents = torch.randn(1, 4, 16, 16).half()  # what the fp16 UNet's sampler hands over
    images = sdxl_half.vae.decode(latents.to(sdxl_half.vae.dtype) / sdxl_half.vae.config.scaling_factor).sample
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert worlds.load_pipeline(worlds.TINY_SDXL_MODEL, "cpu", torch.bfloat16).vae.dtype == torch.bfloat16
    assert worlds.load_pipeline(worlds.TINY_MODEL, "cpu", torch.float16).vae.dtype == torch.float16  # SD 1.x: as is


def test_alignprop_trains_an_sdxl_lora_that_the_sdxl_pipeline_loads(sdxl, sdxl_ensemble_runs):
    run = sdxl_ensemble_runs("alignprop_diffexp.py")  # 3 epochs on an HPS + Aesthetic + PickScore ensemble
    evaluations = read_jsonl(run / "eval.jsonl")
    assert [e["epoch"] for e in evaluations] == [0, 3]
    assert evaluations[-1]["seen_reward_mean"] > evaluations[0]["seen_reward_mean"]  # the reward rises

    def generate():
        return sdxl(
            ["a cat"], num_inference_steps=4, guidance_scale=7.5, height=32, width=32, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip

    before = generate()
    sdxl.load_lora_weights(str(run / "checkpoints" / "epoch_0003"))  # StableDiffusionXLPipeline.load_lora_weights
    try:
        assert (generate() - before).abs().max() > 1e-4
    finally:  # the module's pipeline goes back without the LoRA
        sdxl.unload_lora_weights()
    assert torch.equal(generate(), before)


def test_sdxl_block_checkpointing_leaves_alignprops_gradient_unchanged(sdxl):
    import alignprop_diffexp

    sdxl.scheduler.set_timesteps(2)
    common.add_lora(sdxl.unet, 4)
    parameters = [p for p in sdxl.unet.parameters() if p.requires_grad]
    with torch.no_grad():  # a nonzero LoRA B, so that every LoRA parameter has a gradient
        for parameter in parameters:
            parameter.add_(0.01 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    embeds, null_embeds = common.encode_prompts(sdxl, ["a cat"], 32), common.encode_prompts(sdxl, [""], 32)

    def gradient():
        images = alignprop_diffexp.sample_images(
            sdxl, sdxl.unet, embeds, null_embeds, torch.full((1, 2), 7.5), torch.ones(1, 4, 16, 16), 0.0, None,
            torch.ones(1, 2, dtype=torch.bool),
        )  # fmt: skip
        return torch.autograd.grad(images.mean(), parameters)

    try:
        plain = gradient()
        sdxl.unet.enable_gradient_checkpointing()
        checkpointed = gradient()
    finally:
        sdxl.unet.disable_gradient_checkpointing()
        sdxl.unet.delete_adapters("default")
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))
    assert sum(float(g.abs().sum()) for g in plain) > 0


def test_ddpo_runs_on_sdxl(sdxl_ensemble_runs):
    """The packed conditioning makes SDXL a --model of every script: ddpo_diffexp.py here (on an ensemble with a
    non-differentiable member), ddpo_coca.py and b2_diffurl.py in the opt-in test below."""
    (metrics,) = read_jsonl(sdxl_ensemble_runs("ddpo_diffexp.py") / "metrics.jsonl")
    assert math.isfinite(metrics["reward_mean"]) and math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, extra",
    [("ddpo_coca.py", ["--diffexp", "--similarity-window", "2"]), ("b2_diffurl.py", ["--num-branches", "4"])],
)
def test_coca_and_b2_run_on_sdxl(script, extra, tmp_path):
    flags = with_values(MICRO_FLAGS, sample_batch_size="8")
    run_script(script, [*flags, "--model", "tiny-sdxl", "--epochs", "1", *extra], tmp_path)
    (metrics,) = read_jsonl(next(tmp_path.iterdir()) / "metrics.jsonl")
    assert math.isfinite(metrics["reward_mean"]) and math.isfinite(metrics["loss"])
