"""The offline worlds behind the scripts' loaders: what `--model tiny`, `--tiny` and the shapes rewards mean.

A method script asks this module for its pipeline and its rewards. A hub id or a folder goes straight to
common.py's loaders (a real Stable Diffusion and real reward models); the names below are built offline:

  --model tiny           tiny_world.py's SD-architecture pipeline (built once, then cached as a folder)
  --model tiny-sdxl      tiny_world.py's SDXL-architecture pipeline (likewise)
  --model random:sd15    SD 1.5's (random:sdxl: SDXL's) full-size architecture from configs/, random weights
  --tiny                 common.py's reward modules on tiny_world.py's random CLIP towers
  --reward shapes        shapes_world.py's exact reward (it reads the shapes in the pixels)
  --reward shapes_learned  shapes_world.py's learned, differentiable reward
  --shapes (a preset)    the shapes world's model folder, world/sd-shapes, loaded as any folder
  --reward a+b, 2*a+b    an ensemble of any of these rewards (common.EnsembleReward), each member normalised

The dependencies point one way: common <- tiny_world <- shapes_world <- worlds <- the method scripts.
"""

import common
import shapes_world
import tiny_world

TINY_MODEL = "tiny"
TINY_SDXL_MODEL = "tiny-sdxl"
RANDOM_PREFIX = "random:"  # random:sd15, random:sdxl: the real architectures, random weights (configs/)
SHAPES_MODEL = shapes_world.SHAPES_MODEL
REWARD_NAMES = common.REWARD_NAMES + shapes_world.REWARD_NAMES
DIFFERENTIABLE_REWARDS = common.DIFFERENTIABLE_REWARDS + ("shapes_learned",)


# the shapes rewards are fractions of the caption's attributes, in [0, 1] (ours, for their ensembles)
REWARD_SCALES = common.REWARD_SCALES | {
    "shapes": (0.5, 0.25),
    "shapes_binary": (0.5, 0.5),
    "shapes_learned": (0.5, 0.25),
}


def reward_members(spec):
    """[(weight, name), ...] of a --reward spec: one member for a single reward, several for an ensemble."""
    return common.parse_reward_spec(spec, REWARD_NAMES)


def check_reward_name(spec):
    reward_members(spec)


def reward_is_differentiable(spec):
    """Whether AlignProp can backpropagate through the reward: every member must be differentiable."""
    return all(name in DIFFERENTIABLE_REWARDS for _, name in reward_members(spec))


def check_reward_prompts(spec, prompts):
    """The shapes rewards score captions of the shapes world's grammar only: one error line for any other prompt."""
    for _, name in reward_members(spec):
        if name in shapes_world.REWARD_NAMES:
            shapes_world.check_captions(name, prompts)


def load_pipeline(model, device, dtype):
    """common.load_pipeline for a hub id or a folder; `tiny` and `tiny-sdxl` are tiny_world's pipeline folders
    (built on first use)."""
    if model.startswith(RANDOM_PREFIX):
        name = model[len(RANDOM_PREFIX) :]
        if name not in tiny_world.RANDOM_ARCHITECTURES:
            choices = ", ".join(RANDOM_PREFIX + n for n in tiny_world.RANDOM_ARCHITECTURES)
            raise SystemExit(f"error: unknown architecture '{model}'; choose one of {choices}")
        # built on `device` itself: random initialisation of SDXL's 3.5 G parameters takes a minute on a CPU
        return common.prepare_pipeline(tiny_world.random_pipeline(name, dtype, device=device), device, dtype)
    folders = {TINY_MODEL: "sd", TINY_SDXL_MODEL: "sdxl"}
    folder = tiny_world.pipeline_folder(folders[model]) if model in folders else model
    return common.load_pipeline(folder, device, dtype)


def offline_rewards(tiny, shapes):
    """What a run whose hub reward cannot load can use instead, for its error line: the offline rewards of its
    world (--shapes: the shapes world's; --tiny: the tiny towers; a run on a real model: either world)."""
    shapes_rewards = f"{', '.join(shapes_world.REWARD_NAMES[:-1])} or {shapes_world.REWARD_NAMES[-1]}"
    tiny_rewards = f"{', '.join(tiny_world.REWARD_NAMES[:-1])} or {tiny_world.REWARD_NAMES[-1]}"
    if shapes:
        return f"use the shapes world's rewards, offline: --reward {shapes_rewards}"
    if tiny:
        return f"use a reward of the tiny towers, offline: --reward {tiny_rewards}"
    return f"run offline: --tiny (the rewards on tiny random towers) or --shapes (--reward {shapes_rewards})"


def load_single_reward(name, device, dtype, tiny, shapes=False):
    if name in shapes_world.REWARD_NAMES:
        return common.freeze(shapes_world.load_reward(name), device, dtype)
    if tiny and name in tiny_world.REWARD_NAMES:
        return common.freeze(tiny_world.load_reward(name), device, dtype)
    repositories = common.REWARD_REPOSITORIES.get(name, ())
    common.check_hub_reachable(repositories, f"the reward '{name}'", offline_rewards(tiny, shapes))
    return common.load_reward(name, device, dtype)


def load_reward(spec, device, dtype, tiny=False, shapes=False):
    """The reward `spec`, frozen on `device`: the shapes world's, a tiny one (`tiny`), or common.py's real one; an
    ensemble (common.EnsembleReward) of those for a spec with several members. A real one that is neither cached
    nor reachable stops at once, naming the offline rewards of the run's world (`tiny`, `shapes`: its preset)."""
    members = reward_members(spec)
    if len(members) == 1 and members[0][0] == 1.0:  # "aesthetic", "1*aesthetic": the reward itself
        return load_single_reward(members[0][1], device, dtype, tiny, shapes)
    loaded = [(weight, name, load_single_reward(name, device, dtype, tiny, shapes)) for weight, name in members]
    return common.EnsembleReward(loaded, REWARD_SCALES)
