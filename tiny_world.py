"""The tiny world: an SD-architecture text-to-image model and reward backbones small enough for a CPU test.

Nothing here is trained on data. The pipeline has Stable Diffusion 1.x's architecture and DDIM schedule (real
diffusers / transformers classes: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, a CLIPTokenizer whose
vocab.json / merges.txt this file writes), at 32 px with 4 x 16 x 16 latents, random weights and a UNet briefly
pretrained to denoise smooth random fields (its weights committed: world/tiny-unet-150.safetensors). The rewards
are the real reward modules of common.py (the same preprocessing, heads and similarity) on tiny random CLIP
towers. So every line of a method script runs offline, in seconds, exactly as it runs on SD 1.5; only the numbers
mean nothing outside the tiny world.

`--model tiny` and `--tiny` select it (worlds.py routes those names here).
"""

import json
import os
import tempfile

import torch
import torch.nn.functional as F

from common import (
    AestheticMLP,
    AestheticReward,
    ClipSimilarityReward,
    build_imagereward,
    token_ids,
    load_aesthetic_head,
    pipeline_classes,
)


# ----------------------------------------------------------------------------------------------------------
# 1. The tiny text-to-image pipeline
# ----------------------------------------------------------------------------------------------------------

# SD 1.x's DDIM configuration (the hub's scheduler_config.json of stable-diffusion-v1-5): scaled-linear betas,
# abar_prev of the last step = abar_0 (set_alpha_to_one=False), "leading" spacing with steps_offset 1, so that
# 50 steps visit t = 981, 961, ..., 1.
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


def _bytes_to_unicode():
    """GPT-2 / CLIP byte-level BPE alphabet: 256 printable characters standing for the 256 byte values."""
    byte_values = list(range(ord("!"), ord("~") + 1))
    byte_values += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    code_points = byte_values[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return [chr(c) for c in code_points]


def build_tiny_tokenizer(words=(), model_max_length=77, **special_tokens):
    """A real CLIPTokenizer over a small vocabulary whose vocab.json / merges.txt we write ourselves.

    Vocabulary: the 256 byte symbols, the same with the end-of-word marker "</w>", then BOS and EOS (514
    tokens), then one token per word of `words` with the BPE merges that build it ("r e", "re d</w>"). With no
    words (the tiny model) every word is split into its characters: "dog" -> "d", "o", "g</w>", which keeps the
    real tokenizer's behaviour (lower-casing, punctuation split, BOS/EOS, padding with EOS to 77) and makes
    multi-token words the normal case, which is what DiffExp Eq. 8's word masking must handle. `special_tokens`
    go to the tokenizer (SDXL's second tokenizer pads with pad_token="!").
    """
    from transformers import CLIPTokenizer

    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    merges = []
    for word in words:
        # BPE applies the lowest-ranked merge present, so first apply the merges of the earlier words (as the
        # tokenizer would), then add merges that join what is left, left to right: "g re e n</w>" -> "green</w>"
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for merge in merges:
            first, second = merge.split()
            index = 0
            while index < len(pieces) - 1:
                if pieces[index] == first and pieces[index + 1] == second:
                    pieces[index : index + 2] = [first + second]
                index += 1
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "vocab.json"), "w") as f:
            json.dump({token: index for index, token in enumerate(vocab)}, f)
        with open(os.path.join(folder, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "".join(merge + "\n" for merge in dict.fromkeys(merges)))
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length, **special_tokens)


def text_config(tokenizer, hidden_size=32, intermediate_size=37, max_positions=77):
    """A CLIPTextConfig's arguments for a small 2-layer, 4-head text tower over `tokenizer`'s vocabulary."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


TINY_PRETRAIN_STEPS = 150  # about 30 s on 2 idle CPU cores (100 s on busy ones): its result is committed
# The pretrained tiny UNet's weights (fp32, 3.8 MB), written by `python tiny_world.py` from the seeded pretraining
# below, so that a fresh machine or CI does not spend the pretraining's 30-100 s before its first tiny run;
# tests/test_common.py (-m slow) checks that the pretraining still reproduces them.
TINY_UNET_WEIGHTS = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "world", f"tiny-unet-{TINY_PRETRAIN_STEPS}.safetensors"
)


def _tiny_latent_data(batch_size, generator):
    """The tiny model's "data": smooth random latent fields (4 x 4 noise, bicubic-upsampled to 16 x 16), std ~1."""
    coarse = torch.randn(batch_size, 4, 4, 4, generator=generator)
    return F.interpolate(coarse, size=16, mode="bicubic", align_corners=False) * 1.3


def _pretrain_tiny_unet(unet, scheduler, null_embeds):
    """A few hundred seeded steps of the ordinary denoising loss ||eps - eps_theta(x_t, t)||^2 on smooth fields.

    Why: a UNet with random weights is no denoiser. Its eps does not match the noise, so DDIM samples blow up to
    std ~9 and the decoded images hardly depend on what the UNet outputs: a policy could not move any reward.
    After this short pretraining the sampler returns std ~1 latents, and a small change of eps changes the
    image (an eps bias of 0.3 on one channel moves JPEG compressibility by about 3 standard deviations).
    """
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    alphas_cumprod = scheduler.alphas_cumprod
    unet.train()
    for _ in range(TINY_PRETRAIN_STEPS):
        x0 = _tiny_latent_data(32, generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (32,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise  # forward process q(x_t | x_0)
        loss = F.mse_loss(unet(x_t, timesteps, encoder_hidden_states=null_embeds.expand(32, -1, -1)).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()


# The tiny UNet and VAE: 32 px images <-> 4 x 16 x 16 latents. The tiny SDXL adds its conditioning to these.
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    # attention only at the 8 x 8 level (and the mid block): at 16 x 16 it would cost 3/4 of the CPU time
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=16,
    norm_num_groups=8,  # 4-8 channels per GroupNorm group, as SD's 320-1280 channels / 32 groups
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),  # 2 levels -> vae_scale_factor 2: 32 px images <-> 16 x 16 latents
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    latent_channels=4,
    sample_size=32,
    # 4-8 channels per group as in SD's VAE; one channel per group would normalise away every shift of a latent
    # channel, leaving a decoder that barely responds to what the UNet changes
    norm_num_groups=8,
)


def assemble_pipeline(unet, vae, text_encoders, tokenizers, force_zeros_for_empty_prompt=True):
    """A StableDiffusionPipeline (one text encoder) or StableDiffusionXLPipeline (two) with SD 1.x's DDIM schedule,
    which is SDXL's too (scaled-linear betas, leading spacing)."""
    from diffusers import DDIMScheduler

    StableDiffusionPipeline, StableDiffusionXLPipeline = pipeline_classes()
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    if len(text_encoders) == 1:
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoders[0],
            tokenizer=tokenizers[0],
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoders[0],
        text_encoder_2=text_encoders[1],
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )


def _build_tiny_pipeline(pretrain=False):
    """An SD-architecture pipeline, 32x32 images and 4x16x16 latents: random weights, UNet briefly pretrained.

    The UNet's pretrained weights come from TINY_UNET_WEIGHTS; with `pretrain` (or without that file) the seeded
    pretraining computes them.
    """
    from safetensors.torch import load_file
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):  # the same weights every time, without touching the caller's RNG
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**TINY_UNET)
        vae = AutoencoderKL(**TINY_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer)))
    pipeline = assemble_pipeline(unet, vae, [text_encoder], [tokenizer])
    if not pretrain and os.path.exists(TINY_UNET_WEIGHTS):
        unet.load_state_dict(load_file(TINY_UNET_WEIGHTS))  # strict: every key of TINY_UNET's architecture
        return pipeline
    with torch.random.fork_rng(devices=[]):
        with torch.no_grad():  # c_null = the text encoder's output for "", (1, 77, 32)
            null_embeds = text_encoder(token_ids(tokenizer, [""]))[0]
        _pretrain_tiny_unet(unet, pipeline.scheduler, null_embeds)
    return pipeline


def _build_tiny_sdxl_pipeline():
    """An SDXL-architecture pipeline at the tiny model's size, random weights (built in well under a second).

    What makes it SDXL: two text encoders (CLIPTextModel and CLIPTextModelWithProjection, 32 features each,
    concatenated to the UNet's 64-d cross-attention), a second tokenizer that pads with "!" as SDXL's does, and a
    UNet with addition_embed_type="text_time" that adds the pooled text embedding (32) and the six size ids
    (8 Fourier features each) to its time embedding: 32 + 6 x 8 = 80 inputs, as SDXL's 1280 + 6 x 256 = 2816.
    The VAE has SDXL's scaling factor and force_upcast (its fp16 path decodes in fp32).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer, tokenizer_2 = build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            **TINY_UNET
            | dict(
                cross_attention_dim=64,  # 32 + 32: both encoders' features
                attention_head_dim=(2, 4),  # SDXL counts heads per level (5, 10, 20)
                use_linear_projection=True,  # as SDXL
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=80,  # pooled 32 + 6 size ids x 8
            )
        )
        vae = AutoencoderKL(**TINY_VAE, scaling_factor=0.13025, force_upcast=True)  # SDXL's VAE settings
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(tokenizer_2), projection_dim=32))
    return assemble_pipeline(unet, vae, [text_encoder, text_encoder_2], [tokenizer, tokenizer_2])


def pipeline_folder(architecture="sd"):
    """The tiny pipeline's folder (save_pretrained format, about 7 MB): built on first use, then cached.

    architecture "sd" (SD 1.x, `--model tiny`) or "sdxl" (`--model tiny-sdxl`). Later calls, and other processes,
    load the same weights from it with common.load_pipeline, as a hub model.
    """
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    # v2: the UNet from TINY_UNET_WEIGHTS (a v1 folder pretrained its own, which differ by ~2e-5 with the number of
    # threads that pretrained them)
    name = f"tiny-sd-v2-{TINY_PRETRAIN_STEPS}" if architecture == "sd" else "tiny-sdxl-v1"
    folder = os.path.join(cache, "reward-finetuning", name)
    if not os.path.isdir(folder):
        pipeline = _build_tiny_pipeline() if architecture == "sd" else _build_tiny_sdxl_pipeline()
        temporary = f"{folder}.tmp{os.getpid()}"
        pipeline.save_pretrained(temporary, safe_serialization=True)
        try:
            os.rename(temporary, folder)  # atomic: a concurrent process either sees the whole folder or none
        except OSError:  # another process finished first; its weights are the same
            import shutil

            shutil.rmtree(temporary, ignore_errors=True)
    return folder


# ----------------------------------------------------------------------------------------------------------
# 1b. The real architectures with random weights: --model random:sd15, random:sdxl
# ----------------------------------------------------------------------------------------------------------

ARCHITECTURE_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
RANDOM_ARCHITECTURES = ("sd15", "sdxl")  # configs/<name>.json, each with the hub id and commit it was read from


def architecture_config(name):
    """The committed configs of a real pipeline (configs/sd15.json, configs/sdxl.json), keys as in the hub files."""
    with open(os.path.join(ARCHITECTURE_FOLDER, f"{name}.json")) as f:
        return json.load(f)


def random_pipeline(name, dtype, device="cpu"):
    """SD 1.5's or SDXL's UNet, VAE and text encoder(s) at full size from their committed configs, random weights.

    Nothing is downloaded: the tokenizers are this file's byte-level CLIPTokenizer (ids < 514 of the encoders'
    49408), so prompts tokenise differently from the real vocabulary but every tensor has its real shape. Built
    in fp32 on `device` and cast to `dtype` (SD 1.5: 1.07 G parameters, 4.3 GB in fp32; SDXL: 3.5 G, 14 GB); the
    weights depend on the device's random generator (seeded 0 either way). With device="meta" nothing is
    allocated (for counting FLOPs).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = architecture_config(name)
    cuda = [torch.device(device)] if torch.device(device).type == "cuda" else []  # its RNG draws the weights there
    with torch.random.fork_rng(devices=cuda), torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**config["unet"])
        vae = AutoencoderKL(**config["vae"])
        text_encoders = [CLIPTextModel(CLIPTextConfig(**config["text_encoder"]))]
        if name == "sdxl":
            text_encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])))
    if dtype != torch.float32:
        from diffusers.utils import logging as diffusers_logging

        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # a cast with to() warns that no module needs fp32 (none does)
        for module in [unet, vae, *text_encoders]:
            module.to(dtype)
        diffusers_logging.set_verbosity(verbosity)
    tokenizers = [build_tiny_tokenizer(), build_tiny_tokenizer(pad_token="!")][: len(text_encoders)]
    return assemble_pipeline(unet, vae, text_encoders, tokenizers, config.get("force_zeros_for_empty_prompt", True))


# ----------------------------------------------------------------------------------------------------------
# 2. Tiny reward backbones under common.py's reward modules
# ----------------------------------------------------------------------------------------------------------

# Tiny random CLIP towers for the offline rewards: 224 px input, so the real preprocessing applies unchanged.
TINY_CLIP_VISION = dict(
    image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
)


def _tiny_clip_model():
    """A CLIPModel (text + vision) with tiny random weights, and its tiny tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return CLIPModel(
            CLIPConfig(text_config=text_config(tokenizer), vision_config=TINY_CLIP_VISION, projection_dim=32)
        ), tokenizer


def clip_vision_model(projection_dim, seed):
    """A CLIPVisionModelWithProjection with tiny random weights (the same for the same seed)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION, projection_dim=projection_dim))


REWARD_NAMES = ("aesthetic", "pickscore", "clipscore", "imagereward", "hpsv2", "hpsv2.1")  # jpeg_*: no model


def load_reward(name, aesthetic_head_path=None):
    """common.py's reward module `name` on tiny random backbones (fp32, CPU, not yet frozen).

    aesthetic: a random LAION-shaped head, or the real one from `aesthetic_head_path`, on a tiny vision tower
    whose projection is 768-d as ViT-L/14's, so that the real head loads strictly on top of it.
    """
    if name == "aesthetic":
        if aesthetic_head_path is not None:
            head = load_aesthetic_head(aesthetic_head_path)
        else:
            with torch.random.fork_rng(devices=[]):  # the same random head every run
                torch.manual_seed(2)
                head = AestheticMLP()
        return AestheticReward(clip_vision_model(projection_dim=768, seed=1), head)
    if name == "imagereward":  # ImageReward's BLIP ViT + cross-attending BERT + head, tiny and random
        tokenizer = build_tiny_tokenizer()
        vision = dict(img_size=224, patch_size=32, embed_dim=32, depth=2, num_heads=4)
        text = dict(vocab_size=len(tokenizer), hidden_size=32, encoder_width=32, intermediate_size=37)
        text |= dict(num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40, layer_norm_eps=1e-12)
        text |= dict(hidden_act="gelu", pad_token_id=tokenizer.pad_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(4)
            return build_imagereward(vision, text, tokenizer)
    clip_model, tokenizer = _tiny_clip_model()
    # hpsv2 and clipscore: the cosine of the features, pickscore scaled by the CLIP's logit scale
    return ClipSimilarityReward(clip_model, tokenizer, use_logit_scale=name == "pickscore")


if __name__ == "__main__":
    # python tiny_world.py: rerun the seeded pretraining and write TINY_UNET_WEIGHTS (after a change of TINY_UNET,
    # of the pretraining or of TINY_PRETRAIN_STEPS, which names the file and the cache folder)
    from safetensors.torch import save_file

    unet = _build_tiny_pipeline(pretrain=True).unet
    save_file({name: tensor.contiguous() for name, tensor in unet.state_dict().items()}, TINY_UNET_WEIGHTS)
    print(f"wrote {TINY_UNET_WEIGHTS}")
