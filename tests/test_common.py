"""Maths of the shared helpers (Eq. 4, 7, 8), the reward wrappers and the prompt sets."""

import io
import math
import os

import pytest
import torch

import common
import shapes_world
import tiny_world
import worlds
from conftest import SHARED_ASSETS, require_asset


# ---------------------------------------------------------------------------------------------- Eq. 7
def test_dynamic_cfg_scale_switches_after_t_thres():
    assert common.dynamic_cfg_scale(901, 1.0, 5.0, 900) == 1.0  # above t_thres: noisy steps, w_l
    assert common.dynamic_cfg_scale(900, 1.0, 5.0, 900) == 5.0  # at t_thres: w_h (w_l only for t > t_thres)
    assert common.dynamic_cfg_scale(899, 1.0, 5.0, 900) == 5.0
    assert common.dynamic_cfg_scale(torch.tensor(981), 0.5, 7.5, 900) == 0.5  # a scheduler timestep tensor


def test_guidance_scale_schedule_is_eq7_per_step_or_constant():
    timesteps = torch.tensor([951, 901, 851, 1])  # a scheduler's descending timesteps
    assert common.guidance_scale_schedule(timesteps, 1.0, 5.0, 900, True).tolist() == [1.0, 1.0, 5.0, 5.0]  # t > 900
    assert common.guidance_scale_schedule(timesteps, 1.0, 5.0, 900, False).tolist() == [5.0] * 4  # plain CFG


# ---------------------------------------------------------------------------------------------- Eq. 8
def test_random_word_token_mask_selects_every_token_of_one_word(tiny_pipeline):
    tokenizer = tiny_pipeline.tokenizer  # character-level: "dolphin" is 7 tokens
    prompts = ["a dolphin riding a bike", "zebra", "an ant playing chess"]
    generator = torch.Generator().manual_seed(0)
    seen_words = set()
    for _ in range(40):
        mask = common.random_word_token_mask(tiny_pipeline, prompts, generator)
        assert mask.shape == (3, tokenizer.model_max_length) and mask.dtype == torch.bool
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        for row, prompt in enumerate(prompts):
            positions = mask[row].nonzero().flatten().tolist()
            assert positions == list(range(positions[0], positions[-1] + 1))  # one contiguous word
            chosen = tokenizer.decode(ids[row, positions]).strip()
            assert chosen in prompt.split()  # exactly a whole word, all of its tokens
            assert (
                ids[row, positions].ne(tokenizer.bos_token_id).all()
                and ids[row, positions].ne(tokenizer.eos_token_id).all()
            )
            seen_words.add((row, chosen))
    assert {w for r, w in seen_words if r == 0} == {"a", "dolphin", "riding", "bike"}  # every word gets drawn


def test_weight_prompt_embeds_matches_eq8_only_on_the_mask():
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = torch.randn(2, 77, 8, generator=generator)
    null_embeds = torch.randn(1, 77, 8, generator=generator)
    mask = torch.zeros(2, 77, dtype=torch.bool)
    mask[0, 3:6] = True
    mask[1, 1] = True
    weights = torch.tensor([1.15, 1.05])
    weighted = common.weight_prompt_embeds(prompt_embeds, null_embeds, mask, weights)
    expected = null_embeds + weights.view(2, 1, 1) * (prompt_embeds - null_embeds)  # Eq. 8
    assert torch.allclose(weighted[mask], expected[mask])
    assert torch.equal(weighted[~mask], prompt_embeds[~mask])  # other tokens untouched
    assert not torch.allclose(weighted[mask], prompt_embeds[mask])
    identity = common.weight_prompt_embeds(prompt_embeds, null_embeds, mask, torch.ones(2))
    assert torch.allclose(identity, prompt_embeds, atol=1e-6)  # w = 1 is the identity


def test_randomly_weight_prompts_weights_one_drawn_word_per_prompt(tiny_pipeline):
    prompts = ["a dolphin riding a bike", "an ant playing chess"]
    prompt_embeds = common.encode_prompts(tiny_pipeline, prompts, 32)  # (2, L, D)
    null_embeds = common.encode_prompts(tiny_pipeline, [""], 32)  # (1, L, D)
    weighted = common.randomly_weight_prompts(
        tiny_pipeline, prompts, prompt_embeds, null_embeds, (1.0, 1.2), torch.Generator().manual_seed(3)
    )
    # the same draws by hand, in the same order: the word, then the weights
    generator = torch.Generator().manual_seed(3)
    mask = common.random_word_token_mask(tiny_pipeline, prompts, generator)
    weights = 1.0 + 0.2 * torch.rand(2, generator=generator)
    assert ((weights > 1.0) & (weights < 1.2)).all()
    assert torch.equal(weighted, common.weight_prompt_embeds(prompt_embeds, null_embeds, mask, weights))
    assert torch.equal(weighted[~mask], prompt_embeds[~mask])
    assert not torch.allclose(weighted[mask], prompt_embeds[mask])


# ---------------------------------------------------------------------------------------------- Eq. 4
def test_guided_noise_prediction_is_cfg_with_per_sample_scales(tiny_pipeline):
    unet = tiny_pipeline.unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator)
    prompt_embeds = common.encode_prompts(tiny_pipeline, ["a dog", "a cat"], 32)
    null_embeds = common.encode_prompts(tiny_pipeline, [""], 32)
    scales = torch.tensor([1.0, 7.5])
    timesteps = torch.tensor([981, 501])
    with torch.no_grad():
        guided = common.guided_noise_prediction(unet, latents, timesteps, prompt_embeds, null_embeds, scales)
        for i in range(2):
            cond = unet(latents[i : i + 1], timesteps[i], encoder_hidden_states=prompt_embeds[i : i + 1]).sample
            uncond = unet(latents[i : i + 1], timesteps[i], encoder_hidden_states=null_embeds).sample
            assert torch.allclose(guided[i : i + 1], uncond + scales[i] * (cond - uncond), atol=1e-5)


# ---------------------------------------------------------------------------------------------- pipeline
def test_tiny_pipeline_is_sd_shaped_with_sd15_schedule(tiny_pipeline):
    from diffusers import DDIMScheduler

    assert isinstance(tiny_pipeline.scheduler, DDIMScheduler)
    assert (
        tiny_pipeline.scheduler.config.beta_schedule == "scaled_linear"
        and not tiny_pipeline.scheduler.config.set_alpha_to_one
    )
    tiny_pipeline.scheduler.set_timesteps(50)
    assert tiny_pipeline.scheduler.timesteps[0] == 981 and tiny_pipeline.scheduler.timesteps[-1] == 1
    images = tiny_pipeline(
        ["a dog"],
        num_inference_steps=4,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_the_tiny_unet_is_the_committed_pretrained_one(tiny_pipeline):
    from safetensors.torch import load_file

    committed = load_file(tiny_world.TINY_UNET_WEIGHTS)
    weights = tiny_pipeline.unet.state_dict()
    assert committed.keys() == weights.keys()
    assert all(torch.equal(weights[name], committed[name]) for name in committed)


@pytest.mark.slow
def test_the_seeded_pretraining_reproduces_the_committed_tiny_unet():
    """`python tiny_world.py` wrote world/tiny-unet-150.safetensors: the pretraining (30-100 s) still computes it."""
    from safetensors.torch import load_file

    committed = load_file(tiny_world.TINY_UNET_WEIGHTS)
    pretrained = tiny_world._build_tiny_pipeline(pretrain=True).unet.state_dict()
    for name, tensor in committed.items():  # float sums are ordered by the thread count and CPU: 2e-5 apart
        assert torch.allclose(pretrained[name], tensor, atol=1e-4, rtol=1e-3), name


def test_unreachable_model_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as error:
        common.load_pipeline("no-such-user/no-such-model", "cpu", torch.float32)
    message = str(error.value)
    assert message.startswith("error: cannot load the model 'no-such-user/no-such-model'") and "--tiny" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------- rewards
def test_unknown_reward_is_one_clear_error():
    with pytest.raises(SystemExit, match="^error: unknown reward 'beauty'; choose one of aesthetic"):
        worlds.load_reward("beauty", "cpu", torch.float32, tiny=True)


def test_real_laion_head_loads_strictly_and_scores():
    path = require_asset(os.path.join(SHARED_ASSETS, "sac+logos+ava1-l14-linearMSE.pth"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    head = common.AestheticMLP()
    head.load_state_dict(state, strict=True)  # raises on any missing or unexpected key / shape
    reward = tiny_world.load_reward("aesthetic", aesthetic_head_path=path)
    assert torch.equal(reward.head.layers[0].weight, state["layers.0.weight"])
    scores = reward(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)), ["a", "b"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_tensor_preprocessing_matches_the_transformers_processor():
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(  # the openai/clip-vit-large-patch14 preprocessor_config.json
        do_resize=True,
        size={"shortest_edge": 224},
        resample=3,
        do_center_crop=True,
        crop_size={"height": 224, "width": 224},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(common.CLIP_MEAN),
        image_std=list(common.CLIP_STD),
    )
    generator = torch.Generator().manual_seed(0)
    for height, width in [(512, 512), (64, 96), (300, 200)]:
        smooth = torch.nn.functional.interpolate(
            torch.rand(1, 3, 8, 8, generator=generator), size=(height, width), mode="bilinear"
        )
        images = (smooth * 255).round() / 255  # values a uint8 image can hold, so both paths see the same input
        ours = common.clip_preprocess(images)
        theirs = processor(images=common.images_to_pil(images), return_tensors="pt").pixel_values
        assert ours.shape == theirs.shape == (1, 3, 224, 224)
        difference = (ours - theirs).abs()
        # the processor rounds to uint8 after resizing: 1/255 / std(0.26) = 0.015 per pixel at most, plus filters
        assert difference.mean() < 0.01 and difference.max() < 0.06, (
            height,
            width,
            difference.mean(),
            difference.max(),
        )


def test_flat_image_is_more_jpeg_compressible_than_noise():
    compressibility = common.load_reward("jpeg_compressibility", "cpu", torch.float32)
    incompressibility = common.load_reward("jpeg_incompressibility", "cpu", torch.float32)
    images = torch.stack(
        [torch.full((3, 64, 64), 0.5), torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    )
    flat, noise = compressibility(images, ["", ""]).tolist()
    assert flat > noise  # fewer kB -> higher (less negative) reward
    buffer = io.BytesIO()
    common.images_to_pil(images[1:])[0].save(buffer, format="JPEG", quality=95)
    assert math.isclose(-noise, buffer.tell() / 1000, rel_tol=1e-6)  # the reward is the size in kB
    assert torch.allclose(incompressibility(images, ["", ""]), -compressibility(images, ["", ""]))
    assert not compressibility.differentiable


@pytest.mark.parametrize("name", worlds.DIFFERENTIABLE_REWARDS)
def test_gradient_reaches_the_image_through_differentiable_rewards(name):
    reward = worlds.load_reward(name, "cpu", torch.float32, tiny=True)
    assert reward.differentiable
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    prompts = (
        ["a red circle", "a blue square above a green triangle"]
        if name in shapes_world.REWARD_NAMES
        else ["a dog", "a cat riding a bike"]
    )
    scores = reward(images, prompts)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert all(not p.requires_grad for p in reward.parameters())  # the reward itself stays frozen


def test_pickscore_is_logit_scaled_clipscore():
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    pick = worlds.load_reward("pickscore", "cpu", torch.float32, tiny=True)
    clip = worlds.load_reward("clipscore", "cpu", torch.float32, tiny=True)
    scale = pick.clip_model.logit_scale.exp()
    assert torch.allclose(pick(images, ["a", "b"]), scale * clip(images, ["a", "b"]), atol=1e-5)
    assert (clip(images, ["a", "b"]).abs() <= 1).all()


def test_an_ensemble_is_the_weighted_sum_of_normalised_members_and_backpropagates():
    assert worlds.reward_members("hpsv2+aesthetic+0.5*pickscore") == [
        (1.0, "hpsv2"),
        (1.0, "aesthetic"),
        (0.5, "pickscore"),
    ]
    ensemble = worlds.load_reward("hpsv2+aesthetic+0.5*pickscore", "cpu", torch.float32, tiny=True)
    assert isinstance(ensemble, common.EnsembleReward) and ensemble.differentiable
    images = torch.rand(3, 3, 32, 32, requires_grad=True)
    prompts = ["a red apple", "a cat", "a dog"]
    total, members = common.score_images(ensemble, images, prompts)
    expected = sum(
        weight * (worlds.load_reward(name, "cpu", torch.float32, tiny=True)(images, prompts) - center) / spread
        for weight, name, (center, spread) in [
            (1.0, "hpsv2", common.REWARD_SCALES["hpsv2"]),
            (1.0, "aesthetic", common.REWARD_SCALES["aesthetic"]),
            (0.5, "pickscore", common.REWARD_SCALES["pickscore"]),
        ]
    )
    assert torch.allclose(total, expected, atol=1e-4) and sorted(members) == ["aesthetic", "hpsv2", "pickscore"]
    total.sum().backward()
    assert images.grad.abs().sum() > 0
    single = worlds.load_reward("aesthetic", "cpu", torch.float32, tiny=True)
    assert not isinstance(single, common.EnsembleReward) and common.score_images(single, images, prompts)[1] == {}
    assert isinstance(worlds.load_reward("1*aesthetic", "cpu", torch.float32, tiny=True), type(single))
    assert not worlds.reward_is_differentiable("aesthetic+jpeg_compressibility")
    assert not worlds.load_reward("aesthetic+jpeg_compressibility", "cpu", torch.float32, tiny=True).differentiable


@pytest.mark.parametrize(
    "spec, message",
    [
        ("aesthetic+beauty", "error: unknown reward 'beauty'"),
        ("two*aesthetic", "error: reward 'two*aesthetic': 'two*aesthetic' is not WEIGHT*NAME"),
        ("0*aesthetic+hpsv2", "error: reward '0*aesthetic+hpsv2': the weight of aesthetic must be finite and nonzero"),
        ("nan*aesthetic", "error: reward 'nan*aesthetic': the weight of aesthetic must be finite and nonzero"),
        ("hpsv2+2*hpsv2", "error: reward 'hpsv2+2*hpsv2' names a reward twice"),
    ],
)
def test_a_bad_ensemble_spec_is_one_error_line(spec, message):
    with pytest.raises(SystemExit, match="^" + message.replace("*", r"\*").replace("+", r"\+")):
        worlds.check_reward_name(spec)


# ---------------------------------------------------------------------------------------------- prompts
def test_prompt_sets_follow_the_paper_tables(tmp_path):
    assert len(common.load_prompts("animals")) == 45 and "hedgehog" in common.load_prompts("animals")
    assert common.load_prompts("unseen_animals") == [
        "hippopotamus",
        "snail",
        "crocodile",
        "cheetah",
        "lobster",
        "octopus",
    ]
    activities = common.load_prompts("animal_activities")
    assert (
        len(activities) == 135 and "an ant washing the dishes" in activities and "a dolphin riding a bike" in activities
    )
    unseen = common.load_prompts("unseen_activities")
    assert len(unseen) == 135 and not set(unseen) & set(activities)
    path = tmp_path / "mine.txt"
    path.write_text("a red apple\n\n  a blue car \n")
    assert common.load_prompts(str(path)) == ["a red apple", "a blue car"]
    with pytest.raises(SystemExit, match="^error: prompt file '.*missing.txt' not found$"):
        common.load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(SystemExit, match="^error: unknown prompt set 'plants'"):
        common.load_prompts("plants")


def test_drawbench_sets_are_the_shared_csv_split_as_diffexp_says():
    import csv

    from conftest import ROOT

    with open(os.path.join(ROOT, "..", "shared", "papers", "drawbench", "drawbench.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert common.load_prompts("drawbench") == [row["prompt"] for row in rows]  # the committed copy is the same
    challenging = common.load_prompts("drawbench_challenging")
    assert len(challenging) == 58  # DiffExp: "58 challenging prompts from DrawBench"
    assert "A horse riding an astronaut." in challenging and "A red colored car." not in challenging
    unseen = common.load_prompts(common.unseen_twin("drawbench_challenging"))
    assert len(unseen) == 142 and not set(unseen) & set(challenging)
    sizes = {name: len(common.load_prompts(common.drawbench_set_name(name))) for name in common.DRAWBENCH_CATEGORIES}
    assert sizes["Reddit"] == 38 and sizes["Gary Marcus et al."] == 10 and sum(sizes.values()) == 200
    assert common.load_prompts("drawbench_gary_marcus_et_al")[0].startswith("Paying for a quarter-sized pizza")
    assert sorted({row["category"] for row in rows}) == sorted(common.DRAWBENCH_CATEGORIES)


def test_prompt_paths_resolve_from_the_cwd_then_the_project_and_find_their_test_twin(tmp_path, monkeypatch):
    from conftest import ROOT

    monkeypatch.chdir(tmp_path)  # a directory without prompts/: the project's file is found
    with open(os.path.join(ROOT, "prompts", "spatial_train.txt")) as f:
        assert common.load_prompts("prompts/spatial_train.txt") == [line.strip() for line in f if line.strip()]
    assert common.unseen_twin("prompts/spatial_train.txt") == os.path.join(ROOT, "prompts", "spatial_test.txt")
    assert common.unseen_twin("animal_activities") == "unseen_activities" and common.unseen_twin("plants.txt") is None
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "spatial_train.txt").write_text("a cube on a sphere\n")  # the cwd's file wins
    assert common.load_prompts("prompts/spatial_train.txt") == ["a cube on a sphere"]
    assert common.unseen_twin("prompts/spatial_train.txt") is None  # no test twin beside the cwd's file
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(SystemExit, match="^error: prompt file 'binary.txt' is not UTF-8 text$"):
        common.load_prompts("binary.txt")


def test_b2_template_sets_are_the_released_lists_with_their_test_twins():
    """The six files are B2-DiffuRL's released JSON lists, one prompt a line, in order (shared/papers/b2_prompts)."""
    import json

    from conftest import ROOT

    released = os.path.join(os.path.dirname(ROOT), "shared", "papers", "b2_prompts")
    for template in (1, 2, 3):
        for split, name in (("train", f"b2_template{template}"), ("test", f"b2_template{template}_test")):
            with open(os.path.join(released, f"b2_template{template}_{split}.json")) as f:
                assert common.load_prompts(name) == json.load(f), name
        assert common.unseen_twin(f"b2_template{template}") == f"b2_template{template}_test"
    train, test = common.load_prompts("b2_template1"), common.load_prompts("b2_template1_test")
    assert (len(train), len(test)) == (45, 90) and not set(train) & set(test)


def test_hpsv2_defaults_to_v2_0_and_loads_its_model_once(monkeypatch):
    """A stand-in for the hub's checkpoint counts the loads: one per load_reward, none per score."""
    loads = []

    def stand_in(checkpoint_file):
        loads.append(checkpoint_file)
        return tiny_world._tiny_clip_model()  # a CLIPModel and its tokenizer, as hpsv2_model returns

    monkeypatch.setattr(common, "hpsv2_model", stand_in)
    reward = common.load_reward("hpsv2", "cpu", torch.float32)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    scores = [reward(images, ["a cat", "a dog riding a bike"]) for _ in range(3)]
    assert loads == ["HPS_v2_compressed.pt"]  # v2.0, as AlignProp and CoCA; loaded once, scored three times
    assert scores[0].shape == (2,) and torch.equal(scores[0], scores[2]) and (scores[0].abs() <= 1).all()
    common.load_reward("hpsv2.1", "cpu", torch.float32)
    assert loads == ["HPS_v2_compressed.pt", "HPS_v2.1_compressed.pt"]


HPS_TINY = os.path.join(SHARED_ASSETS, "hps_tiny")


def test_hpsv2_checkpoint_in_open_clip_format_reproduces_open_clip_scores():
    """../shared/assets/hps_tiny: a tiny checkpoint in HPS_v2_compressed.pt's format, and open_clip's own scores.

    Loaded by the code that loads the real checkpoint (only the sizes differ: VIT_H_14 there, the asset's config
    here): CLIP-normalised 224 px images score as open_clip within 1e-6. From 64 px images, the differentiable
    resize is within 1e-3 of hpsv2's PIL preprocessing (measured: 2.5e-4), and the gradient reaches the pixels.
    """
    import json

    require_asset(os.path.join(HPS_TINY, "HPS_tiny_compressed.pt"))
    with open(os.path.join(HPS_TINY, "open_clip_config.json")) as f:
        config = json.load(f)
    golden = torch.load(os.path.join(HPS_TINY, "golden.pt"), map_location="cpu", weights_only=False)
    model = common.load_open_clip_checkpoint(os.path.join(HPS_TINY, "HPS_tiny_compressed.pt"), config).eval()
    reward = common.ClipSimilarityReward(model, tokenizer=None, use_logit_scale=False)  # HPSv2's computation
    with torch.no_grad():
        scores = reward.cosine(common.clip_preprocess(golden["images_224"]), golden["input_ids"])  # no padding mask
    assert torch.allclose(scores, golden["scores_224"], atol=1e-6, rtol=0)
    # the same with a padding mask (how forward tokenizes): the text is pooled at EOT, causal attention stops there
    mask = (torch.arange(77)[None] <= golden["input_ids"].argmax(-1)[:, None]).long()
    with torch.no_grad():
        masked = reward.cosine(common.clip_preprocess(golden["images_224"]), golden["input_ids"], mask)
    assert torch.allclose(masked, scores, atol=1e-6, rtol=0)
    assert torch.allclose(model.logit_scale, golden["logit_scale"])  # every tensor was converted (strict load)
    pixels = (golden["images_64_uint8"].float() / 255).requires_grad_(True)
    scores = reward.cosine(common.clip_preprocess(pixels), golden["input_ids"])
    assert torch.allclose(scores, golden["scores_64_hpsv2_preprocess"], atol=1e-3, rtol=0)
    scores.sum().backward()
    assert pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()


def test_a_checkpoint_that_is_not_open_clip_is_one_error_line(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {"logit_scale": torch.ones(())}}, path)
    with pytest.raises(SystemExit, match="is not an open_clip CLIP checkpoint"):
        common.load_open_clip_checkpoint(str(path), common.VIT_H_14)


IMAGEREWARD_TINY = os.path.join(SHARED_ASSETS, "imagereward_tiny")


def test_imagereward_checkpoint_in_the_package_format_reproduces_the_package_scores():
    """../shared/assets/imagereward_tiny: a tiny checkpoint in ImageReward.pt's format, and the package's scores.

    Loaded by the code that loads the real one (only the sizes differ): CLIP-normalised 224 px images score as
    the package's `score_gard` within 1e-5 (measured: 0.0); from 64 px images, the differentiable resize is within
    1e-3 of the package's PIL preprocessing (measured: 4e-5), and the gradient reaches the pixels.
    """
    import json

    require_asset(os.path.join(IMAGEREWARD_TINY, "ImageReward_tiny.pt"))
    with open(os.path.join(IMAGEREWARD_TINY, "config.json")) as f:
        config = json.load(f)
    assert (config["mean"], config["std"]) == (common.IMAGEREWARD_MEAN, common.IMAGEREWARD_STD)
    golden = torch.load(os.path.join(IMAGEREWARD_TINY, "golden.pt"), map_location="cpu", weights_only=False)
    path = os.path.join(IMAGEREWARD_TINY, "ImageReward_tiny.pt")
    model = common.load_imagereward_checkpoint(path, config["vision"], config["med_config"], tokenizer=None).eval()
    tokens = golden["input_ids"], golden["attention_mask"]
    with torch.no_grad():
        scores = model.score(common.clip_preprocess(golden["images_224"]), *tokens)
    assert torch.allclose(scores, golden["scores_224"], atol=1e-5, rtol=0)
    pixels = (golden["images_64_uint8"].float() / 255).requires_grad_(True)
    scores = model.score(common.clip_preprocess(pixels), *tokens)
    assert torch.allclose(scores, golden["scores_64_package_preprocess"], atol=1e-3, rtol=0)
    scores.sum().backward()
    assert pixels.grad.abs().sum() > 0 and torch.isfinite(pixels.grad).all()


def bilinear_reference(image, size):
    """Bilinear resize, no antialiasing, align_corners False, written out from its definition (torchvision 0.15's
    Resize on a tensor): output pixel i reads input position (i + 0.5) * in / out - 0.5, clamped at 0, and
    interpolates linearly between its two neighbours; rows, then columns. image (C, H, W) numpy."""
    import numpy as np

    def along(axis_length, out_length):
        position = np.maximum((np.arange(out_length) + 0.5) * axis_length / out_length - 0.5, 0.0)
        low = np.minimum(np.floor(position).astype(int), axis_length - 1)
        high = np.minimum(low + 1, axis_length - 1)
        return low, high, position - low

    low, high, weight = along(image.shape[1], size)
    rows = image[:, low, :] * (1 - weight)[None, :, None] + image[:, high, :] * weight[None, :, None]
    low, high, weight = along(image.shape[2], size)
    return rows[:, :, low] * (1 - weight)[None, None, :] + rows[:, :, high] * weight[None, None, :]


def test_the_releases_bilinear_reward_resize_against_its_definition():
    """AlignProp@a831a5f's reward input (--reward-resize bilinear): a 512 px image to 224 as torchvision 0.15.2's
    Resize did, and not what the default (CLIP's processor: bicubic, antialiased) gives."""
    import numpy as np

    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(common.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(common.CLIP_STD).view(1, 3, 1, 1)
    bilinear = common.clip_preprocess(images, resize="bilinear") * std + mean  # back to [0, 1] pixels
    expected = np.stack([bilinear_reference(image.numpy().astype(np.float64), 224) for image in images])
    np.testing.assert_allclose(bilinear.numpy(), expected, atol=1e-4)  # torch's source positions are fp32
    bicubic = common.clip_preprocess(images) * std + mean
    assert (bicubic - bilinear).abs().mean() > 0.01  # antialiasing averages the noise away, bilinear does not
    half = common.clip_preprocess(images.half(), resize="bilinear")  # fp16 in: resized in fp32, cast back
    assert half.dtype == torch.float16


def test_the_alignprop_presets_score_as_the_release_and_the_resize_reaches_every_member():
    import alignprop_diffexp

    for preset in ("diffexp-fig4a", "diffexp-fig10a", "diffexp-fig10b", "alignprop-aesthetic"):
        args = alignprop_diffexp.parse_args(["--preset", preset])
        assert args.reward_resize == "bilinear" and args.half_precision_rewards, preset
    assert alignprop_diffexp.parse_args([]).reward_resize == "bicubic"
    ensemble = worlds.load_reward("aesthetic+pickscore+jpeg_compressibility", "cpu", torch.float32, tiny=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    before = ensemble.score(images, ["a cat", "a dog"])[1]
    common.set_reward_resize(ensemble, "bilinear")
    assert [getattr(member, "resize", None) for member in ensemble.members] == ["bilinear", "bilinear", None]
    after = ensemble.score(images, ["a cat", "a dog"])[1]
    assert all(not torch.equal(before[name], after[name]) for name in ("aesthetic", "pickscore"))
    assert torch.equal(before["jpeg_compressibility"], after["jpeg_compressibility"])
