"""Shared pieces of the reward fine-tuning scripts, and nothing else:

1. model loading: `load_pipeline` (Stable Diffusion from the hub or a local folder), LoRA on the UNet's
   attention projections and its diffusers-format save;
2. reward wrappers: `load_reward` (aesthetic, pickscore, clipscore, imagereward, hpsv2(.1), jpeg_*), with
   differentiable tensor preprocessing for the CLIP-based ones;
3. classifier-free guidance and prompt weighting: `encode_prompts`, `guided_noise_prediction` (Eq. 4),
   `dynamic_cfg_scale` and `guidance_scale_schedule` (DiffExp Eq. 7), `random_word_token_mask`,
   `weight_prompt_embeds` and `randomly_weight_prompts` (DiffExp Eq. 8);
4. prompt sets: `load_prompts`, `unseen_twin`.

It imports nothing of this project. The offline worlds (tiny_world.py, shapes_world.py) build on it, and
worlds.py routes their names (`--model tiny`, `--tiny`, the shapes rewards) to them.

Every function that rejects user input raises SystemExit with one line starting with "error:", so that a bad
flag ends the run with that line and no traceback.
"""

import io
import math
import os
import re

import torch
import torch.nn.functional as F
from PIL import Image

# ----------------------------------------------------------------------------------------------------------
# 1. Model loading
# ----------------------------------------------------------------------------------------------------------


def first_line(exception):
    """The first line of an exception's message (its type's name if it has none), for a one-line error."""
    return str(exception).strip().splitlines()[0] if str(exception).strip() else type(exception).__name__


def hub_error(what, exception):
    """One error line for anything that could not be loaded from the hub or a folder (no traceback)."""
    return SystemExit(
        f"error: cannot load {what} ({first_line(exception)}). Check the id or folder and the network, or use "
        "--tiny to run offline."
    )


def check_hub_reachable(repositories, what, offline="use --tiny to run offline"):
    """Stop at once with one error line if a hub repository of `what` is neither in the local cache nor reachable.

    Without this, huggingface_hub would try each file of a model it cannot reach five times, about 30 s in all and
    two log lines a try, before the loader gives up. A repository in the cache loads from it (offline too);
    model_info asks the hub once and fails at once without network, under HF_HUB_OFFLINE=1 or for a missing
    repository, as load_pipeline's own check does. `offline` says what the run can use instead.
    """
    from huggingface_hub import model_info, snapshot_download

    for repository in repositories:
        try:
            snapshot_download(repository, local_files_only=True)  # cached: nothing to ask the hub
            continue
        except Exception:  # LocalEntryNotFoundError: not in the cache
            pass
        try:
            model_info(repository)
        except Exception as exception:  # a connection error, OfflineModeIsEnabled, RepositoryNotFoundError
            raise SystemExit(
                f"error: cannot load {what}: {repository} is neither in the local cache nor reachable on the hub "
                f"({first_line(exception)}). Check the network, or {offline}."
            )


def freeze(module, device, dtype):
    """No gradients, eval mode (no dropout), on `device` in `dtype`: how every pretrained network is used here."""
    module.requires_grad_(False)
    return module.eval().to(device, dtype)


def pipeline_classes():
    """(StableDiffusionPipeline, StableDiffusionXLPipeline), imported without transformers' note that torchvision is
    absent (it is, on purpose: see the README), which is noise."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    transformers_logging.set_verbosity(verbosity)
    return StableDiffusionPipeline, StableDiffusionXLPipeline


def disable_library_progress_bars():
    """Turn off the loading and download bars of diffusers, transformers and huggingface_hub (transformers' switch
    turns off the hub's): in a log file each redraw of a bar stays, as a fragment of a line."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_pipeline(model, device, dtype):
    """A Stable Diffusion 1.x or SDXL pipeline from a hub id or a local folder (the class its model_index.json
    names), with a DDIMScheduler of its own schedule, frozen, on `device`.

    SDXL's VAE overflows in fp16 (its config sets force_upcast): it is then kept in fp32 and decodes fp32 latents,
    as diffusers' SDXL pipeline upcasts it. A folder with the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix, whose
    config clears force_upcast) decodes in fp16.
    """
    from diffusers.utils import logging as diffusers_logging

    StableDiffusionPipeline, StableDiffusionXLPipeline = pipeline_classes()
    if os.path.isdir(model):
        diffusers_logging.disable_progress_bar()  # a local folder needs no loading bars
    try:
        class_name = pipeline_class_name(model)
    except Exception as exception:  # OSError for a missing repo or no network, ValueError for bad folders
        raise hub_error(f"the model '{model}'", exception)
    if class_name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise SystemExit(f"error: '{model}' is a {class_name}; the scripts train Stable Diffusion 1.x or SDXL")
    try:
        if class_name == "StableDiffusionXLPipeline":
            pipeline = StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype)
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(
                model, dtype=dtype, safety_checker=None, requires_safety_checker=False
            )
    except Exception as exception:
        raise hub_error(f"the model '{model}'", exception)
    return prepare_pipeline(pipeline, device, dtype)


def prepare_pipeline(pipeline, device, dtype):
    """What every pipeline gets before training: a DDIMScheduler of its own schedule, its networks frozen in eval
    mode on `device`, SDXL's VAE in fp32 under fp16 (force_upcast), no progress bars."""
    from diffusers import DDIMScheduler

    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.to(device)  # loaded in `dtype` already (a second cast would make diffusers warn about fp32 modules)
    if is_sdxl(pipeline) and dtype == torch.float16 and pipeline.vae.config.force_upcast:
        pipeline.vae.to(torch.float32)  # decodes latents.to(vae.dtype): fp32
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder, getattr(pipeline, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def pipeline_class_name(model):
    """The pipeline class that a model's model_index.json names, read alone (no weights are fetched for it)."""
    import warnings

    from diffusers import DiffusionPipeline
    from huggingface_hub import model_info

    with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument: noise
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")
        try:  # a folder, or a hub model already in the cache
            return DiffusionPipeline.load_config(model, local_files_only=True)["_class_name"]
        except OSError:
            pass
        model_info(model)  # fails at once without network or for a missing repo (load_config would retry ~25 s)
        return DiffusionPipeline.load_config(model)["_class_name"]


def is_sdxl(pipeline_or_unet):
    """SDXL's UNet takes pooled text embeddings and size ids beside the text sequence (addition_embed_type)."""
    unet = getattr(pipeline_or_unet, "unet", pipeline_or_unet)
    unet = getattr(unet, "module", unet)  # unwrap DDP
    return unet.config.addition_embed_type == "text_time"


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

REWARD_NAMES = (  # the rewards of real models (worlds.py adds the shapes world's)
    "aesthetic",
    "pickscore",
    "clipscore",
    "imagereward",
    "hpsv2",
    "hpsv2.1",
    "jpeg_compressibility",
    "jpeg_incompressibility",
)
DIFFERENTIABLE_REWARDS = ("aesthetic", "pickscore", "clipscore", "imagereward", "hpsv2", "hpsv2.1")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

AESTHETIC_CLIP = "openai/clip-vit-large-patch14"
AESTHETIC_HEAD = ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth")
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
LAION_CLIP_H = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor and the CLIPScore backbone


def check_reward_name(name, names=REWARD_NAMES):
    if name not in names:
        raise SystemExit(f"error: unknown reward '{name}'; choose one of {', '.join(names)}")


def clip_preprocess(images, size=224, resize="bicubic"):
    """Differentiable version of CLIPImageProcessor: (B, 3, H, W) in [0, 1] -> (B, 3, size, size) normalised.

    Same steps as the processor: bicubic resize of the shortest side to `size` (with antialiasing, as PIL
    does), centre crop, clamp to [0, 1], normalise with CLIP's mean / std. No uint8 round trip, so the
    gradient reaches the pixels (the processor's own quantisation is the only difference, about 1/255).
    resize="bilinear" resizes as AlignProp@a831a5f's `torchvision.transforms.Resize(224)` did on a tensor under
    its torchvision 0.15.2: bilinear, no antialiasing, align_corners False, computed in fp32 and cast back.
    """
    height, width = images.shape[-2:]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    if resize == "bilinear":  # no antialiasing: from 512 px an output pixel reads 2 x 2 of the ~2.3 x 2.3 it covers
        resized = F.interpolate(images.float(), size=(new_height, new_width), mode="bilinear", align_corners=False)
        images = resized.to(images.dtype)
    else:
        images = F.interpolate(
            images, size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True
        )
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
    """LAION improved aesthetic predictor head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (keys layers.{0,2,4,6,7}).

    ImageReward's score head has the same layers (its input: the BLIP text encoder's [CLS] feature).
    """

    def __init__(self, input_size=768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
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
    resize = "bicubic"  # clip_preprocess's; set_reward_resize changes it

    def __init__(self, vision_model, head):
        super().__init__()
        self.vision_model, self.head = vision_model, head  # CLIPVisionModelWithProjection, AestheticMLP

    def forward(self, images, prompts):
        embeddings = self.vision_model(
            pixel_values=clip_preprocess(images, resize=self.resize).to(self.head.layers[0].weight.dtype)
        ).image_embeds
        embeddings = embeddings / embeddings.norm(dim=-1, keepdim=True)  # the MLP was trained on unit vectors
        return self.head(embeddings).squeeze(-1).float()  # (B,)


class ClipSimilarityReward(torch.nn.Module):
    """scale * cos(image embedding, text embedding): PickScore (scale = logit_scale.exp()), CLIPScore and HPSv2 (1).

    HPSv2 is the cosine of its fine-tuned CLIP's features; open_clip pads its tokens with 0 and passes no padding
    mask, which gives the same features: the text is pooled at EOT, and causal attention never looks past it.
    """

    differentiable = True
    resize = "bicubic"  # clip_preprocess's; set_reward_resize changes it

    def __init__(self, clip_model, tokenizer, use_logit_scale):
        super().__init__()
        self.clip_model, self.tokenizer, self.use_logit_scale = clip_model, tokenizer, use_logit_scale

    def cosine(self, pixel_values, input_ids, attention_mask=None):
        """cos(image, text embedding), (B,) float32; pixel_values CLIP-normalised (B, 3, 224, 224), tokens (B, L)."""
        model = self.clip_model
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)  # (B, D)
        text_output = model.text_model(input_ids=input_ids, attention_mask=attention_mask)
        text_embeds = model.text_projection(text_output.pooler_output)  # (B, D)
        return F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1)

    def forward(self, images, prompts):
        model = self.clip_model
        pixel_values = clip_preprocess(images, resize=self.resize).to(model.visual_projection.weight.dtype)
        tokens = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
        device = pixel_values.device
        cosine = self.cosine(pixel_values, tokens.input_ids.to(device), tokens.attention_mask.to(device))  # (B,)
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


# Ours (DiffExp's DrawBench ensemble of HPS, Aesthetic and PickScore publishes no weights): before the weighted sum,
# each member is put on a common scale, (r - center) / spread, with (center, spread) = a typical value of the
# reward on Stable Diffusion 1.5 samples and its spread across images, from the ranges the reward papers and the
# references' logs report (not measured here: this machine downloads no weights). One unit is then about one
# spread of any member, so PickScore's ~21 +- 1 does not drown HPSv2's ~0.27 +- 0.02. A weight in the spec
# (--reward 2*hpsv2+aesthetic) rescales a member on top of that.
REWARD_SCALES = {
    "aesthetic": (5.5, 0.5),  # LAION predictor: SD 1.5 animals start near 5-6 (DDPO, AlignProp logs)
    "pickscore": (21.0, 1.0),  # logit_scale x cosine: about 18-23 on real images
    "clipscore": (0.30, 0.04),  # raw ViT-H-14 cosine of a matching caption
    "imagereward": (0.0, 1.0),  # standardised by the model itself (its mean / std normalisation)
    "hpsv2": (0.27, 0.02),  # HPSv2 v2.0: SD 1.5 averages about 0.27 on its benchmark
    "hpsv2.1": (0.27, 0.02),
    "jpeg_compressibility": (-60.0, 20.0),  # kB at quality 95 of a 512 px SD image, negated
    "jpeg_incompressibility": (60.0, 20.0),
}


def parse_reward_spec(spec, names=REWARD_NAMES):
    """The members of a reward spec, [(weight, name), ...]: "aesthetic" -> [(1.0, "aesthetic")];
    "hpsv2+aesthetic+0.5*pickscore" -> an ensemble. One error line for an unknown name, a bad or zero weight, or
    a member given twice."""
    members = []
    for term in spec.split("+"):
        weight, _, name = term.rpartition("*") if "*" in term else ("1", "", term)
        try:
            weight = float(weight)
        except ValueError:
            raise SystemExit(f"error: reward '{spec}': '{term}' is not WEIGHT*NAME (a number, *, a reward name)")
        check_reward_name(name.strip(), names)
        if not math.isfinite(weight) or weight == 0:
            raise SystemExit(f"error: reward '{spec}': the weight of {name.strip()} must be finite and nonzero")
        members.append((weight, name.strip()))
    if len({name for _, name in members}) < len(members):
        raise SystemExit(f"error: reward '{spec}' names a reward twice; give it one weight instead")
    return members


def set_reward_resize(reward_fn, resize):
    """Make every reward module inside `reward_fn` (an ensemble's members too) resize with clip_preprocess's
    `resize` ("bicubic" or "bilinear"); rewards without a CLIP-style preprocessing (JPEG, shapes) are left alone."""
    for module in reward_fn.modules() if isinstance(reward_fn, torch.nn.Module) else []:
        if isinstance(getattr(module, "resize", None), str):
            module.resize = resize


class EnsembleReward(torch.nn.Module):
    """A weighted sum of normalised rewards: R = sum_i w_i (r_i - center_i) / spread_i (REWARD_SCALES).

    `score` also returns each member's raw reward, which the scripts log beside R. Differentiable when every
    member is (AlignProp backpropagates through all of them at once).
    """

    def __init__(self, members, scales):
        super().__init__()
        self.names = [name for _, name, _ in members]
        self.weights = [weight for weight, _, _ in members]
        self.members = torch.nn.ModuleList([reward for _, _, reward in members])
        self.scales = [scales[name] for name in self.names]
        self.differentiable = all(getattr(reward, "differentiable", True) for reward in self.members)

    def score(self, images, prompts):
        """(R (B,), {name: raw r_i (B,)})."""
        raw = {name: reward(images, prompts).float() for name, reward in zip(self.names, self.members)}
        total = sum(
            weight * (raw[name] - center) / spread
            for name, weight, (center, spread) in zip(self.names, self.weights, self.scales)
        )
        return total, raw

    def forward(self, images, prompts):
        return self.score(images, prompts)[0]


def score_images(reward_fn, images, prompts):
    """(rewards (B,), member rewards {name: (B,)}): an ensemble's total and its members; {} for a single reward."""
    if isinstance(reward_fn, EnsembleReward):
        return reward_fn.score(images, prompts)
    return reward_fn(images, prompts), {}


HPSV2_REPOSITORY = "xswu/HPSv2"
HPSV2_CHECKPOINTS = {"hpsv2": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}  # v2.0, v2.1
# open_clip's ViT-H-14 (its model_configs/ViT-H-14.json), the architecture of both HPSv2 checkpoints
VIT_H_14 = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def clip_config_from_open_clip(config):
    """transformers' CLIPConfig of an open_clip CLIP config (GELU, layer norm eps 1e-5, the text pooled at EOT)."""
    from transformers import CLIPConfig

    vision, text = config["vision_cfg"], config["text_cfg"]
    return CLIPConfig(
        projection_dim=config["embed_dim"],
        vision_config=dict(
            image_size=vision["image_size"],
            patch_size=vision["patch_size"],
            hidden_size=vision["width"],
            intermediate_size=4 * vision["width"],  # open_clip's mlp_ratio 4
            num_hidden_layers=vision["layers"],
            num_attention_heads=vision["width"] // vision["head_width"],
            hidden_act="gelu",
        ),
        text_config=dict(
            vocab_size=text["vocab_size"],
            hidden_size=text["width"],
            intermediate_size=4 * text["width"],
            num_hidden_layers=text["layers"],
            num_attention_heads=text["heads"],
            max_position_embeddings=text["context_length"],
            hidden_act="gelu",
            bos_token_id=49406,  # <|startoftext|>
            eos_token_id=49407,  # <|endoftext|>: open_clip pools the text at its (first, argmax) position
            pad_token_id=0,  # open_clip pads with 0
        ),
    )


def open_clip_state_to_transformers(state):
    """open_clip CLIP weights (HPSv2's `state_dict` key names) -> transformers CLIPModel's, tensor for tensor.

    The fused attention projection in_proj (3 D, D) splits into q, k, v; the two projections `visual.proj` and
    `text_projection` are (in, out) matrices where nn.Linear stores (out, in).
    """
    converted = {"logit_scale": state["logit_scale"]}
    towers = (("visual.", "vision_model.", "visual.transformer."), ("", "text_model.", "transformer."))
    for source, target, blocks in towers:
        for key, value in state.items():
            if not key.startswith(blocks):
                continue
            layer, name = key[len(blocks + "resblocks.") :].split(".", 1)
            prefix = f"{target}encoder.layers.{layer}."
            if name.startswith("attn.in_proj_"):
                for part, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                    converted[f"{prefix}self_attn.{part}.{name.rsplit('_', 1)[-1]}"] = chunk
                continue
            renamed = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj"}
            renamed |= {"mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
            module, parameter = name.rsplit(".", 1)
            converted[f"{prefix}{renamed[module]}.{parameter}"] = value
    converted |= {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],  # (sic: transformers' name)
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T,
    }
    return converted


def load_open_clip_checkpoint(path, open_clip_config):
    """A transformers CLIPModel with the weights of an open_clip checkpoint file (`{"state_dict": ...}`), strict."""
    from transformers import CLIPModel

    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    state = {key.removeprefix("module."): value for key, value in state.items()}  # a DDP-saved checkpoint
    try:
        converted = open_clip_state_to_transformers(state)
    except (KeyError, ValueError) as error:  # a tensor open_clip's CLIP has is missing, or a key is not its
        raise SystemExit(f"error: {path} is not an open_clip CLIP checkpoint (no {error})")
    model = CLIPModel(clip_config_from_open_clip(open_clip_config))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]  # a buffer, not a weight
    if missing or unexpected:
        raise SystemExit(f"error: {path} is not an open_clip CLIP checkpoint ({(missing + unexpected)[:3]})")
    return model


def hpsv2_model(checkpoint_file):
    """(CLIPModel, tokenizer) of HPSv2, from the hub's checkpoint converted to transformers' CLIP (no open_clip,
    which imports torchvision), loaded once: the hpsv2 package's own `score` rebuilds its model on every call."""
    from huggingface_hub import hf_hub_download
    from transformers import AutoTokenizer

    try:
        path = hf_hub_download(HPSV2_REPOSITORY, checkpoint_file)
        tokenizer = AutoTokenizer.from_pretrained(LAION_CLIP_H)  # open_clip's BPE, padded with 0 to 77
    except Exception as exception:
        raise hub_error(f"{HPSV2_REPOSITORY}/{checkpoint_file}", exception)
    return load_open_clip_checkpoint(path, VIT_H_14), tokenizer


IMAGEREWARD_REPOSITORY = "THUDM/ImageReward"  # ImageReward.pt (a BLIP state_dict) and med_config.json
IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072  # the package's score normalisation
BLIP_VIT_LARGE = dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16)  # BLIP's vit='large'


def blip_state_to_transformers(state, depth):
    """ImageReward's BLIP keys (BLIP's vit.py and med.py) -> transformers' BlipVisionModel, BlipTextModel, MLP.

    The text encoder is transformers' port of med.py, key for key; the ViT renames (timm's layout -> BLIP's).
    """
    vision = {
        "embeddings.class_embedding": state["blip.visual_encoder.cls_token"],
        "embeddings.position_embedding": state["blip.visual_encoder.pos_embed"],
        "embeddings.patch_embedding.weight": state["blip.visual_encoder.patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state["blip.visual_encoder.patch_embed.proj.bias"],
        "post_layernorm.weight": state["blip.visual_encoder.norm.weight"],
        "post_layernorm.bias": state["blip.visual_encoder.norm.bias"],
    }
    renamed = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv"}
    renamed |= {"attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for layer in range(depth):
        for source, target in renamed.items():
            for parameter in ("weight", "bias"):
                key = f"blip.visual_encoder.blocks.{layer}.{source}.{parameter}"
                vision[f"encoder.layers.{layer}.{target}.{parameter}"] = state[key]
    text = {
        key.removeprefix("blip.text_encoder."): value
        for key, value in state.items()
        if key.startswith("blip.text_encoder.") and not key.endswith("position_ids")  # a buffer, not a weight
    }
    head = {key.removeprefix("mlp."): value for key, value in state.items() if key.startswith("mlp.")}
    return vision, text, head


class ImageRewardModel(torch.nn.Module):
    """ImageReward: BLIP's ViT encodes the image, BLIP's BERT reads the prompt with cross-attention to the image
    tokens, and an MLP scores its [CLS] feature: r = (MLP(cls) - mean) / std. Differentiable in the image."""

    differentiable = True
    resize = "bicubic"  # clip_preprocess's; set_reward_resize changes it

    def __init__(self, vision_model, text_model, head, tokenizer):
        super().__init__()
        self.vision_model, self.text_model, self.head, self.tokenizer = vision_model, text_model, head, tokenizer

    def score(self, pixel_values, input_ids, attention_mask):
        """pixel_values CLIP-normalised (B, 3, 224, 224); input_ids, attention_mask (B, 35) -> (B,) float32."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1 + patches, D)
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        text = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_mask,
        ).last_hidden_state  # (B, 35, D)
        return ((self.head(text[:, 0]).squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).float()

    def forward(self, images, prompts):
        pixel_values = clip_preprocess(images, resize=self.resize).to(self.head.layers[0].weight.dtype)
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        )
        device = pixel_values.device
        return self.score(pixel_values, tokens.input_ids.to(device), tokens.attention_mask.to(device))


def build_imagereward(vision, med_config, tokenizer):
    """ImageRewardModel with fresh weights; `vision` is BLIP's ViT size (img_size, patch_size, embed_dim, depth,
    num_heads), `med_config` its med_config.json (a BERT config with cross-attention to the image tokens)."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    vision_config = BlipVisionConfig(
        image_size=vision["img_size"],
        patch_size=vision["patch_size"],
        hidden_size=vision["embed_dim"],
        intermediate_size=4 * vision["embed_dim"],  # BLIP's ViT: mlp_ratio 4
        num_hidden_layers=vision["depth"],
        num_attention_heads=vision["num_heads"],
        layer_norm_eps=1e-6,  # BLIP's vit.py: partial(nn.LayerNorm, eps=1e-6)
        hidden_act="gelu",
    )
    text_config = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=med_config["encoder_width"],
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        layer_norm_eps=med_config["layer_norm_eps"],
        hidden_act=med_config["hidden_act"],
        pad_token_id=med_config["pad_token_id"],
    )
    vision_model, text_model = BlipVisionModel(vision_config), BlipTextModel(text_config, add_pooling_layer=False)
    return ImageRewardModel(vision_model, text_model, AestheticMLP(input_size=med_config["hidden_size"]), tokenizer)


def load_imagereward_checkpoint(path, vision, med_config, tokenizer):
    """build_imagereward with the weights of a state_dict in the image-reward package's key names (strict)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    try:
        vision_state, text_state, head_state = blip_state_to_transformers(state, vision["depth"])
    except KeyError as error:
        raise SystemExit(f"error: {path} is not an ImageReward checkpoint (no {error})")
    model = build_imagereward(vision, med_config, tokenizer)
    parts = ((model.vision_model, vision_state), (model.text_model, text_state), (model.head, head_state))
    for module, module_state in parts:
        missing, unexpected = module.load_state_dict(module_state, strict=False)
        missing = [key for key in missing if not key.endswith("position_ids")]
        if missing or unexpected:
            raise SystemExit(f"error: {path} does not fit ImageReward's architecture ({(missing + unexpected)[:3]})")
    return model


def imagereward_model():
    """ImageReward-v1.0 from the hub (ImageReward.pt, med_config.json; bert-base-uncased's tokenizer, as the
    package), on transformers' BLIP classes: the image-reward package does not import with transformers 5."""
    import json

    from huggingface_hub import hf_hub_download
    from transformers import AutoTokenizer

    try:
        path = hf_hub_download(IMAGEREWARD_REPOSITORY, "ImageReward.pt")
        with open(hf_hub_download(IMAGEREWARD_REPOSITORY, "med_config.json")) as f:
            med_config = json.load(f)
        tokenizer = AutoTokenizer.from_pretrained("bert-base-uncased")
    except Exception as exception:
        raise hub_error(f"{IMAGEREWARD_REPOSITORY}/ImageReward.pt", exception)
    med_config["encoder_width"] = BLIP_VIT_LARGE["embed_dim"]  # as BLIP's init sets it: the ViT-L's width
    return load_imagereward_checkpoint(path, BLIP_VIT_LARGE, med_config, tokenizer)


def load_aesthetic_head(path):
    """The LAION aesthetic MLP from a local .pth state dict (keys layers.{0,2,4,6,7}), loaded strictly."""
    if not os.path.exists(path):
        raise SystemExit(f"error: aesthetic head weights '{path}' not found")
    head = AestheticMLP()
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return head


# the hub repositories each reward loads (jpeg_*: none), for check_hub_reachable
REWARD_REPOSITORIES = {
    "aesthetic": (AESTHETIC_HEAD[0], AESTHETIC_CLIP),
    "pickscore": (PICKSCORE_MODEL, LAION_CLIP_H),  # LAION_CLIP_H: its tokenizer
    "clipscore": (LAION_CLIP_H,),
    "imagereward": (IMAGEREWARD_REPOSITORY, "bert-base-uncased"),
    "hpsv2": (HPSV2_REPOSITORY, LAION_CLIP_H),
    "hpsv2.1": (HPSV2_REPOSITORY, LAION_CLIP_H),
}


def load_reward(name, device, dtype, aesthetic_head_path=None):
    """The reward `name` as a frozen module: (images (B, 3, H, W) in [0, 1], prompts) -> (B,) float32.

    The networks come from the hub; `aesthetic_head_path` reads the LAION MLP from a local file instead of
    `trl-lib/ddpo-aesthetic-predictor`.
    """
    check_reward_name(name)
    if name.startswith("jpeg_"):
        reward = JpegReward(sign=-1.0 if name == "jpeg_compressibility" else 1.0)
    elif name == "aesthetic":
        from transformers import CLIPVisionModelWithProjection

        if aesthetic_head_path is None:
            try:
                from huggingface_hub import hf_hub_download

                aesthetic_head_path = hf_hub_download(*AESTHETIC_HEAD)
            except Exception as exception:
                raise hub_error("the aesthetic head", exception)
        try:
            vision_model = CLIPVisionModelWithProjection.from_pretrained(AESTHETIC_CLIP)
        except Exception as exception:
            raise hub_error(AESTHETIC_CLIP, exception)
        reward = AestheticReward(vision_model, load_aesthetic_head(aesthetic_head_path))
    elif name in ("pickscore", "clipscore"):
        from transformers import AutoTokenizer, CLIPModel

        model_id = PICKSCORE_MODEL if name == "pickscore" else LAION_CLIP_H
        try:
            clip_model = CLIPModel.from_pretrained(model_id)
            tokenizer = AutoTokenizer.from_pretrained(LAION_CLIP_H)
        except Exception as exception:
            raise hub_error(model_id, exception)
        reward = ClipSimilarityReward(clip_model, tokenizer, use_logit_scale=name == "pickscore")
    elif name == "imagereward":
        reward = imagereward_model()
    else:  # hpsv2 (v2.0, the checkpoint AlignProp and CoCA trained with) or hpsv2.1
        reward = ClipSimilarityReward(*hpsv2_model(HPSV2_CHECKPOINTS[name]), use_logit_scale=False)
    return freeze(reward, device, dtype)


# ----------------------------------------------------------------------------------------------------------
# 3. Classifier-free guidance and prompt weighting
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(pipeline, prompts, resolution):
    """The text conditioning c of `prompts`, one tensor (B, L, D), as the pipelines compute it.

    SD 1.x: the text encoder's last hidden states, (B, 77, 768).
    SDXL: (B, 77 + 1, 2048). Rows 0..76 are the two encoders' penultimate hidden states, concatenated (768 + 1280
    features). Row 77 packs what SDXL's UNet takes beside them (`added_cond_kwargs`): the pooled, projected
    embedding of text_encoder_2 (1280), then the six size ids (original height, width, crop top, left, target
    height, width) = (resolution, resolution, 0, 0, resolution, resolution), zero-padded to 2048. One tensor
    means every script stores, indexes and weights SDXL's conditioning exactly as SD 1.x's;
    `guided_noise_prediction` unpacks it. An empty prompt encodes to zeros (the size ids kept), as diffusers'
    SDXL pipeline encodes its default negative prompt (force_zeros_for_empty_prompt).
    """
    if not is_sdxl(pipeline):
        return pipeline.text_encoder(token_ids(pipeline.tokenizer, prompts).to(pipeline.text_encoder.device))[0]
    sequences = []
    for tokenizer, text_encoder in [
        (pipeline.tokenizer, pipeline.text_encoder),
        (pipeline.tokenizer_2, pipeline.text_encoder_2),
    ]:
        output = text_encoder(token_ids(tokenizer, prompts).to(text_encoder.device), output_hidden_states=True)
        sequences.append(output.hidden_states[-2])  # (B, 77, 768) and (B, 77, 1280)
    pooled = output.text_embeds  # text_encoder_2's projection of its EOS token, (B, 1280)
    sequence = torch.cat(sequences, dim=-1)  # (B, 77, 2048)
    if pipeline.config.force_zeros_for_empty_prompt:
        empty = torch.tensor([prompt == "" for prompt in prompts], device=sequence.device)
        sequence, pooled = sequence.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
    size_ids = pooled.new_tensor([resolution, resolution, 0, 0, resolution, resolution]).expand(len(prompts), -1)
    extra = torch.cat([pooled, size_ids], dim=-1)  # (B, 1280 + 6)
    if extra.shape[-1] > sequence.shape[-1]:
        raise ValueError(f"cannot pack {extra.shape[-1]} pooled + size features into rows of {sequence.shape[-1]}")
    extra = F.pad(extra, (0, sequence.shape[-1] - extra.shape[-1]))[:, None]  # (B, 1, 2048)
    return torch.cat([sequence, extra.to(sequence.dtype)], dim=1)


def token_ids(tokenizer, prompts):
    """(B, 77) token ids padded and truncated as the pipelines do."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def unet_conditioning(unet, embeds):
    """The UNet's keyword arguments for the conditioning c of `encode_prompts`, (B, L, D).

    SD 1.x: encoder_hidden_states = c. SDXL: the first 77 rows, and the packed last row unpacked into
    added_cond_kwargs = {text_embeds: pooled (B, 1280), time_ids: size ids (B, 6)}.
    """
    if not is_sdxl(unet):
        return dict(encoder_hidden_states=embeds)
    config = getattr(unet, "module", unet).config
    pooled_size = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim  # 2816 - 1536
    extra = embeds[:, -1]  # (B, D)
    added = dict(text_embeds=extra[:, :pooled_size], time_ids=extra[:, pooled_size : pooled_size + 6])
    return dict(encoder_hidden_states=embeds[:, :-1], added_cond_kwargs=added)


def guided_noise_prediction(unet, latents, timestep, prompt_embeds, null_embeds, guidance_scales):
    """Eq. 4: eps~ = eps(x_t, t, c_null) + w * (eps(x_t, t, c) - eps(x_t, t, c_null)), in one batched UNet call.

    latents (B, 4, h, w), timestep an int or (B,), prompt_embeds (B, L, D), null_embeds (B, L, D) or (1, L, D),
    guidance_scales (B,) (per-sample scales, because each sample must be recomputed with the scale that sampled it).
    """
    batch_size = latents.shape[0]
    null_embeds = null_embeds.expand(batch_size, -1, -1)
    # (B,): one t or one per sample
    timestep = torch.as_tensor(timestep, device=latents.device).reshape(-1).expand(batch_size)
    noise_pred = unet(
        torch.cat([latents, latents]),
        torch.cat([timestep, timestep]),
        **unet_conditioning(unet, torch.cat([null_embeds, prompt_embeds])),
    ).sample
    noise_uncond, noise_cond = noise_pred.chunk(2)  # (B, 4, h, w) each
    # built on the CPU
    guidance_scales = guidance_scales.to(noise_cond.device, noise_cond.dtype).view(batch_size, 1, 1, 1)
    return noise_uncond + guidance_scales * (noise_cond - noise_uncond)


def dynamic_cfg_scale(t, w_low, w_high, t_thres):
    """DiffExp Eq. 7: w(t) = w_low if t > t_thres else w_high (t on the 0..1000 scale; t = 1000 is noise).

    Low guidance on the first, noisiest steps lets the layout vary; high guidance afterwards keeps quality.
    """
    return w_low if int(t) > t_thres else w_high


def guidance_scale_schedule(timesteps, w_low, w_high, t_thres, dynamic):
    """One CFG scale per denoising step of a sampling schedule, (T,): DiffExp Eq. 7's w(t) if dynamic, else w_high
    at every step (plain CFG). The DiffExp scripts use one schedule for every sample of an epoch."""
    scales = [dynamic_cfg_scale(t, w_low, w_high, t_thres) if dynamic else w_high for t in timesteps.tolist()]
    return torch.tensor(scales)


def random_word_token_mask(pipeline, prompts, generator):
    """Bool mask (B, L), L as encode_prompts' c: per prompt, every token of ONE uniformly random word (never BOS,
    EOS, padding, or SDXL's packed pooled row).

    A word is a whitespace-separated piece of the prompt; its tokens are found by tokenising each word alone
    (CLIP's tokeniser splits on whitespace first, so the prompt's tokens are the words' tokens in order). SDXL has
    two tokenizers; the mask marks the word's positions in each, which are the same positions: both are CLIP's
    BPE with the same vocabulary and merges, and differ only in the padding token, which comes after EOS. So one
    (B, L) mask weights the same word in both halves (768 + 1280) of c; a pair of tokenizers that split a word
    differently stops with an error rather than weight two different things.
    """
    tokenizers = [pipeline.tokenizer] + ([pipeline.tokenizer_2] if is_sdxl(pipeline) else [])
    length = pipeline.tokenizer.model_max_length
    mask = torch.zeros(len(prompts), length + (1 if is_sdxl(pipeline) else 0), dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        spans_of = []
        for tokenizer in tokenizers:
            spans, position = [], 1  # position 0 is BOS
            for word in prompt.split():
                count = len(tokenizer(word, add_special_tokens=False).input_ids)
                end = min(position + count, length - 1)  # the last position always holds EOS after truncation
                if end > position:
                    spans.append((position, end))
                position += count
            spans_of.append(spans)
        if any(spans != spans_of[0] for spans in spans_of):
            raise ValueError(f"SDXL's two tokenizers split '{prompt}' differently; DiffExp Eq. 8 needs one mask")
        spans = spans_of[0]
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


def randomly_weight_prompts(pipeline, prompts, prompt_embeds, null_embeds, weight_range, generator):
    """DiffExp Eq. 8 for a batch: every token of one uniformly random word of each prompt gets the weight
    w_prompt ~ U(low, high), c[i] <- c_null[i] + w_prompt (c[i] - c_null[i]); a new word and weight per prompt.

    prompts (B) are the texts of prompt_embeds (B, L, D); null_embeds (1, L, D) = encoding of "". The word is drawn
    before the weights, both from generator, so a seeded run draws the same words and weights on any device.
    """
    token_mask = random_word_token_mask(pipeline, prompts, generator)  # (B, L)
    low, high = weight_range
    prompt_weights = low + (high - low) * torch.rand(len(prompts), generator=generator)  # (B,)
    return weight_prompt_embeds(prompt_embeds, null_embeds, token_mask, prompt_weights.to(prompt_embeds.device))


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
UNSEEN_PROMPT_SET = {
    "animals": "unseen_animals",
    "animal_activities": "unseen_activities",
    "shapes": "unseen_shapes",
    **{f"b2_template{t}": f"b2_template{t}_test" for t in (1, 2, 3)},  # B2-DiffuRL evaluates on its test lists
}


PROJECT_FOLDER = os.path.dirname(os.path.abspath(__file__))
PROMPT_FOLDER = os.path.join(PROJECT_FOLDER, "prompts")
# Named sets kept in files (prompts/README.md): B2-DiffuRL's released train / test lists of its three templates,
# and the shapes world's (shapes_world.py) rare colour-shape pairs, counts and relations.
PROMPT_SET_FILES = {
    **{f"b2_template{t}": f"b2_template{t}_train.txt" for t in (1, 2, 3)},
    **{f"b2_template{t}_test": f"b2_template{t}_test.txt" for t in (1, 2, 3)},
    "shapes": "shapes_train.txt",
    "unseen_shapes": "shapes_unseen.txt",
}


# DrawBench (Saharia et al. 2022): prompts/drawbench.csv, its 200 prompts with their 11 categories. DiffExp's "58
# challenging prompts" are three of them (DiffExp supplementary: Conflicting, Gary Marcus et al., Reddit); Parti's
# challenging prompts, DiffExp's unseen set for them, are not available offline, so the unseen twin here is the other
# 142 DrawBench prompts (a deviation the presets state).
DRAWBENCH_FILE = "drawbench.csv"
DRAWBENCH_CATEGORIES = ("Colors", "Conflicting", "Counting", "DALL-E", "Descriptions", "Gary Marcus et al.")
DRAWBENCH_CATEGORIES += ("Misspellings", "Positional", "Rare Words", "Reddit", "Text")
DRAWBENCH_CHALLENGING = ("Conflicting", "Gary Marcus et al.", "Reddit")


def drawbench_prompts(categories=None, exclude=()):
    """DrawBench's prompts in file order: of `categories` (all if None), minus those of `exclude`."""
    import csv

    with open(os.path.join(PROMPT_FOLDER, DRAWBENCH_FILE), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [
        row["prompt"]
        for row in rows
        if (categories is None or row["category"] in categories) and row["category"] not in exclude
    ]


def drawbench_set_name(category):
    """The prompt set name of a DrawBench category: "Gary Marcus et al." -> drawbench_gary_marcus_et_al."""
    return "drawbench_" + "_".join(re.findall(r"[a-z0-9]+", category.lower()))


PROMPT_SETS["drawbench"] = drawbench_prompts()  # all 200
PROMPT_SETS["drawbench_challenging"] = drawbench_prompts(DRAWBENCH_CHALLENGING)  # DiffExp's 58 (Fig. 8, 10 (a))
PROMPT_SETS["drawbench_unseen"] = drawbench_prompts(exclude=DRAWBENCH_CHALLENGING)  # the other 142
PROMPT_SETS |= {drawbench_set_name(category): drawbench_prompts([category]) for category in DRAWBENCH_CATEGORIES}
UNSEEN_PROMPT_SET["drawbench_challenging"] = "drawbench_unseen"


def prompt_file_path(name_or_path):
    """Where a prompt set's lines are: a named set's file, or a .txt path from the working directory or, failing
    that, from this project's folder (so `--prompts prompts/spatial_train.txt` works from any directory)."""
    if name_or_path in PROMPT_SET_FILES:
        return os.path.join(PROMPT_FOLDER, PROMPT_SET_FILES[name_or_path])
    if not name_or_path.endswith(".txt"):
        names = ", ".join([*PROMPT_SETS, *PROMPT_SET_FILES])
        raise SystemExit(f"error: unknown prompt set '{name_or_path}'; choose one of {names} or give a .txt file")
    beside_project = os.path.join(PROJECT_FOLDER, name_or_path)
    if not os.path.isfile(name_or_path) and not os.path.isabs(name_or_path) and os.path.isfile(beside_project):
        return beside_project
    return name_or_path


def load_prompts(name_or_path):
    """A named prompt set (`PROMPT_SETS`) or a .txt file with one prompt a line (blank lines ignored)."""
    if name_or_path in PROMPT_SETS:
        return list(PROMPT_SETS[name_or_path])
    path = prompt_file_path(name_or_path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: prompt file '{name_or_path}' not found")
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise SystemExit(f"error: prompt file '{name_or_path}' is not UTF-8 text")
    if not prompts:
        raise SystemExit(f"error: prompt file '{name_or_path}' has no prompts")
    return prompts


def unseen_twin(name_or_path):
    """The unseen set a training set is evaluated against (Figure 6 of DiffExp): a named set's twin
    (`UNSEEN_PROMPT_SET`), or X_test.txt beside X_train.txt; None if it has none."""
    if name_or_path.endswith("_train.txt"):  # beside the file that load_prompts reads
        twin = prompt_file_path(name_or_path)[: -len("_train.txt")] + "_test.txt"
        return twin if os.path.isfile(twin) else None
    return UNSEEN_PROMPT_SET.get(name_or_path)
