"""ddpo_diffexp.py: the DDIM policy's log-prob, the clipped loss, advantages, and the script end to end."""

import json

import numpy as np
import pytest
import torch

import ddpo_diffexp
from conftest import read_jsonl, run_script


# ---------------------------------------------------------------------------------------------- maths
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_step_mean_and_log_prob_match_diffusers_and_the_gaussian(tiny_pipeline, eta):
    scheduler = tiny_pipeline.scheduler
    scheduler.set_timesteps(50)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(3, 4, 16, 16, generator=generator)
    noise_pred = torch.randn(3, 4, 16, 16, generator=generator)
    for t in (scheduler.timesteps[0], scheduler.timesteps[25], scheduler.timesteps[-1]):  # includes abar_prev = abar_0
        # diffusers' step with zero noise is the policy's mean mu; its variance gives sigma_t
        mean = scheduler.step(noise_pred, t, latents, eta=eta, variance_noise=torch.zeros_like(latents)).prev_sample
        prev_t = t - 1000 // 50
        std_dev = eta * scheduler._get_variance(t, prev_t) ** 0.5
        sample, log_prob = ddpo_diffexp.ddim_step_with_logprob(
            scheduler, noise_pred, t, latents, eta, generator=generator
        )
        expected = torch.distributions.Normal(mean, std_dev).log_prob(sample).mean(dim=(1, 2, 3))  # mean over C*H*W
        assert torch.allclose(log_prob, expected, atol=1e-4), (t, log_prob, expected)
        # scoring the mean itself gives the density's maximum, -log(sigma) - log(sqrt(2 pi)): same mean exactly
        _, log_prob_at_mean = ddpo_diffexp.ddim_step_with_logprob(
            scheduler, noise_pred, t, latents, eta, prev_sample=mean
        )
        assert torch.allclose(
            log_prob_at_mean, -torch.log(torch.as_tensor(std_dev)) - 0.5 * np.log(2 * np.pi) * torch.ones(3), atol=1e-4
        )
        # the sample is mean + sigma z with z ~ N(0, I)
        z = (sample - mean) / std_dev
        assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05


def test_ddim_step_accepts_one_timestep_per_sample(tiny_pipeline):
    scheduler = tiny_pipeline.scheduler
    scheduler.set_timesteps(8)
    generator = torch.Generator().manual_seed(1)
    latents, noise_pred = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    prev = torch.randn(2, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([876, 1])
    _, together = ddpo_diffexp.ddim_step_with_logprob(scheduler, noise_pred, timesteps, latents, 1.0, prev_sample=prev)
    for i in range(2):
        _, alone = ddpo_diffexp.ddim_step_with_logprob(
            scheduler, noise_pred[i : i + 1], int(timesteps[i]), latents[i : i + 1], 1.0, prev_sample=prev[i : i + 1]
        )
        assert torch.allclose(together[i], alone[0])


def test_clipped_loss_values():
    one = torch.zeros(1)
    loss, approx_kl, clipfrac = ddpo_diffexp.clipped_policy_loss(one, one, torch.tensor([-1.0]), 1e-4, 5.0)
    assert loss.item() == 1.0 and approx_kl.item() == 0.0 and clipfrac.item() == 0.0  # A = -1, ratio = 1
    # a ratio past 1 + eps with A > 0 is clipped: no more gain (the loss is -A (1 + eps))
    loss, _, clipfrac = ddpo_diffexp.clipped_policy_loss(
        torch.tensor([0.01]), torch.zeros(1), torch.tensor([2.0]), 1e-4, 5.0
    )
    assert torch.isclose(loss, torch.tensor(-2.0 * (1 + 1e-4))) and clipfrac.item() == 1.0
    # advantages are clipped to +-5
    loss, _, _ = ddpo_diffexp.clipped_policy_loss(torch.zeros(1), torch.zeros(1), torch.tensor([-50.0]), 1e-4, 5.0)
    assert loss.item() == 5.0


def test_clipped_loss_gradient_is_the_policy_gradient():
    log_prob = torch.zeros(4, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    loss, _, _ = ddpo_diffexp.clipped_policy_loss(log_prob, torch.zeros(4), advantages, 1e-4, 5.0)
    loss.backward()
    assert torch.allclose(log_prob.grad, -advantages / 4)  # at ratio 1: d loss / d log p = -A / N (Eq. 6)


def test_one_update_moves_probability_toward_high_advantage_trajectories():
    """The script's sampler, log-prob and loss, one gradient step: sum_i A_i log p(trajectory_i) must rise."""
    from common import add_lora, encode_prompts, guided_noise_prediction
    from worlds import load_pipeline

    pipeline = load_pipeline("tiny", "cpu", torch.float32)  # a fresh one: LoRA is added in place
    lora_parameters = add_lora(pipeline.unet, 4)
    scheduler = pipeline.scheduler
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    prompts = ["a dog", "a cat", "a fox", "an ant"] * 2
    prompt_embeds = encode_prompts(pipeline, prompts, 32)
    null_embeds = encode_prompts(pipeline, [""], 32)
    scales = torch.full((8, 4), 5.0)
    trajectory, log_prob_old, _ = ddpo_diffexp.sample_trajectories(
        pipeline,
        pipeline.unet,
        prompt_embeds,
        null_embeds,
        scales,
        torch.randn(8, 4, 16, 16, generator=generator),
        1.0,
        generator,
    )
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.0, -1.0])  # a hand-made reward ranking

    def trajectory_log_probs():  # (8, T): recomputed with the current LoRA, as in section 5
        return torch.stack(
            [
                ddpo_diffexp.ddim_step_with_logprob(
                    scheduler,
                    guided_noise_prediction(
                        pipeline.unet, trajectory[:, j], t, prompt_embeds, null_embeds, scales[:, j]
                    ),
                    t,
                    trajectory[:, j],
                    1.0,
                    prev_sample=trajectory[:, j + 1],
                )[1]
                for j, t in enumerate(scheduler.timesteps)
            ],
            dim=1,
        )

    before = trajectory_log_probs()
    assert torch.allclose(before, log_prob_old, atol=1e-5)  # training recomputes exactly the sampling policy
    loss = sum(
        ddpo_diffexp.clipped_policy_loss(before[:, j], log_prob_old[:, j], advantages, 1e-4, 5.0)[0] for j in range(4)
    )
    loss.backward()
    with torch.no_grad():
        for parameter in lora_parameters:
            parameter -= 1e-2 * parameter.grad  # a small plain gradient step
        after = trajectory_log_probs()
    surrogate_gain = (advantages[:, None] * (after - before)).sum()
    assert surrogate_gain > 0, surrogate_gain  # high-advantage trajectories became likelier, low ones less likely
    assert (after - before).abs().max() > 1e-6  # and the step did change the policy


def test_per_prompt_advantages_use_batch_stats_then_history():
    history = {}
    prompts = ["a"] * 4 + ["b"] * 4
    rewards = np.array([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    first = ddpo_diffexp.per_prompt_advantages(prompts, rewards, history, buffer_size=8, min_count=6)
    assert np.allclose(first, (rewards - rewards.mean()) / (rewards.std() + 1e-6))  # fewer than 6: batch stats
    second = ddpo_diffexp.per_prompt_advantages(prompts, rewards, history, buffer_size=8, min_count=6)
    a_history = np.array([1.0, 2.0, 3.0, 4.0] * 2)
    assert np.allclose(second[:4], (rewards[:4] - a_history.mean()) / (a_history.std() + 1e-6))
    assert np.allclose(second[4:], 0.0)  # "b" always scores 10: zero advantage
    assert len(history["a"]) == 8


def test_exploration_only_in_the_first_three_quarters():
    args = ddpo_diffexp.parse_args(["--diffexp", "--epochs", "8"])
    assert args.dynamic_cfg and args.prompt_weighting
    assert [ddpo_diffexp.exploration_settings(args, e) for e in range(8)] == [(True, True)] * 6 + [(False, False)] * 2
    plain = ddpo_diffexp.parse_args(["--epochs", "8"])
    assert ddpo_diffexp.exploration_settings(plain, 0) == (False, False)


def test_tiny_preset_and_explicit_flags():
    args = ddpo_diffexp.parse_args(["--tiny", "--epochs", "3"])
    assert args.model == "tiny" and args.resolution == 32 and args.epochs == 3  # the flag wins over the preset
    assert ddpo_diffexp.parse_args([]).model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "beauty"], "error: unknown reward 'beauty'"),
        (["--prompts", "nowhere.txt"], "error: prompt file 'nowhere.txt' not found"),
        (["--prompts", "plants"], "error: unknown prompt set 'plants'"),
        (["--t-thres", "1000"], "error: --t-thres 1000 must be in [0, 1000)"),
        (["--prompt-weight-range", "1.2", "1.0"], "error: --prompt-weight-range 1.2 1.0 is inverted"),
        (["--samples-per-epoch", "30"], "error: --samples-per-epoch 30 is not a multiple of --sample-batch-size"),
    ],
)
def test_bad_input_is_one_error_line(flags, message):
    """check_args runs before any model loads (test_scripts.py checks that order in a subprocess)."""
    with pytest.raises(SystemExit) as stop:
        ddpo_diffexp.check_args(ddpo_diffexp.parse_args(["--model", "no-such/model", *flags]), 1)
    assert str(stop.value).startswith(message) and "\n" not in str(stop.value)


def test_unknown_flag_is_rejected(tmp_path):
    result = run_script("ddpo_diffexp.py", ["--tiny", "--no-such-flag", "3"], tmp_path, check=False)
    assert result.returncode != 0 and "no-such-flag" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------- end to end
def test_shared_run_explores_in_its_first_half_only(finished_runs):
    """The shared 2-epoch run (conftest.run_flags) has --diffexp --explore-fraction 0.5: epoch 0 explores."""
    run = finished_runs("ddpo_diffexp.py")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["dynamic_cfg"] for m in metrics] == [True, False]
    assert [m["prompt_weighting"] for m in metrics] == [True, False]
    assert all(0 <= m["clipfrac"] <= 1 and m["approx_kl"] >= 0 for m in metrics)
    assert json.load(open(run / "args.json"))["diffexp"] is True


@pytest.mark.slow  # 24 s; DDPO's learning is in the default suite through the shapes world's (test_shapes_world.py)
def test_tiny_preset_raises_the_reward(tmp_path):
    """4 seeded epochs of the --tiny preset raise the (tiny, random-head) aesthetic reward at fixed evaluation noise.

    Measured with this command over seeds 0-3: +0.18, +0.26 (seed 1, the one tested), +0.18 and +0.19 of the
    initial images' reward spread after 4 epochs (8 epochs: +0.24 for seed 1); the assertion asks for +0.1. JPEG
    compressibility does not move measurably within such a budget on the tiny model.
    """
    flags = "--tiny --reward aesthetic --epochs 4 --eval-every 4 --save-every 4 --eval-images-per-prompt 4 --seed 1"
    flags += " --prompts unseen_animals --eval-unseen-prompts unseen_animals --run-name rise"
    run_script("ddpo_diffexp.py", flags.split(), tmp_path)
    first, last = read_jsonl(tmp_path / "rise" / "eval.jsonl")
    assert (first["epoch"], last["epoch"]) == (0, 4)
    gain = last["seen_reward_mean"] - first["seen_reward_mean"]
    # a paired comparison (the same evaluation noise before and after), so sampling noise does not mask the gain; the
    # training batches' mean reward is too noisy at 32 samples an epoch to show it
    assert gain > 0.1 * first["seen_reward_std"], (gain, first, last)


def test_run_summary_names_start_end_best_and_the_folders(tmp_path):
    """The line every run ends with (the same helper in all four scripts, tests/test_copies.py)."""
    lines = [(0, 0.494, 0.61), (5, 0.61, 0.66), (10, 0.60, 0.70)]
    with open(tmp_path / "eval.jsonl", "w") as f:
        for epoch, seen, unseen in lines:
            f.write(
                json.dumps(dict(epoch=epoch, eval_reward="shapes", seen_reward_mean=seen, unseen_reward_mean=unseen))
                + "\n"
            )
    line = ddpo_diffexp.run_summary(str(tmp_path), 101.4)
    assert line.startswith("done in 101 s: seen shapes reward 0.494 (epoch 0) -> 0.6 (epoch 10), best 0.61")
    assert "(epoch 5); unseen 0.61 -> 0.7;" in line and f"grids in {tmp_path / 'samples'}" in line
    assert ddpo_diffexp.run_summary(str(tmp_path / "none"), 3).startswith("done in 3 s (no evaluation)")
    assert "standard error" not in line  # an eval.jsonl from before the image count was logged
    with open(tmp_path / "eval.jsonl", "a") as f:  # 80 images with a per-image std of 0.36: 0.36 / sqrt(80) = 0.040
        last = dict(epoch=15, eval_reward="shapes", seen_reward_mean=0.6, seen_reward_std=0.36, seen_images=80)
        f.write(json.dumps(last) + "\n")
    line = ddpo_diffexp.run_summary(str(tmp_path), 5)
    assert "-> 0.6 (epoch 15), best 0.61 (epoch 5), each +- 0.04 (standard error);" in line, line
