"""ddpo_coca.py: CoCA's similarities, step weights and shaped advantages, bad input, and the script end to end."""

import json

import numpy as np
import pytest
import torch

import ddpo_coca
from conftest import read_jsonl


# ---------------------------------------------------------------------------------------------- similarities
def test_predicted_clean_latent_matches_diffusers(tiny_pipeline):
    scheduler = tiny_pipeline.scheduler
    scheduler.set_timesteps(10)
    generator = torch.Generator().manual_seed(0)
    latents, noise_pred = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 4, 8, 8, generator=generator)
    for t in (scheduler.timesteps[0], scheduler.timesteps[5], scheduler.timesteps[-1]):
        expected = scheduler.step(
            noise_pred, t, latents, eta=1.0, variance_noise=torch.zeros_like(latents)
        ).pred_original_sample
        assert torch.allclose(ddpo_coca.predicted_clean_latent(scheduler, noise_pred, t, latents), expected, atol=1e-5)
    # one timestep per sample gives each sample its own abar_t
    timesteps = scheduler.timesteps[[0, -1]]
    together = ddpo_coca.predicted_clean_latent(scheduler, noise_pred, timesteps, latents)
    for i in range(2):
        assert torch.allclose(
            together[i],
            ddpo_coca.predicted_clean_latent(scheduler, noise_pred[i : i + 1], timesteps[i], latents[i : i + 1])[0],
        )


def test_similarity_to_final_latent_by_hand():
    final = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    other = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    other = other - (other * final).sum() / (final * final).sum() * final  # orthogonal to x_0
    estimates = torch.stack([-final, other, 2 * final], dim=1)  # x0_hat_0..2, (1, 3, 4, 3, 3)
    similarities = ddpo_coca.similarity_to_final_latent(estimates, final)
    assert similarities.shape == (1, 4)
    assert torch.allclose(similarities, torch.tensor([[-1.0, 0.0, 1.0, 1.0]]), atol=1e-5)  # c_3 = cos(x_0, x_0)


# ---------------------------------------------------------------------------------------------- step weights
@pytest.mark.parametrize("window", [1, 2, 5, 10])
def test_weights_sum_to_one_and_are_non_negative_when_the_similarity_rises(window):
    generator = torch.Generator().manual_seed(window)
    rising = torch.sort(torch.rand(64, 11, generator=generator) * 1.5 - 0.5, dim=1).values  # c_0 <= ... <= c_10
    weights = ddpo_coca.step_weights_from_similarity(rising, window)
    assert weights.shape == (64, 10)
    assert torch.allclose(weights.sum(dim=1), torch.ones(64), atol=1e-5)
    assert (weights >= 0).all()
    # steps of one window share one weight
    assert torch.equal(
        weights.reshape(64, 10 // window, window),
        weights.reshape(64, 10 // window, window)[:, :, :1].expand(-1, -1, window),
    )
    # any sequence, rising or not, still gives weights that sum to 1
    anything = torch.rand(64, 11, generator=generator, dtype=torch.float64) * 2 - 1
    assert torch.allclose(
        ddpo_coca.step_weights_from_similarity(anything, window).sum(dim=1), torch.ones(64, dtype=torch.float64)
    )


def test_weights_of_a_hand_made_similarity_sequence():
    # T = 4, w = 2: c = (0, 0.2, 0.4, 0.5, 1). m_0 = (0.2 + 0.4) / 2 = 0.3, m_1 = (0.5 + 1) / 2 = 0.75;
    # g_0 = m_0 - c_0 = 0.3, g_1 = m_1 - m_0 = 0.45; sum 0.75; s = g / (0.75 * 2) = 0.2 (window 0), 0.3 (window 1)
    rising = torch.tensor([[0.0, 0.2, 0.4, 0.5, 1.0]])
    weights = ddpo_coca.step_weights_from_similarity(rising, 2)
    assert torch.allclose(weights, torch.tensor([[0.2, 0.2, 0.3, 0.3]]), atol=1e-6)
    assert torch.allclose(ddpo_coca.return_to_go(weights), torch.tensor([[1.0, 0.8, 0.6, 0.3]]), atol=1e-6)
    # T = 6, w = 2 with a dip: m = (0.6, 0.4, 0.95); g = (0.6 - 0.1, 0.4 - 0.6, 0.95 - 0.4) = (0.5, -0.2, 0.55);
    # sum 0.85; s = g / 1.7, the negative gain kept (deviation 2)
    dipping = torch.tensor([[0.1, 0.5, 0.7, 0.4, 0.4, 0.9, 1.0]])
    expected = torch.tensor([[0.5, 0.5, -0.2, -0.2, 0.55, 0.55]]) / 1.7
    assert torch.allclose(ddpo_coca.step_weights_from_similarity(dipping, 2), expected, atol=1e-6)
    # w = 1 is the plain per-step gain: s_j = (c_{j+1} - c_j) / (c_T - c_0)
    assert torch.allclose(
        ddpo_coca.step_weights_from_similarity(rising, 1), torch.tensor([[0.2, 0.2, 0.1, 0.5]]), atol=1e-6
    )


def test_no_total_gain_falls_back_to_uniform_weights():
    flat = torch.tensor([[0.5] * 5, [0.9, 0.8, 0.7, 0.6, 0.5]])  # gain 0, and a falling sequence (gain < 0)
    weights = ddpo_coca.step_weights_from_similarity(flat, 2)
    assert torch.isfinite(weights).all() and torch.allclose(weights, torch.full((2, 4), 0.25))


# ---------------------------------------------------------------------------------------------- shaped advantages
def test_alpha_one_gives_every_step_the_ddpo_advantage():
    generator = torch.Generator().manual_seed(3)
    weights = ddpo_coca.step_weights_from_similarity(torch.rand(6, 11, generator=generator), 5)  # any weights
    advantages = torch.tensor([1.0, -1.0, 1.5, -1.5, 0.5, -0.5])
    advantages = advantages / advantages.std(correction=0)  # already mean 0, std 1, as a batch of DDPO advantages
    shaped = ddpo_coca.shaped_step_advantages(advantages.double(), weights, 1.0, 5.0)
    assert torch.allclose(shaped, advantages.double()[:, None].expand(6, 10), atol=1e-5)
    # any A: the same value at every step of a trajectory, the batch z-score of A
    advantages = torch.tensor([3.0, 0.2, -1.0, 0.7, 2.0, -4.0], dtype=torch.float64)
    shaped = ddpo_coca.shaped_step_advantages(advantages, weights, 1.0, 5.0)
    assert torch.allclose(shaped, shaped[:, :1].expand(-1, 10))
    assert torch.allclose(shaped[:, 0], (advantages - advantages.mean()) / (advantages.std(correction=0) + 1e-6))


def test_alpha_zero_shapes_by_the_return_to_go():
    weights = torch.tensor([[0.2, 0.2, 0.3, 0.3], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    advantages = torch.tensor([2.0, -2.0], dtype=torch.float64)
    # r_j = A G_j with G = (1, 0.8, 0.6, 0.3) and (1, 0.75, 0.5, 0.25), then one z-score over the 8 values
    shaped_by_hand = np.array([[2.0, 1.6, 1.2, 0.6], [-2.0, -1.5, -1.0, -0.5]])
    expected = (shaped_by_hand - shaped_by_hand.mean()) / (shaped_by_hand.std() + 1e-6)
    shaped = ddpo_coca.shaped_step_advantages(advantages, weights, 0.0, 5.0)
    assert np.allclose(shaped.numpy(), expected, atol=1e-6)
    assert (shaped[0].diff() < 0).all() and (shaped[1].diff() > 0).all()  # the early steps carry most of |A|
    # alpha = 0.5 sits between: r_j = A (0.5 + 0.5 G_j)
    half = advantages.numpy()[:, None] * (0.5 + 0.5 * np.array([[1.0, 0.8, 0.6, 0.3], [1.0, 0.75, 0.5, 0.25]]))
    assert np.allclose(
        ddpo_coca.shaped_step_advantages(advantages, weights, 0.5, 5.0).numpy(),
        (half - half.mean()) / (half.std() + 1e-6),
        atol=1e-6,
    )
    # A is clipped to +-5 before shaping
    clipped = ddpo_coca.shaped_step_advantages(torch.tensor([50.0, -1.0, 1.0]), torch.full((3, 4), 0.25), 0.0, 5.0)
    assert torch.allclose(
        clipped, ddpo_coca.shaped_step_advantages(torch.tensor([5.0, -1.0, 1.0]), torch.full((3, 4), 0.25), 0.0, 5.0)
    )


def test_defaults_and_tiny_preset():
    args = ddpo_coca.parse_args([])
    assert (args.learning_rate, args.clip_range, args.similarity_window, args.shaping_alpha) == (1e-4, 1e-4, 5, 0.0)
    tiny = ddpo_coca.parse_args(["--tiny"])
    assert tiny.model == "tiny" and tiny.num_steps % tiny.similarity_window == 0
    ddpo_coca.check_args(tiny, 1)  # no SystemExit


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-steps", "8"], "error: --num-steps 8 is not a multiple of --similarity-window 5 (8 = 1 x 5 + 3)"),
        (["--shaping-alpha", "1.5"], "error: --shaping-alpha 1.5 must be in [0, 1]"),
    ],
)
def test_bad_input_is_one_error_line(flags, message):
    with pytest.raises(SystemExit) as stop:
        ddpo_coca.check_args(ddpo_coca.parse_args(["--model", "no-such/model", *flags]), 1)
    assert str(stop.value) == message


# ---------------------------------------------------------------------------------------------- end to end
def test_shared_run_composes_with_diffexp(finished_runs):
    """The shared 2-epoch run (conftest.run_flags): CoCA with windows of 2 steps, DiffExp exploring in epoch 0."""
    run = finished_runs("ddpo_coca.py")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["dynamic_cfg"] for m in metrics] == [True, False]
    assert [m["prompt_weighting"] for m in metrics] == [True, False]
    assert all(0 <= m["clipfrac"] <= 1 and m["approx_kl"] >= 0 for m in metrics)
    assert [e["epoch"] for e in read_jsonl(run / "eval.jsonl")] == [0, 2]
    assert json.load(open(run / "args.json"))["similarity_window"] == 2


def test_released_step_normalisation_reads_the_oldest_buffered_epoch():
    """--step-normalisation released, as Lil-Shake/CoCA's PerPromptStatTracker.update_temporal_rewards runs: two
    buffer entries an epoch (the samples' means and stds over the steps); the whole matrix's statistics until a
    prompt has min_count entries, then the oldest epoch's mean and pooled std, not the current epoch's."""
    from collections import deque

    generator = torch.Generator().manual_seed(0)
    history, epochs = {}, []
    for epoch in range(9):  # prompt "a" in every epoch, "b" in the first only
        prompts = ["a", "a", "a"] + (["b"] if epoch == 0 else [])
        shaped = torch.randn(len(prompts), 5, generator=generator, dtype=torch.float64) * (epoch + 1) + epoch
        epochs.append(shaped)
        out = ddpo_coca.released_step_normalisation(prompts, shaped, history, 32, 16).numpy()
        values = shaped.numpy()
        if epoch < 7:  # fewer than 16 entries: one mean and std over the whole (N, T) matrix, both prompts
            np.testing.assert_allclose(out, (values - values.mean()) / (values.std() + 1e-6))
        else:  # 16+ entries: epoch 0's "a" rows (the oldest pair), population statistics of its 3 x 5 values
            oldest = epochs[0].numpy()[:3]
            np.testing.assert_allclose(out[:3], (values[:3] - oldest.mean()) / (oldest.std() + 1e-6), rtol=1e-9)
    assert isinstance(history["a"], deque) and len(history["a"]) == 18 and len(history["b"]) == 2
    args = ddpo_coca.parse_args(["--preset", "coca-aesthetic"])
    assert args.step_normalisation == "released" and ddpo_coca.parse_args([]).step_normalisation == "batch"
    with pytest.raises(SystemExit, match="must be even"):
        ddpo_coca.check_args(ddpo_coca.parse_args(["--step-normalisation", "released", "--stat-buffer-size", "31"]), 1)
