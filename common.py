"""Shared pieces of the reward fine-tuning scripts, and nothing else:

1. model loading: `load_pipeline` (Stable Diffusion from the hub, or an offline tiny SD-architecture model),
   LoRA on the UNet's attention projections and its diffusers-format save;
2. reward wrappers: `load_reward` (aesthetic, pickscore, clipscore, imagereward, hpsv2, jpeg_*, and the shapes
   world's exact and learned rewards), with differentiable tensor preprocessing for the CLIP-based ones;
3. classifier-free guidance and prompt weighting: `encode_prompts`, `guided_noise_prediction` (Eq. 4),
   `dynamic_cfg_scale` (DiffExp Eq. 7), `random_word_token_mask` and `weight_prompt_embeds` (DiffExp Eq. 8);
4. prompt sets: `load_prompts`.

Every function that rejects user input raises SystemExit with one line starting with "error:", so that a bad
flag ends the run with that line and no traceback.
"""

import io
import json
import os
import tempfile

import torch
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------------------------------------
# 1. Model loading
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

TINY_MODEL = "tiny"
# The shapes world's text-to-image model (shapes_world.py), an ordinary save_pretrained folder in the repository.
SHAPES_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "world", "sd-shapes")


def _bytes_to_unicode():
    """GPT-2 / CLIP byte-level BPE alphabet: 256 printable characters standing for the 256 byte values."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = byte_values[:]
    extra = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + extra)
            extra += 1
    return [chr(c) for c in code_points]


def build_tiny_tokenizer(words=(), model_max_length=77):
    """A real CLIPTokenizer over a small vocabulary whose vocab.json / merges.txt we write ourselves.

    Vocabulary: the 256 byte symbols, the same with the end-of-word marker "</w>", then BOS and EOS (514
    tokens), then one token per word of `words` with the BPE merges that build it ("r e", "re d</w>"). With no
    words (the tiny model) every word is split into its characters: "dog" -> "d", "o", "g</w>", which keeps the
    real tokenizer's behaviour (lower-casing, punctuation split, BOS/EOS, padding with EOS to 77) and makes
    multi-token words the normal case, which is what Eq. 8's word masking must handle.
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
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length)


TINY_PRETRAIN_STEPS = 150  # about 30 s on 2 CPU cores, once: the result is cached (see `_tiny_pipeline_folder`)


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


def _build_tiny_pipeline():
    """An SD-architecture pipeline, 32x32 images and 4x16x16 latents: random weights, UNet briefly pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):  # the same weights every time, without touching the caller's RNG
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            block_out_channels=(32, 64),  # 2 levels -> vae_scale_factor 2: 32 px images <-> 16 x 16 latents
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=32,
            # 4-8 channels per group as in SD's VAE; one channel per group would normalise away every shift of
            # a latent channel, leaving a decoder that barely responds to what the UNet changes
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    with torch.random.fork_rng(devices=[]):
        _pretrain_tiny_unet(unet, scheduler, encode_prompts(tokenizer, text_encoder, [""]))
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_pipeline_folder():
    """Where the tiny pipeline is cached after its first build (save_pretrained format, about 7 MB)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(cache, "reward-finetuning", f"tiny-sd-v1-{TINY_PRETRAIN_STEPS}")


def _load_tiny_pipeline():
    """Build the tiny pipeline once and cache it; later calls (and other processes) load the same weights."""
    from diffusers import StableDiffusionPipeline

    folder = _tiny_pipeline_folder()
    if not os.path.isdir(folder):
        pipeline = _build_tiny_pipeline()
        temporary = f"{folder}.tmp{os.getpid()}"
        pipeline.save_pretrained(temporary, safe_serialization=True)
        try:
            os.rename(temporary, folder)  # atomic: a concurrent process either sees the whole folder or none
        except OSError:  # another process finished first; its weights are the same
            import shutil

            shutil.rmtree(temporary, ignore_errors=True)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # a 7 MB local folder needs no loading bars
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _hub_error(what, exception):
    """One error line for anything that could not be loaded from the hub or a folder (no traceback)."""
    message = str(exception).strip().splitlines()[0] if str(exception).strip() else type(exception).__name__
    return SystemExit(
        f"error: cannot load {what} ({message}). Check the id or folder and the network, or use --tiny to run offline."
    )


def load_pipeline(model, device, dtype):
    """A StableDiffusionPipeline with a DDIMScheduler, frozen, on `device` in `dtype`.

    `model="tiny"` builds the offline tiny model; anything else is a hub id or a local folder.
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    if model == TINY_MODEL:
        pipeline = _load_tiny_pipeline()
    else:
        try:
            pipeline = StableDiffusionPipeline.from_pretrained(
                model, dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
        except Exception as exception:  # OSError for a missing repo or no network, ValueError for bad folders
            raise _hub_error(f"the model '{model}'", exception)
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.to(device)  # the tiny model is built in fp32 and cast below; the hub model loaded in `dtype`
    if model == TINY_MODEL and dtype != torch.float32:
        pipeline.to(dtype=dtype)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet's attention projections, as in DDPO


def add_lora(unet, rank):
    """Add LoRA adapters (rank `rank`, alpha = rank) to the UNet's attention projections; return their params.

    peft initialises B = 0, so the adapted UNet starts as the pretrained one. The trainable parameters are
    cast to fp32 even when the frozen weights are fp16 / bf16: Adam updates of ~1e-4 vanish in half precision.
    """
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES)
    )
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    for parameter in lora_parameters:
        parameter.data = parameter.data.float()
    return lora_parameters


def save_lora(unet, folder):
    """Write the UNet's LoRA as `pytorch_lora_weights.safetensors` that `pipeline.load_lora_weights` loads."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=lora_state, safe_serialization=True)


# ----------------------------------------------------------------------------------------------------------
# 2. Reward wrappers: callables (images (B, 3, H, W) in [0, 1], prompts) -> rewards (B,), with `differentiable`
# ----------------------------------------------------------------------------------------------------------

REWARD_NAMES = (
    "aesthetic",
    "pickscore",
    "clipscore",
    "imagereward",
    "hpsv2",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "shapes",
    "shapes_learned",
)
DIFFERENTIABLE_REWARDS = ("aesthetic", "pickscore", "clipscore", "shapes_learned")
SHAPES_REWARDS = ("shapes", "shapes_learned")  # the shapes world's rewards (shapes_world.py): captions from its grammar

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor and the CLIPScore backbone


def check_reward_name(name):
    if name not in REWARD_NAMES:
        raise SystemExit(f"error: unknown reward '{name}'; choose one of {', '.join(REWARD_NAMES)}")


def check_reward_prompts(name, prompts):
    """The shapes rewards score captions of the shapes world's grammar only: one error line for any other prompt."""
    if name in SHAPES_REWARDS:
        from shapes_world import parse_caption

        outside = [prompt for prompt in prompts if parse_caption(prompt) is None]
        if outside:
            raise SystemExit(
                f"error: the {name} reward needs captions of the shapes grammar (e.g. --prompts shapes); '{outside[0]}' is not one"
            )


def clip_preprocess(images, size=224):
    """Differentiable version of CLIPImageProcessor: (B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised.

    Same steps as the processor: bicubic resize of the shortest side to `size` (with antialiasing, as PIL
    does), centre crop, clamp to [0, 1], normalise with CLIP's mean / std. No uint8 round trip, so the
    gradient reaches the pixels (the processor's own quantisation is the only difference, about 1/255).
    """
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    images = F.interpolate(images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    images = images[..., top : top + size, left : left + size].clamp(0, 1)
    mean = images.new_tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def images_to_pil(images):
    """(B, 3, H, W) float in [0, 1] -> list of PIL RGB images (uint8, so not differentiable)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(image) for image in array]


class AestheticMLP(torch.nn.Module):
    """LAION improved aesthetic predictor head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (keys layers.{0,2,4,6,7})."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(768, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, embeddings):
        return self.layers(embeddings)


class AestheticReward(torch.nn.Module):
    """aesthetic = MLP(CLIP ViT-L/14 image embedding / ||embedding||); about 4-7 on real images."""

    differentiable = True

    def __init__(self, vision_model, head):
        super().__init__()
        self.vision_model, self.head = vision_model, head  # CLIPVisionModelWithProjection, AestheticMLP

    def forward(self, images, prompts):
        embeddings = self.vision_model(
            pixel_values=clip_preprocess(images).to(self.head.layers[0].weight.dtype)
        ).image_embeds
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)  # the MLP was trained on unit vectors
        return self.head(embeddings).squeeze(-1).float()  # (B,)


class ClipSimilarityReward(torch.nn.Module):
    """scale * cos(image embedding, text embedding): PickScore (scale = logit_scale.exp()) or CLIPScore (1)."""

    differentiable = True

    def __init__(self, clip_model, tokenizer, use_logit_scale):
        super().__init__()
        self.clip_model, self.tokenizer, self.use_logit_scale = clip_model, tokenizer, use_logit_scale

    def forward(self, images, prompts):
        model = self.clip_model
        pixel_values = clip_preprocess(images).to(model.visual_projection.weight.dtype)
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)  # (B, D)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        text_output = model.text_model(
            input_ids=tokens.input_ids.to(pixel_values.device),
            attention_mask=tokens.attention_mask.to(pixel_values.device),
        )
        text_embeds = model.text_projection(text_output.pooler_output)  # (B, D)
        cosine = F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)  # (B,)
        return model.logit_scale.exp().float() * cosine if self.use_logit_scale else cosine


class JpegReward(torch.nn.Module):
    """DDPO's JPEG (in)compressibility: the image's JPEG size at quality 95 in kB, negated for compressibility."""

    differentiable = False

    def __init__(self, sign):
        super().__init__()
        self.sign = sign  # -1: smaller files are better (compressibility); +1: incompressibility

    def forward(self, images, prompts):
        sizes_kb = []
        for image in images_to_pil(images):
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            sizes_kb.append(buffer.tell() / 1000)
        return self.sign * torch.tensor(sizes_kb, device=images.device)


class PackageReward(torch.nn.Module):
    """A reward from an optional package that scores PIL images one prompt at a time (not differentiable)."""

    differentiable = False

    def __init__(self, score_one):
        super().__init__()
        self.score_one = score_one  # (PIL image, prompt) -> float

    def forward(self, images, prompts):
        scores = [float(self.score_one(image, prompt)) for image, prompt in zip(images_to_pil(images), prompts)]
        return torch.tensor(scores, device=images.device)


# Tiny random CLIP towers for the offline rewards: 224 px input, so the real preprocessing applies unchanged.
TINY_CLIP_VISION = dict(
    image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
)


def _tiny_clip_model():
    """A CLIPModel (text + vision) with tiny random weights, and its tiny tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_tiny_tokenizer()
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return CLIPModel(
            CLIPConfig(text_config=text_config, vision_config=TINY_CLIP_VISION, projection_dim=32)
        ), tokenizer


def load_reward(name, device, dtype, tiny=False, aesthetic_head_path=None):
    """The reward `name` as a frozen module: (images (B, 3, H, W) in [0, 1], prompts) -> (B,) float32.

    `tiny=True` builds the same computation on tiny random backbones, offline. `aesthetic_head_path` reads the
    LAION MLP from a local file instead of the hub (`trl-lib/ddpo-aesthetic-predictor`).
    """
    check_reward_name(name)
    if name == "shapes":
        from shapes_world import ExactShapesReward

        reward = ExactShapesReward()
    elif name == "shapes_learned":
        from safetensors.torch import load_file

        from shapes_world import DEFAULT_WORLD, LEARNED_REWARD_FILE, LearnedShapesReward

        path = os.path.join(DEFAULT_WORLD, LEARNED_REWARD_FILE)
        if not os.path.exists(path):
            raise SystemExit(
                f"error: learned shapes reward '{path}' not found; train it with: python shapes_world.py --stages reward"
            )
        reward = LearnedShapesReward()
        reward.load_state_dict(load_file(path))
    elif name.startswith("jpeg_"):
        reward = JpegReward(sign=-1.0 if name == "jpeg_compressibility" else 1.0)
    elif name == "aesthetic":
        with torch.random.fork_rng(devices=[]):  # deterministic random head for the tiny reward
            torch.manual_seed(2)
            head = AestheticMLP()
        if aesthetic_head_path is None and not tiny:
            try:
                from huggingface_hub import hf_hub_download

                aesthetic_head_path = hf_hub_download(*AESTHETIC_HEAD)
            except Exception as exception:
                raise _hub_error("the aesthetic head", exception)
        if aesthetic_head_path is not None:
            if not os.path.exists(aesthetic_head_path):
                raise SystemExit(f"error: aesthetic head weights '{aesthetic_head_path}' not found")
            head.load_state_dict(torch.load(aesthetic_head_path, map_location="cpu", weights_only=True), strict=True)
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if tiny:  # projection to 768-d, as ViT-L/14's, so the real LAION head loads strictly on top of it
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                vision_model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION, projection_dim=768))
        else:
            try:
                vision_model = CLIPVisionModelWithProjection.from_pretrained(AESTHETIC_CLIP)
            except Exception as exception:
                raise _hub_error(AESTHETIC_CLIP, exception)
        reward = AestheticReward(vision_model, head)
    elif name in ("pickscore", "clipscore"):
        if tiny:
            clip_model, tokenizer = _tiny_clip_model()
        else:
            from transformers import AutoTokenizer, CLIPModel

            model_id = PICKSCORE_MODEL if name == "pickscore" else LAION_CLIP_H
            try:
                clip_model = CLIPModel.from_pretrained(model_id)
                tokenizer = AutoTokenizer.from_pretrained(LAION_CLIP_H)
            except Exception as exception:
                raise _hub_error(model_id, exception)
        reward = ClipSimilarityReward(clip_model, tokenizer, use_logit_scale=name == "pickscore")
    elif name == "imagereward":
        if tiny:
            raise SystemExit("error: imagereward has no tiny version; use it with a real model (it needs the network)")
        try:
            import ImageReward
        except ImportError:
            raise SystemExit("error: the imagereward reward needs its package: pip install image-reward")
        model = ImageReward.load("ImageReward-v1.0", device=device)
        reward = PackageReward(lambda image, prompt: model.score(prompt, image))
    else:  # hpsv2
        if tiny:
            raise SystemExit("error: hpsv2 has no tiny version; use it with a real model (it needs the network)")
        try:
            import hpsv2
        except ImportError:
            raise SystemExit("error: the hpsv2 reward needs its package: pip install hpsv2")
        reward = PackageReward(lambda image, prompt: hpsv2.score(image, prompt, hps_version="v2.1")[0])
    reward.requires_grad_(False)
    return reward.eval().to(device, dtype)


# ----------------------------------------------------------------------------------------------------------
# 3. Classifier-free guidance and prompt weighting
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts):
    """Text encoder output sequences c, (B, 77, D) (D = 768 for SD 1.x), as the SD pipeline computes them."""
    input_ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(input_ids.to(text_encoder.device))[0]


def guided_noise_prediction(unet, latents, timestep, prompt_embeds, null_embeds, guidance_scales):
    """Eq. 4: eps~ = eps(x_t, t, c_null) + w * (eps(x_t, t, c) - eps(x_t, t, c_null)), in one batched UNet call.

    latents (B, 4, h, w), timestep an int or (B,), prompt_embeds (B, L, D), null_embeds (B, L, D) or (1, L, D), guidance_scales (B,)
    (per-sample scales, because each sample must be recomputed with the scale that sampled it).
    """
    batch_size = latents.shape[0]
    null_embeds = null_embeds.expand(batch_size, -1, -1)
    timestep = (
        torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(batch_size)
    )  # (B,): one t or one per sample
    noise_pred = unet(
        torch.cat([latents, latents]),
        torch.cat([timestep, timestep]),
        encoder_hidden_states=torch.cat([null_embeds, prompt_embeds]),
    ).sample
    noise_uncond, noise_cond = noise_pred.chunk(2)  # (B, 4, h, w) each
    guidance_scales = guidance_scales.to(noise_cond.device, noise_cond.dtype).view(
        batch_size, 1, 1, 1
    )  # built on the CPU
    return noise_uncond + guidance_scales * (noise_cond - noise_uncond)


def dynamic_cfg_scale(t, w_low, w_high, t_thres):
    """DiffExp Eq. 7: w(t) = w_low if t > t_thres else w_high (t on the 0..1000 scale; t = 1000 is noise).

    Low guidance on the first, noisiest steps lets the layout vary; high guidance afterwards keeps quality.
    """
    return w_low if int(t) > t_thres else w_high


def random_word_token_mask(tokenizer, prompts, generator):
    """Bool mask (B, L): per prompt, every token of ONE uniformly random word (never BOS, EOS or padding).

    A word is a whitespace-separated piece of the prompt; its tokens are found by tokenising each word alone
    (CLIP's tokeniser splits on whitespace first, so the prompt's tokens are the words' tokens in order).
    """
    length = tokenizer.model_max_length
    mask = torch.zeros(len(prompts), length, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        spans, position = [], 1  # position 0 is BOS
        for word in prompt.split():
            count = len(tokenizer(word, add_special_tokens=False).input_ids)
            end = min(position + count, length - 1)  # the last position always holds EOS after truncation
            if end > position:
                spans.append((position, end))
            position += count
        if spans:  # an empty prompt has no word to weight
            start, end = spans[torch.randint(len(spans), (1,), generator=generator).item()]
            mask[row, start:end] = True
    return mask


def weight_prompt_embeds(prompt_embeds, null_embeds, token_mask, weights):
    """DiffExp Eq. 8 on the text encoder's output: c[i] <- c_null[i] + w * (c[i] - c_null[i]) where masked.

    prompt_embeds (B, L, D), null_embeds (1 or B, L, D) = encoding of "", token_mask (B, L) bool, weights (B,).
    w = 1 is the identity; w > 1 moves the chosen word's tokens further from the empty prompt (emphasis).
    """
    weights = weights.to(prompt_embeds.dtype).view(-1, 1, 1)
    weighted = null_embeds + weights * (prompt_embeds - null_embeds)
    return torch.where(token_mask.unsqueeze(-1).to(prompt_embeds.device), weighted, prompt_embeds)


# ----------------------------------------------------------------------------------------------------------
# 4. Prompt sets
# ----------------------------------------------------------------------------------------------------------

# DiffExp Table 1 (the DDPO animal list) and Table 2.
ANIMALS = (
    "ant bat bear beetle bee bird butterfly camel cat chicken cow deer dog dolphin duck fish fly fox frog goat "
    "goose gorilla hedgehog horse kangaroo lion lizard llama monkey mouse pig rabbit raccoon rat shark sheep "
    "snake spider squirrel tiger turkey turtle whale wolf zebra"
).split()
ACTIVITIES = ("washing the dishes", "riding a bike", "playing chess")
UNSEEN_ANIMALS = ("hippopotamus", "snail", "crocodile", "cheetah", "lobster", "octopus")
UNSEEN_ACTIVITIES = ("doing laundry", "driving a car", "playing soccer")


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


PROMPT_SETS = {
    "animals": list(ANIMALS),
    "unseen_animals": list(UNSEEN_ANIMALS),
    "animal_activities": [f"{_article(a)} {a} {activity}" for a in ANIMALS for activity in ACTIVITIES],
    # Assumption: the unseen-activity set pairs the 45 training animals with Table 2's activities, so only the
    # activity is new (the DiffExp paper says "different types of ... activities" without listing pairs).
    "unseen_activities": [f"{_article(a)} {a} {activity}" for a in ANIMALS for activity in UNSEEN_ACTIVITIES],
}
# The unseen set each named training set is evaluated against (Figure 6 of DiffExp).
UNSEEN_PROMPT_SET = {"animals": "unseen_animals", "animal_activities": "unseen_activities", "shapes": "unseen_shapes"}


PROMPT_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
# The shapes world's (shapes_world.py) named sets: rare colour-shape pairs, counts and relations; kept in files.
PROMPT_SET_FILES = {"shapes": "shapes_train.txt", "unseen_shapes": "shapes_unseen.txt"}


def load_prompts(name_or_path):
    """A named prompt set (`PROMPT_SETS`) or a .txt file with one prompt a line (blank lines ignored)."""
    if name_or_path in PROMPT_SETS:
        return list(PROMPT_SETS[name_or_path])
    if name_or_path in PROMPT_SET_FILES:
        name_or_path = os.path.join(PROMPT_FOLDER, PROMPT_SET_FILES[name_or_path])
    elif not name_or_path.endswith(".txt"):
        raise SystemExit(
            f"error: unknown prompt set '{name_or_path}'; choose one of {', '.join([*PROMPT_SETS, *PROMPT_SET_FILES])} or give a .txt file"
        )
    if not os.path.isfile(name_or_path):
        raise SystemExit(f"error: prompt file '{name_or_path}' not found")
    with open(name_or_path) as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit(f"error: prompt file '{name_or_path}' has no prompts")
    return prompts
