"""The shapes world: exact reward on images whose answer is known, the learned reward, the committed model,
and DDPO raising the exact reward on it."""

import json

import numpy as np
import pytest
import torch

import common
import shapes_world
import tiny_world
import worlds
from conftest import read_jsonl, run_script
from shapes_world import caption_attributes, detect_objects, exact_scores, render_batch, sample_captions


# ---------------------------------------------------------------------------------------------- the world
def test_every_grammar_word_is_one_token():
    tokenizer = tiny_world.build_tiny_tokenizer(shapes_world.WORDS)
    for word in shapes_world.WORDS:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    ids = tokenizer("a red triangle to the left of two blue squares", add_special_tokens=False).input_ids
    assert len(ids) == 10 and tokenizer.decode(ids) == "a red triangle to the left of two blue squares"


def test_captions_round_trip_and_have_a_long_tail():
    captions = sample_captions(3000, np.random.default_rng(0))
    for caption in captions[:200]:
        objects, relation = shapes_world.parse_caption(caption)
        assert shapes_world.make_caption(objects, relation) == caption
    text = " ".join(captions)
    common_pair, rare_pair = text.count("red circle"), text.count("red triangle")
    assert common_pair > 10 * rare_pair > 0  # the long tail the fine-tuning prompts exploit
    assert shapes_world.parse_caption("a dog riding a bike") is None


def test_rare_weight_thins_or_holds_out_the_rare_pairs():
    """`python shapes_world.py --rare-weight W`: the default is the committed world's draw, 0 holds the tail out."""
    default = sample_captions(3000, np.random.default_rng(0))
    assert sample_captions(3000, np.random.default_rng(0), rare_weight=0.05) == default
    assert shapes_world.Args().rare_weight == shapes_world.TIER_WEIGHTS["rare"]  # the flag's default is the table's
    rare_pairs = [f"{colour} {shape}" for colour, shape in shapes_world.PAIR_TIERS["rare"]]

    def rare_objects(captions):
        text = " ".join(captions)
        return sum(text.count(pair) for pair in rare_pairs)

    thinned, held_out = (sample_captions(3000, np.random.default_rng(0), rare_weight=w) for w in (0.005, 0.0))
    assert rare_objects(default) > 3 * rare_objects(thinned) > 0 and rare_objects(held_out) == 0


# ---------------------------------------------------------------------------------------------- exact reward
def test_exact_reward_is_one_on_every_rendered_caption():
    generator = np.random.default_rng(1)
    captions = sample_captions(300, generator)
    scores = exact_scores(render_batch(captions, generator), captions)
    assert torch.equal(scores, torch.ones(300))


def test_binary_reward_is_one_only_when_every_attribute_holds():
    import worlds

    generator = np.random.default_rng(3)
    captions = sample_captions(100, generator)
    images = render_batch(captions, generator)
    binary = worlds.load_reward("shapes_binary", "cpu", torch.float32)
    assert torch.equal(binary(images, captions), torch.ones(100))  # a rendered caption satisfies all of itself
    wrong = render_batch(["a red circle", "two red circles", "a red circle above a blue square"], generator)
    asked = ["a red square", "a red circle", "a red circle below a blue square"]  # exact: 0.75, 0.75, 7/8
    assert torch.equal(binary(wrong, asked), torch.zeros(3))
    assert torch.equal(exact_scores(wrong, asked), torch.tensor([0.75, 0.75, 7 / 8]))
    assert not binary.differentiable


def test_exact_reward_scores_known_mistakes():
    generator = np.random.default_rng(2)

    def score(drawn, asked):
        return exact_scores(render_batch([drawn], generator), [asked]).item()

    # attributes of "a <c> <s>": c present, c is s, exactly 1 c, nothing else -> multiples of 1/4
    assert score("a red circle", "a red square") == 0.75  # wrong shape only
    assert score("a red circle", "a blue circle") == 0.0  # no blue at all, and a red that was not asked for
    assert score("two red circles", "a red circle") == 0.75  # wrong count
    # "a red circle above a blue square": 3 + 3 phrase attributes, the relation, nothing else -> 8
    assert score("a red circle above a blue square", "a red circle below a blue square") == 7 / 8
    assert score("a blue square to the left of a red circle", "a red circle to the left of a blue square") == 7 / 8
    # no blue: its 3 attributes and the relation fail, and the green square breaks "nothing else"
    assert score("a red circle above a green square", "a red circle above a blue square") == 3 / 8
    blank = torch.ones(1, 3, 32, 32)
    assert exact_scores(blank, ["a red circle"]).item() == 0.25  # only "nothing else" holds


def test_detector_finds_shapes_through_blur_and_noise():
    """Generated images are soft: the detector must still read blurred, noisy renders."""
    generator = np.random.default_rng(3)
    captions = sample_captions(100, generator)
    images = render_batch(captions, generator)
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3
    )
    noisy = (blurred + 0.03 * torch.randn(blurred.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert exact_scores(noisy, captions).mean() > 0.95
    objects = detect_objects(images[0])
    assert all(name in shapes_world.COLOURS and shape in shapes_world.SHAPES for name, shape, *_ in objects)
    assert all(caption_attributes(captions[0], objects).values())


def test_shapes_rewards_reject_prompts_outside_the_grammar():
    with pytest.raises(SystemExit, match="^error: the shapes reward needs captions of the shapes grammar"):
        worlds.check_reward_prompts("shapes", ["a red circle", "a dolphin riding a bike"])
    worlds.check_reward_prompts("aesthetic", ["a dolphin riding a bike"])  # other rewards take any prompt


# ---------------------------------------------------------------------------------------------- committed model
@pytest.fixture(scope="module")
def shapes_pipeline():
    return worlds.load_pipeline(worlds.SHAPES_MODEL, "cpu", torch.float32)


def test_committed_model_loads_as_an_sd_pipeline_and_leaves_room_to_improve(shapes_pipeline):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert isinstance(shapes_pipeline, StableDiffusionPipeline) and isinstance(shapes_pipeline.scheduler, DDIMScheduler)
    common_prompts = ["a red circle", "a green square", "a blue triangle", "a yellow circle"]  # the head of the tail
    rare_prompts = common.load_prompts("shapes")
    scores = {}
    for name, prompts in (("common", common_prompts), ("rare", rare_prompts)):
        images = shapes_pipeline(
            prompts * 4,
            num_inference_steps=10,
            guidance_scale=5.0,
            height=32,
            width=32,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
        ).images
        scores[name] = exact_scores(images, prompts * 4).mean().item()
    assert scores["common"] > 0.8  # the model learned the world ...
    assert scores["rare"] < scores["common"] - 0.1 and scores["rare"] < 0.85  # ... but not its tail: room to improve


def test_learned_reward_tracks_the_exact_reward_and_is_differentiable():
    reward = worlds.load_reward("shapes_learned", "cpu", torch.float32)
    assert reward.differentiable and "shapes_learned" in worlds.DIFFERENTIABLE_REWARDS
    generator = np.random.default_rng(4)
    captions = sample_captions(128, generator)
    images = render_batch(captions, generator)
    shuffled = sample_captions(128, generator)
    predicted = torch.cat([reward(images, captions), reward(images, shuffled)])
    exact = torch.cat([exact_scores(images, captions), exact_scores(images, shuffled)])
    assert torch.corrcoef(torch.stack([predicted, exact]))[0, 1] > 0.8
    pixels = images[:4].clone().requires_grad_(True)
    reward(pixels, captions[:4]).sum().backward()
    assert pixels.grad.abs().sum() > 0  # AlignProp backpropagates through it


# ---------------------------------------------------------------------------------------------- learning
def test_ddpo_raises_the_exact_reward_on_the_shapes_world(tmp_path):
    """A short, seeded version of the README's quick start: the exact reward on the training prompts rises.

    Measured with these flags over seeds 0-3: +0.061 (seed 0, the one tested), +0.133, +0.078 and +0.097 after 3
    epochs (4 epochs: +0.072, +0.116, +0.058, +0.075); the assertion asks for +0.04. lr 1e-2 (the preset's 5e-3
    is steadier over 20 epochs, but 1e-2 shows the rise within the 3 epochs a test can afford). Train batch 16
    instead of the preset's 8 (which divides an update over 2 processes): the same update, one micro-batch of 16
    instead of two of 8, the same gains to 3 decimals on those seeds, and 2-5 s faster here.
    """
    flags = "--shapes --seed 0 --epochs 3 --eval-every 3 --save-every 3 --eval-unseen-prompts unseen_shapes"
    flags += " --learning-rate 1e-2 --train-batch-size 16"
    run_script("ddpo_diffexp.py", [*flags.split(), "--run-name", "shapes"], tmp_path)
    before, after = read_jsonl(tmp_path / "shapes" / "eval.jsonl")
    assert before["eval_reward"] == "shapes" and after["epoch"] == 3
    assert after["seen_reward_mean"] > before["seen_reward_mean"] + 0.04, (before, after)


def test_alignprop_optimises_the_learned_reward_and_evaluates_with_the_exact_one(tmp_path):
    flags = [
        "--shapes",
        "--epochs",
        "1",
        "--samples-per-epoch",
        "8",
        "--sample-batch-size",
        "8",
        "--train-batch-size",
        "4",
        "--samples-per-update",
        "8",
        "--num-steps",
        "4",
        "--eval-images-per-prompt",
        "1",
        "--run-name",
        "align",
    ]
    run_script("alignprop_diffexp.py", flags, tmp_path)
    lines = read_jsonl(tmp_path / "align" / "eval.jsonl")
    assert [line["eval_reward"] for line in lines] == ["shapes", "shapes"]
    assert all(0 <= line["seen_reward_mean"] <= 1 for line in lines)  # the exact reward's range, not the learned one's
    with open(tmp_path / "align" / "args.json") as f:
        args = json.load(f)
    assert args["reward"] == "shapes_learned" and args["model"] == worlds.SHAPES_MODEL


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shapes", "--tiny"], "error: shapes and tiny are two presets; give one"),
        (["--shapes", "--prompts", "animals"], "error: the shapes reward needs captions of the shapes grammar"),
        (["--tiny", "--eval-reward", "beauty"], "error: unknown reward 'beauty'"),
    ],
)
def test_bad_shapes_flags_are_one_error_line(tmp_path, flags, message):
    result = run_script("ddpo_diffexp.py", flags, tmp_path, check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in result.stderr


def test_b2_diffurl_runs_on_the_shapes_world_offline(tmp_path):
    """--shapes needs nothing from the hub, including B2-DiffuRL's diversity model."""
    flags = [
        "--shapes",
        "--epochs",
        "1",
        "--samples-per-epoch",
        "8",
        "--sample-batch-size",
        "8",
        "--train-batch-size",
        "4",
        "--samples-per-update",
        "4",
        "--num-steps",
        "4",
        "--eval-images-per-prompt",
        "2",
        "--run-name",
        "b2",
    ]
    run_script("b2_diffurl.py", flags, tmp_path)
    lines = read_jsonl(tmp_path / "b2" / "eval.jsonl")
    assert [line["eval_reward"] for line in lines] == ["shapes", "shapes"] and all(
        "seen_diversity" in line for line in lines
    )
