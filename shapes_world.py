"""Shapes world: a toy text-to-image world where reward fine-tuning learns on a CPU in minutes.

Reinforcement learning has CartPole; this is its counterpart for reward fine-tuning of text-to-image models.
32 x 32 images of coloured circles, squares and triangles on white, captioned by a small grammar:

    caption  := object | "two" colour shape "s" | object relation object
    object   := "a" colour shape
    colour   := red | green | blue | yellow | purple
    shape    := circle | square | triangle
    relation := above | below | "to the left of" | "to the right of"

The pretraining data has a long tail, as web data does: each colour is common on one shape, less common on a
second and rare (1 in ~130 objects) on the third. It was meant to make the pretrained model weak on "a red
triangle" as SD is on "a dolphin riding a bike"; measured, it is not (benchmarks/guidance.py): without guidance the
model draws a rare pair alone about as well as a common one, and the fine-tuning prompts' room to improve comes
from the presets' sampler, 10 stochastic (eta 1) steps at guidance w = 5, which distorts shapes and colours (the
pretrained model scores about 0.48 on them there, 0.77 without guidance and 0.76 with 50 steps). Trained with the
rare pairs held out (`--rare-weight 0`), the model is weak on them under every sampler (a rare pair alone 0.70, a
common one 0.97, without guidance); AlignProp then learns the tail in 20 epochs and DDPO hardly (benchmarks/README.md).

This file holds
  1. the world: caption grammar, parsing, rendering (`render`), and `sample_captions` with the long tail;
  2. the exact reward `exact_scores`: it finds the shapes in the pixels (colour classification, connected
     components, shape from the fill ratio of the bounding box) and returns the fraction of the caption's
     attributes the image satisfies (colour present, shape, count, relation, nothing else drawn);
  3. the learned reward `LearnedShapesReward`: a small CNN conditioned on the parsed caption, trained to predict
     the exact reward, differentiable with respect to the pixels (for AlignProp); optimising it and evaluating
     with the exact reward exposes reward hacking;
  4. `python shapes_world.py`: trains the world's text-to-image model, in Stable Diffusion's architecture
     (CLIPTokenizer, CLIPTextModel, UNet2DConditionModel, AutoencoderKL, DDIMScheduler), with caption dropout
     for classifier-free guidance, and the learned reward; writes them to world/ (the committed weights).

Every method script loads the model through its ordinary `--model world/sd-shapes` path; `--shapes` is the preset
that sets it with the rewards and prompts of this world.

Deviations from how Stable Diffusion was trained (all for CPU time)
  1. The text encoder is trained with the UNet (SD uses a frozen pretrained CLIP; there is none for this world),
     on a word-level vocabulary (every grammar word is one token).
  2. The VAE is trained first, alone, with a small KL weight (1e-4); 32 px images map to 4 x 8 x 8 latents
     (downsampling by 4, SD's by 8), scaled to unit variance by `scaling_factor` as SD's 0.18215 does.
  3. A few thousand steps on procedurally rendered images, not billions of web images.

Commands
  Train the world's models from scratch (about 25 minutes on 2 CPU cores: VAE 2.5, UNet 15-20, reward 3;
  committed in world/):
    python shapes_world.py
  Fine-tune on it:
    python ddpo_diffexp.py --shapes
"""

import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw


@dataclass
class Args:
    output_dir: str = "world"
    """where the pipeline (output_dir/sd-shapes) and the learned reward (output_dir/learned_reward.safetensors) go"""
    seed: int = 0
    """seed of every random draw"""
    stages: tuple[str, ...] = ("vae", "unet", "reward")
    """stages to run; a stage not run loads its result from output_dir (--stages reward retrains the reward only)"""
    vae_steps: int = 800
    """AdamW steps of the VAE"""
    vae_batch_size: int = 32
    """images per VAE step"""
    unet_steps: int = 2500
    """AdamW steps of the UNet and text encoder"""
    reward_steps: int = 1000
    """AdamW steps of the learned reward"""
    batch_size: int = 64
    """images per UNet / reward step"""
    caption_dropout: float = 0.1
    """probability that a training caption is replaced by "" (classifier-free guidance needs eps(x_t, t, ""))"""
    rare_weight: float = 0.05
    """sampling weight of each rare colour-shape pair (TIER_WEIGHTS["rare"], the committed world's; common 1.0,
    medium 0.3): 0.005 makes a rare pair 1 in ~1300 objects, 0 holds the rare pairs out (benchmarks/README.md)"""


# ----------------------------------------------------------------------------------------------------------
# 1. The world: grammar, rendering, the long-tailed caption distribution
# ----------------------------------------------------------------------------------------------------------

IMAGE_SIZE = 32
BACKGROUND = (255, 255, 255)
COLOURS = {  # name -> RGB; far apart, so a pixel's colour is unambiguous
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 225),
    "yellow": (235, 200, 30),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "below", "to the left of", "to the right of")
COUNT_WORDS = {1: "a", 2: "two"}
# The long tail: each colour is common on one shape, medium on another and rare on the third.
PAIR_TIERS = {
    "common": [
        ("red", "circle"),
        ("green", "square"),
        ("blue", "triangle"),
        ("yellow", "circle"),
        ("purple", "square"),
    ],
    "medium": [
        ("red", "square"),
        ("green", "triangle"),
        ("blue", "circle"),
        ("yellow", "triangle"),
        ("purple", "circle"),
    ],
    "rare": [
        ("red", "triangle"),
        ("green", "circle"),
        ("blue", "square"),
        ("yellow", "square"),
        ("purple", "triangle"),
    ],
}
TIER_WEIGHTS = {"common": 1.0, "medium": 0.3, "rare": 0.05}  # a rare pair is 1 in ~130 objects
CAPTION_KINDS = {"one": 0.35, "two": 0.2, "relation": 0.45}
WORDS = [
    "a",
    "two",
    *COLOURS,
    *SHAPES,
    *(s + "s" for s in SHAPES),
    "above",
    "below",
    "to",
    "the",
    "left",
    "right",
    "of",
]

_OBJECT = r"(a|two) (" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")s?"
_CAPTION = re.compile(rf"^{_OBJECT}(?: ({'|'.join(RELATIONS)}) {_OBJECT})?$")


def make_caption(objects, relation=None):
    """[(colour, shape, count)], relation -> "a red circle above a blue square" / "two green squares"."""
    phrases = [f"{COUNT_WORDS[count]} {colour} {shape}{'s' if count > 1 else ''}" for colour, shape, count in objects]
    return f" {relation} ".join(phrases) if relation else phrases[0]


def parse_caption(caption):
    """Inverse of make_caption: ([(colour, shape, count)], relation or None); None if not in the grammar."""
    match = _CAPTION.match(caption.strip().lower())
    if not match:
        return None
    count_1, colour_1, shape_1, relation, count_2, colour_2, shape_2 = match.groups()
    objects = [(colour_1, shape_1, 2 if count_1 == "two" else 1)]
    if relation:
        objects.append((colour_2, shape_2, 2 if count_2 == "two" else 1))
    return objects, relation


def parse_caption_or_raise(caption):
    """parse_caption for the rewards: a caption outside the grammar is a ValueError (the scripts check it earlier)."""
    parsed = parse_caption(caption)
    if parsed is None:
        raise ValueError(f"caption not in the shapes grammar: {caption!r}")
    return parsed


def sample_captions(count, generator, rare_weight=TIER_WEIGHTS["rare"]):
    """`count` captions from the pretraining distribution (numpy Generator): long-tailed colour-shape pairs, each
    rare pair drawn with weight rare_weight (0: never)."""
    pairs = [pair for tier in PAIR_TIERS.values() for pair in tier]
    tier_weights = TIER_WEIGHTS | {"rare": rare_weight}
    weights = np.array([tier_weights[tier] for tier, tier_pairs in PAIR_TIERS.items() for _ in tier_pairs])
    weights = weights / weights.sum()
    kinds = list(CAPTION_KINDS)
    captions = []
    for kind in generator.choice(kinds, size=count, p=np.array(list(CAPTION_KINDS.values()))):
        first = pairs[generator.choice(len(pairs), p=weights)]
        if kind == "one":
            captions.append(make_caption([(*first, 1)]))
        elif kind == "two":
            captions.append(make_caption([(*first, 2)]))
        else:
            while True:  # the two objects of a relation have different colours, so they are told apart by colour
                second = pairs[generator.choice(len(pairs), p=weights)]
                if second[0] != first[0]:
                    break
            relation = RELATIONS[generator.integers(len(RELATIONS))]
            captions.append(make_caption([(*first, 1), (*second, 1)], relation))
    return captions


def _draw_shape(draw, shape, colour, box):
    left, top, right, bottom = box  # inclusive pixel bounds
    if shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "circle":
        draw.ellipse(box, fill=colour)
    else:  # triangle pointing up: apex at the top centre, base along the bottom edge
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=colour)


def _place(generator, size, region):
    """Top-left corner of a size x size box inside region (x0, y0, x1, y1), uniformly."""
    x0, y0, x1, y1 = region
    return int(generator.integers(x0, max(x0, x1 - size) + 1)), int(generator.integers(y0, max(y0, y1 - size) + 1))


def render(caption, generator):
    """A 32 x 32 RGB PIL image that satisfies the caption exactly (numpy Generator for sizes and positions)."""
    objects, relation = parse_caption(caption)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    margin = 1
    while True:  # rejection sampling of a layout whose boxes keep 2 px apart
        boxes = []  # (colour, shape, left, top, size)
        if relation is None:
            colour, shape, count = objects[0]
            for _ in range(count):
                size = int(generator.integers(9, 13))
                boxes.append(
                    (
                        colour,
                        shape,
                        *_place(generator, size, (margin, margin, IMAGE_SIZE - margin, IMAGE_SIZE - margin)),
                        size,
                    )
                )
        else:
            (colour_a, shape_a, _), (colour_b, shape_b, _) = objects
            size_a, size_b = int(generator.integers(9, 13)), int(generator.integers(9, 13))
            # A is in the first half along the relation's axis, B in the second: the relation holds with room
            half = IMAGE_SIZE // 2
            vertical = relation in ("above", "below")
            a_first = relation in ("above", "to the left of")
            first_region = (
                (margin, margin, IMAGE_SIZE - margin, half) if vertical else (margin, margin, half, IMAGE_SIZE - margin)
            )
            second_region = (
                (margin, half, IMAGE_SIZE - margin, IMAGE_SIZE - margin)
                if vertical
                else (half, margin, IMAGE_SIZE - margin, IMAGE_SIZE - margin)
            )
            region_a, region_b = (first_region, second_region) if a_first else (second_region, first_region)
            boxes.append((colour_a, shape_a, *_place(generator, size_a, region_a), size_a))
            boxes.append((colour_b, shape_b, *_place(generator, size_b, region_b), size_b))
        separated = all(
            a[2] + a[4] + 2 <= b[2] or b[2] + b[4] + 2 <= a[2] or a[3] + a[4] + 2 <= b[3] or b[3] + b[4] + 2 <= a[3]
            for i, a in enumerate(boxes)
            for b in boxes[i + 1 :]
        )
        if separated:
            break
    for colour, shape, left, top, size in boxes:
        _draw_shape(draw, shape, COLOURS[colour], (left, top, left + size - 1, top + size - 1))
    return image


def render_batch(captions, generator):
    """(B, 3, 32, 32) float tensor in [0, 1] of rendered captions."""
    arrays = np.stack([np.asarray(render(caption, generator)) for caption in captions])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------------------------------------
# 2. The exact reward: find the shapes in the pixels, score the caption's attributes
# ----------------------------------------------------------------------------------------------------------

COLOUR_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in COLOUR_NAMES] + [BACKGROUND], dtype=np.float32) / 255  # (6, 3)
# A pixel takes its nearest palette colour (white included), unless it is farther than this from all of them
# (RGB in [0, 1]); half-way between a colour and white is ~0.5 away, so a blurred edge splits at its middle.
MAX_COLOUR_DISTANCE = 0.5
MIN_AREA = 12  # components smaller than this are specks, not shapes (the smallest shape, a triangle, has ~50 px)


def _components(mask):
    """4-connected components of a boolean (H, W) mask, as lists of (y, x); a plain flood fill (32 x 32 is tiny)."""
    seen = np.zeros_like(mask)
    height, width = mask.shape
    components = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        stack, pixels = [(y, x)], []
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            pixels.append((cy, cx))
            for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        components.append(pixels)
    return components


def classify_shape(pixels):
    """triangle / square / circle of one component, from two features of its pixels that survive blur:

    - top / bottom balance: pixels above the bounding box's middle row / pixels below it; an upward triangle has a
      quarter of its area in its top half (ratio 1/3, ~0.45 once blurred), a square or a circle half (ratio 1);
    - fill ratio: area / bounding-box area; 1 for a square (~0.95 blurred), pi / 4 ~ 0.79 for a circle (0.70-0.80).
    """
    ys, xs = np.array(pixels).T
    middle = (ys.min() + ys.max()) / 2
    balance = (ys < middle).sum() / max(1, (ys > middle).sum())
    fill = len(pixels) / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    return "triangle" if balance < 0.65 else "square" if fill > 0.88 else "circle"


def detect_objects(image):
    """(3, H, W) tensor in [0, 1] -> list of (colour, shape, centre_y, centre_x, area), one per shape found."""
    pixels = image.detach().float().cpu().permute(1, 2, 0).numpy()  # (H, W, 3)
    distances = np.linalg.norm(pixels[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, 6)
    labels = distances.argmin(-1)
    labels[distances.min(-1) > MAX_COLOUR_DISTANCE] = len(COLOUR_NAMES)  # far from every colour: background
    objects = []
    for index, colour in enumerate(COLOUR_NAMES):
        for component in _components(labels == index):
            if len(component) >= MIN_AREA:
                ys, xs = np.array(component).T
                objects.append((colour, classify_shape(component), float(ys.mean()), float(xs.mean()), len(component)))
    return objects


def caption_attributes(caption, objects):
    """The caption's checkable attributes and whether the detected objects satisfy each: {name: bool}.

    Per phrase "<count> <colour> <shape>": its colour is present, every shape of that colour is a <shape>, there
    are exactly <count> of them. With a relation: the first colour's centre is above / below / left / right of
    the second's by more than 2 px. Always: no shape of a colour the caption does not name.
    """
    caption_objects, relation = parse_caption_or_raise(caption)
    attributes = {}
    centres = []
    for colour, shape, count in caption_objects:
        found = [obj for obj in objects if obj[0] == colour]
        attributes[f"{colour} present"] = len(found) > 0
        attributes[f"{colour} is {shape}"] = len(found) > 0 and all(obj[1] == shape for obj in found)
        attributes[f"{count} {colour}"] = len(found) == count
        centres.append((np.mean([obj[2] for obj in found]), np.mean([obj[3] for obj in found])) if found else None)
    if relation:
        holds = False
        if centres[0] is not None and centres[1] is not None:
            dy, dx = centres[1][0] - centres[0][0], centres[1][1] - centres[0][1]  # second minus first
            holds = {"above": dy > 2, "below": dy < -2, "to the left of": dx > 2, "to the right of": dx < -2}[relation]
        attributes[relation] = holds
    named = {colour for colour, _, _ in caption_objects}
    attributes["nothing else"] = all(obj[0] in named for obj in objects)
    return attributes


def exact_scores(images, prompts):
    """The exact reward: fraction of each caption's attributes that its image satisfies, (B,) in [0, 1]."""
    scores = []
    for image, prompt in zip(images, prompts):
        attributes = caption_attributes(prompt, detect_objects(image))
        scores.append(sum(attributes.values()) / len(attributes))
    return torch.tensor(scores, dtype=torch.float32)


def binary_scores(images, prompts):
    """The sparse reward (shapes_binary): 1 if the image satisfies every attribute of its caption, else 0, (B,)."""
    return (exact_scores(images, prompts) == 1).float()


# ----------------------------------------------------------------------------------------------------------
# 3. The learned reward: a small CNN that predicts the exact reward, differentiable in the pixels
# ----------------------------------------------------------------------------------------------------------

CAPTION_FEATURES = 2 * (len(COLOURS) + len(SHAPES)) + 2 + len(RELATIONS)  # two phrases, two counts, a relation


def caption_features(captions):
    """(B, 24) float: one-hot colour and shape of each phrase, "two" flags, one-hot relation (zeros if absent)."""
    features = torch.zeros(len(captions), CAPTION_FEATURES)
    for row, caption in enumerate(captions):
        objects, relation = parse_caption_or_raise(caption)
        for slot, (colour, shape, count) in enumerate(objects):
            offset = slot * (len(COLOURS) + len(SHAPES))
            features[row, offset + COLOUR_NAMES.index(colour)] = 1
            features[row, offset + len(COLOURS) + SHAPES.index(shape)] = 1
            features[row, 2 * (len(COLOURS) + len(SHAPES)) + slot] = float(count == 2)
        if relation:
            features[row, -len(RELATIONS) + RELATIONS.index(relation)] = 1
    return features


class LearnedShapesReward(torch.nn.Module):
    """r_phi(image, caption) ~ exact reward: conv features (B, 64, 8, 8) modulated by the caption (FiLM), then an MLP.

    The spatial map is flattened, not pooled, so that positions (relations) survive. Output in (0, 1) (sigmoid).
    """

    differentiable = True

    def __init__(self):
        super().__init__()
        self.convs = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),  # 16 x 16
            torch.nn.Conv2d(64, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),  # 8 x 8
        )
        self.film = torch.nn.Linear(CAPTION_FEATURES, 2 * 64)  # per-channel scale and shift from the caption
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(64, 32, 3, stride=2, padding=1),
            torch.nn.SiLU(),  # 4 x 4
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 16, 128),
            torch.nn.SiLU(),
            torch.nn.Linear(128, 1),
        )

    def forward(self, images, prompts):
        """images (B, 3, 32, 32) in [0, 1] (other sizes are resized), prompts: B captions -> (B,) float32."""
        if images.shape[-1] != IMAGE_SIZE:
            images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", antialias=True, align_corners=False)
        features = self.convs(images.float() * 2 - 1)  # (B, 64, 8, 8)
        scale, shift = self.film(caption_features(prompts).to(images.device)).chunk(2, dim=-1)  # (B, 64) each
        features = features * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return torch.sigmoid(self.head(features).squeeze(-1))  # (B,)


class ExactShapesReward(torch.nn.Module):
    """The exact reward as a reward module (not differentiable): the fraction of the caption's attributes
    satisfied ("shapes"), or, with binary=True, 1 only if all of them are ("shapes_binary": a sparse signal)."""

    differentiable = False

    def __init__(self, binary=False):
        super().__init__()
        self.binary = binary

    def forward(self, images, prompts):
        return (binary_scores if self.binary else exact_scores)(images, prompts).to(images.device)


REWARD_NAMES = ("shapes", "shapes_binary", "shapes_learned")  # --reward names; all score captions of the grammar only


def check_captions(reward_name, prompts):
    """One error line if a prompt is not a caption of the grammar, which is all the shapes rewards can score."""
    outside = [prompt for prompt in prompts if parse_caption(prompt) is None]
    if outside:
        raise SystemExit(
            f"error: the {reward_name} reward needs captions of the shapes grammar (e.g. --prompts shapes); "
            f"'{outside[0]}' is not one"
        )


def load_reward(name, world=None):
    """The exact reward ("shapes") or the learned one ("shapes_learned", from world/learned_reward.safetensors)."""
    if name in ("shapes", "shapes_binary"):
        return ExactShapesReward(binary=name == "shapes_binary")
    from safetensors.torch import load_file

    path = os.path.join(world or DEFAULT_WORLD, LEARNED_REWARD_FILE)
    if not os.path.exists(path):
        raise SystemExit(
            f"error: learned shapes reward '{path}' not found; train it with: python shapes_world.py --stages reward"
        )
    reward = LearnedShapesReward()
    reward.load_state_dict(load_file(path))
    return reward


# ----------------------------------------------------------------------------------------------------------
# 4. Training the world's text-to-image model and the learned reward (python shapes_world.py)
# ----------------------------------------------------------------------------------------------------------

MODEL_FOLDER = "sd-shapes"
CONTEXT_LENGTH = 16
LEARNED_REWARD_FILE = "learned_reward.safetensors"
DEFAULT_WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "world")
# The world's text-to-image model, an ordinary save_pretrained folder in the repository (`--model` accepts it).
SHAPES_MODEL = os.path.join(DEFAULT_WORLD, MODEL_FOLDER)


def build_models(seed):
    """Untrained SD-architecture parts: 32 px images <-> 4 x 8 x 8 latents, a word-level CLIP text encoder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_world import build_tiny_tokenizer, text_config

    # 16 token positions, not CLIP's 77: the longest caption is 12 tokens with BOS / EOS, and the UNet's cross-attention
    # and the text encoder cost grow with the length
    tokenizer = build_tiny_tokenizer(WORDS, model_max_length=CONTEXT_LENGTH)
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
        layers_per_block=1,
        block_out_channels=(16, 32, 32),  # 3 levels -> downsampling by 4: 32 px <-> 8 x 8 latents
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=8,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        # cross-attention at both levels (8 x 8 and 4 x 4): where a colour goes depends on the words around it
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=16,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**text_config(tokenizer, hidden_size=64, intermediate_size=128, max_positions=CONTEXT_LENGTH))
    )
    return tokenizer, vae, unet, text_encoder


def train_vae(vae, args, generator, log):
    """Reconstruction ||D(E(x)) - x||^2 + 1e-4 KL(q(z|x) || N(0, I)) (per latent element) on rendered images."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    vae.train()
    for step in range(args.vae_steps):
        # (B, 3, 32, 32) in [-1, 1]
        images = render_batch(sample_captions(args.vae_batch_size, generator, args.rare_weight), generator) * 2 - 1
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(reconstruction, images) + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}: loss {loss.item():.4f}, kl {kl.item():.3f}")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae, captions, generator, batch_size=256):
    """Render and encode captions once: posterior means and stds (N, 4, 8, 8), resampled at every UNet step."""
    means, stds = [], []
    for start in range(0, len(captions), batch_size):
        images = render_batch(captions[start : start + batch_size], generator) * 2 - 1
        posterior = vae.encode(images).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(
    unet, text_encoder, tokenizer, scheduler, latent_means, latent_stds, captions, scaling_factor, args, log
):
    """The denoising loss ||eps - eps_theta(sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps, t, c)||^2, text encoder too.

    Captions are replaced by "" with probability caption_dropout, so one network also gives eps(x_t, t, "") for CFG.
    """
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps))
    )
    alphas_cumprod = scheduler.alphas_cumprod

    def tokenize(texts):
        return tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids

    caption_ids, null_ids = tokenize(captions), tokenize([""])  # (N, 16), (1, 16): tokenised once
    unet.train(), text_encoder.train()
    for step in range(args.unet_steps):
        rows = torch.randint(len(captions), (args.batch_size,))
        z_0 = (
            latent_means[rows] + latent_stds[rows] * torch.randn_like(latent_means[rows])
        ) * scaling_factor  # (B, 4, 8, 8)
        dropped = torch.rand(args.batch_size, 1) < args.caption_dropout
        input_ids = torch.where(dropped, null_ids, caption_ids[rows])  # (B, 16)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,))
        noise = torch.randn_like(z_0)
        abar = alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        z_t = abar.sqrt() * z_0 + (1 - abar).sqrt() * noise  # forward process q(z_t | z_0)
        loss = F.mse_loss(unet(z_t, timesteps, encoder_hidden_states=text_encoder(input_ids)[0]).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == args.unet_steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f}")
    unet.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)


@torch.no_grad()
def generate(pipeline, captions, seed, num_steps=20, guidance=5.0, batch_size=128):
    """Images (N, 3, 32, 32) in [0, 1] from the pipeline itself (DDIM, eta 0), to score or to train the reward on."""
    images = []
    for start in range(0, len(captions), batch_size):
        generator = torch.Generator().manual_seed(seed + start)
        output = pipeline(
            captions[start : start + batch_size],
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            height=IMAGE_SIZE,
            width=IMAGE_SIZE,
            generator=generator,
            output_type="pt",
        )
        images.append(output.images.float())
    return torch.cat(images)


def train_learned_reward(model, generated_images, generated_captions, args, generator, log):
    """Regress the exact reward: MSE(r_phi(x, c), exact(x, c)) on rendered and generated images, own or random captions.

    Half of each batch are the pipeline's own samples (with the artefacts fine-tuning will produce), half are
    rendered images; half of the captions are swapped for random ones, so that low rewards are well covered.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    half = args.batch_size // 2
    for step in range(args.reward_steps):
        rows = torch.randint(len(generated_captions), (half,))
        rendered_captions = sample_captions(half, generator, args.rare_weight)
        images = torch.cat([generated_images[rows], render_batch(rendered_captions, generator)])  # (B, 3, 32, 32)
        captions = [generated_captions[i] for i in rows.tolist()] + rendered_captions
        random_captions = sample_captions(len(captions), generator, args.rare_weight)
        captions = [random if generator.random() < 0.5 else own for own, random in zip(captions, random_captions)]
        images = (images + 0.03 * torch.randn_like(images)).clamp(0, 1)  # slight noise: smoother gradients
        loss = F.mse_loss(model(images, captions), exact_scores(images, captions))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.reward_steps - 1:
            log(f"learned reward step {step}: mse {loss.item():.4f}")
    model.eval().requires_grad_(False)


def main(args):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from tiny_world import SD15_SCHEDULER_CONFIG

    unknown = set(args.stages) - {"vae", "unet", "reward"}
    if unknown:
        raise SystemExit(f"error: unknown stage(s) {', '.join(sorted(unknown))}; choose from vae, unet, reward")
    start = time.time()

    def log(message):
        print(f"[{time.time() - start:6.0f} s] {message}", flush=True)

    model_folder = os.path.join(args.output_dir, MODEL_FOLDER)
    os.makedirs(model_folder, exist_ok=True)
    generator = np.random.default_rng(args.seed)
    tokenizer, vae, unet, text_encoder = build_models(args.seed)
    # every stage starts from the same random state whether or not the earlier stages ran in this process, so that
    # `--stages vae` then `--stages unet reward` equals one full run
    initial_torch_state = torch.get_rng_state()
    scheduler = DDIMScheduler(**SD15_SCHEDULER_CONFIG)
    log(
        f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, UNet "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
        f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M parameters"
    )

    # 1. VAE (32 px <-> 4 x 8 x 8), then its scaling_factor from the latents of 20k rendered images
    if "vae" in args.stages:
        train_vae(vae, args, generator, log)
        captions = sample_captions(20_000, generator, args.rare_weight)
        latent_means, latent_stds = encode_dataset(vae, captions, generator)
        vae.register_to_config(scaling_factor=1.0 / latent_means.std().item())  # SD's 0.18215: unit-variance latents
        vae.save_pretrained(os.path.join(model_folder, "vae"))
        torch.save(
            dict(captions=captions, means=latent_means, stds=latent_stds), os.path.join(args.output_dir, "latents.pt")
        )
        log(f"VAE saved; scaling_factor {vae.config.scaling_factor:.4f}")
    else:
        vae = AutoencoderKL.from_pretrained(os.path.join(model_folder, "vae")).requires_grad_(False)

    # 2. UNet + text encoder on the encoded images, with caption dropout; then the whole pipeline is saved
    if "unet" in args.stages:
        torch.set_rng_state(initial_torch_state)
        data = torch.load(os.path.join(args.output_dir, "latents.pt"), weights_only=False)
        train_unet(
            unet,
            text_encoder,
            tokenizer,
            scheduler,
            data["means"],
            data["stds"],
            data["captions"],
            vae.config.scaling_factor,
            args,
            log,
        )
        pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipeline.save_pretrained(model_folder, safe_serialization=True)
        log(f"pipeline saved to {model_folder}")
    # 3. The learned reward, on rendered images and on the pipeline's own samples
    if "reward" in args.stages:
        pipeline = StableDiffusionPipeline.from_pretrained(
            model_folder, safety_checker=None, requires_safety_checker=False
        )
        pipeline.set_progress_bar_config(disable=True)
        generator = np.random.default_rng(args.seed)
        generated_captions = sample_captions(1024, generator, args.rare_weight)
        generated_images = generate(pipeline, generated_captions, args.seed)
        log(
            f"pretrained model: exact reward {exact_scores(generated_images, generated_captions).mean():.3f} on its "
            "own caption distribution"
        )
        reward_model = LearnedShapesReward()
        train_learned_reward(reward_model, generated_images, generated_captions, args, generator, log)
        save_file(reward_model.state_dict(), os.path.join(args.output_dir, LEARNED_REWARD_FILE))
        log(f"learned reward saved to {os.path.join(args.output_dir, LEARNED_REWARD_FILE)}")


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
