"""b2_diffurl.py: BPT schedule, branch sampling, normalisation and selection, prompt files, the script end to end."""

import json
import os

import numpy as np
import pytest
import torch

import b2_diffurl
import ddpo_diffexp
from conftest import ROOT, lora_tensors, read_jsonl, run_script, with_values


# ---------------------------------------------------------------------------------------------- BPT schedule
def test_split_schedule_is_the_released_one_for_20_steps_and_100_stages():
    first = b2_diffurl.first_interval_steps(20, 0.7)
    assert first == 14
    schedule = [b2_diffurl.split_step(s, 100, 20, first) for s in range(100)]
    assert schedule[0] == 14 and schedule[50] == 17 and schedule[99] == 20  # first, middle, last stage
    assert schedule == [14 + s * 7 // 100 for s in range(100)]  # the released run_process.sh formula


@pytest.mark.parametrize("num_steps, num_stages", [(8, 6), (4, 2), (50, 3), (20, 1), (20, 7), (6, 40)])
def test_split_schedule_grows_from_the_first_interval_to_all_steps(num_steps, num_stages):
    first = b2_diffurl.first_interval_steps(num_steps, 0.7)
    schedule = [b2_diffurl.split_step(s, num_stages, num_steps, first) for s in range(num_stages)]
    assert schedule[-1] == num_steps, schedule  # the last stage trains every step
    assert all(a <= b for a, b in zip(schedule, schedule[1:])), schedule
    assert num_stages == 1 or schedule[0] == first
    assert all(first <= tau <= num_steps for tau in schedule)


# ---------------------------------------------------------------------------------------------- branch sampling
def test_branches_share_their_prefix_exactly_and_differ_after_it(tiny_pipeline):
    scheduler = tiny_pipeline.scheduler
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    prefixes, branches, branch_step = 2, 3, 2
    prompt_embeds = b2_diffurl.encode_prompts(tiny_pipeline, ["a cat", "a red apple"], 32)
    null_embeds = b2_diffurl.encode_prompts(tiny_pipeline, [""], 32)
    latents = torch.randn(prefixes, 4, 16, 16, generator=generator)
    trajectory, log_probs, images = b2_diffurl.sample_trajectories(
        tiny_pipeline,
        tiny_pipeline.unet,
        prompt_embeds,
        null_embeds,
        torch.full((prefixes, 4), 5.0),
        latents,
        1.0,
        generator,
        branch_step=branch_step,
        num_branches=branches,
    )
    assert trajectory.shape == (6, 5, 4, 16, 16) and log_probs.shape == (6, 4) and images.shape == (6, 3, 32, 32)
    for group in range(prefixes):
        rows = slice(group * branches, (group + 1) * branches)
        first = trajectory[rows][0]
        for branch in trajectory[rows][1:]:
            assert torch.equal(branch[: branch_step + 1], first[: branch_step + 1])  # x_T .. x_tau: bit-identical
            for step in range(branch_step + 1, 5):
                assert (branch[step] - first[step]).abs().max() > 1e-3  # every later latent has its own noise
        assert torch.equal(log_probs[rows][:, :branch_step], log_probs[rows][:1, :branch_step].expand(branches, -1))
        assert len(set(log_probs[rows][:, branch_step].tolist())) == branches
    assert torch.equal(trajectory[0, 0], latents[0]) and torch.equal(trajectory[3, 0], latents[1])
    assert (trajectory[0, branch_step] - trajectory[3, branch_step]).abs().max() > 1e-3  # groups are independent


def test_one_branch_is_ddpo_sampling(tiny_pipeline):
    tiny_pipeline.scheduler.set_timesteps(4)
    prompt_embeds = b2_diffurl.encode_prompts(tiny_pipeline, ["a cat", "a dog"], 32)
    null_embeds = b2_diffurl.encode_prompts(tiny_pipeline, [""], 32)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    scales = torch.full((2, 4), 5.0)
    ours = b2_diffurl.sample_trajectories(
        tiny_pipeline,
        tiny_pipeline.unet,
        prompt_embeds,
        null_embeds,
        scales,
        latents,
        1.0,
        torch.Generator().manual_seed(2),
    )
    ddpo = ddpo_diffexp.sample_trajectories(
        tiny_pipeline,
        tiny_pipeline.unet,
        prompt_embeds,
        null_embeds,
        scales,
        latents,
        1.0,
        torch.Generator().manual_seed(2),
    )
    for a, b in zip(ours, ddpo):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------- normalisation, selection
def test_z_scores_pool_this_stage_with_the_last_history_stages():
    history = []
    for stage in range(10):  # prompt "a" scores stage, stage + 1; "b" scores 5, 5 + stage
        rewards = [stage, stage + 1.0, 5.0, 5.0 + stage]
        z = b2_diffurl.per_prompt_z_scores(["a", "a", "b", "b"], rewards, history, history_stages=8)
    assert len(history) == 8 and history[-1]["a"] == [9.0, 10.0]
    pooled = np.array([r for s in range(1, 10) for r in (s, s + 1.0)])  # stages 1..8 (history) and 9 (this one)
    mean, std = pooled.mean(), np.sqrt(((pooled - pooled.mean()) ** 2).sum() / (len(pooled) - 1))  # unbiased
    assert np.allclose(z[:2], (np.array([9.0, 10.0]) - mean) / (std + 1e-8))
    # a prompt seen once, without history, has z = 0; a constant prompt has z = 0
    assert b2_diffurl.per_prompt_z_scores(["c"], [3.0], [], history_stages=8)[0] == 0.0
    assert np.all(b2_diffurl.per_prompt_z_scores(["d", "d"], [2.0, 2.0], [], history_stages=8) == 0.0)
    # history_stages = 0: this stage only
    only_now = []
    b2_diffurl.per_prompt_z_scores(["a", "a"], [1.0, 3.0], only_now, history_stages=0)
    assert only_now == [] and np.allclose(
        b2_diffurl.per_prompt_z_scores(["a", "a"], [1.0, 3.0], only_now, 0), [-1 / np.sqrt(2), 1 / np.sqrt(2)]
    )


def test_selection_keeps_best_and_worst_branches_past_the_thresholds():
    z = np.array(
        [
            [1.2, 0.1, -0.7, 0.0, -0.2],  # both: best (row 0) and worst (row 2)
            [0.4, -0.3, 0.2, 0.1, 0.0],  # none clears a threshold
            [0.5, 0.0, -0.5, 0.1, 0.2],  # boundaries: z = 0.5 is kept (>=), z = -0.5 is not (<)
            [0.3, -1.0, 0.2, 0.0, 0.1],  # only the worst
            [0.0, 0.2, 2.0, 0.1, 0.3],  # only the best
            [0.1, 0.1, 0.1, 0.1, 0.1],  # all equal: none
        ]
    ).ravel()
    kept = b2_diffurl.select_branches(z, 5, 0.5, -0.5)
    assert kept.tolist() == [0, 2, 10, 16, 22]
    assert b2_diffurl.select_branches(np.zeros(10), 5, 0.5, -0.5).tolist() == []


def test_padding_counts_kept_rows_per_update():
    # processes keep 5 and 2 rows; batches of 2 -> 3 micro batches each; 2 micro batches per update: micro batches
    # 0 and 1 are the first update (rows 0-3: 4 + 2 kept), micro batch 2 the second (row 4: 1 kept)
    counts = [b2_diffurl.kept_rows_in_update([5, 2], micro_index, 2, 3, 2) for micro_index in range(3)]
    assert counts == [6, 6, 1]


def test_logged_statistics_leave_the_padding_rows_out():
    """Padding rows repeat row 0 with advantage 0: no gradient, but a mean over all rows would log row 0's
    approx_kl and clipfrac twice and the padding's zero loss too. The logs average over the kept rows only."""
    log_prob_old = torch.randn(3, generator=torch.Generator().manual_seed(0))
    log_prob = log_prob_old + torch.tensor([1e-3, 0.0, -2e-3])  # |ratio - 1| > 1e-4 for rows 0 and 2: clipfrac 2/3
    advantages = torch.tensor([1.0, -0.5, 2.0])
    padded = [torch.cat([x, x[:1]]) for x in (log_prob, log_prob_old)] + [torch.tensor([1.0, -0.5, 2.0, 0.0])]
    is_kept = torch.tensor([1.0, 1.0, 1.0, 0.0])
    *sums, count = b2_diffurl.kept_row_sums(*padded, is_kept, 1e-4, 5.0)
    kept_means = b2_diffurl.clipped_policy_loss(log_prob, log_prob_old, advantages, 1e-4, 5.0)
    assert count == 3 and [total / count for total in sums] == pytest.approx([float(m) for m in kept_means])
    assert [total / count for total in sums][2] == pytest.approx(2 / 3)
    padded_means = b2_diffurl.clipped_policy_loss(*padded, 1e-4, 5.0)  # what the log showed before
    assert float(padded_means[2]) == pytest.approx(3 / 4)
    assert b2_diffurl.kept_row_sums(*padded, torch.zeros(4), 1e-4, 5.0) == [0.0, 0.0, 0.0, 0]


def test_mean_pairwise_distance():
    assert b2_diffurl.mean_pairwise_distance(torch.ones(4, 8)) == pytest.approx(0.0, abs=1e-6)
    assert b2_diffurl.mean_pairwise_distance(torch.eye(3)) == pytest.approx(1.0)
    pair = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])  # opposite directions, any lengths: 1 - cos = 2
    assert b2_diffurl.mean_pairwise_distance(pair) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- prompts, flags
def test_prompt_files_follow_the_paper_templates():
    folder = os.path.join(ROOT, "prompts")

    def load(name):
        return b2_diffurl.load_prompts(os.path.join(folder, name))

    color_train, color_test = load("color_fruit_train.txt"), load("color_fruit_test.txt")
    spatial_train, spatial_test = load("spatial_train.txt"), load("spatial_test.txt")
    assert len(color_train) == len(set(color_train)) == 40 and len(spatial_train) == len(set(spatial_train)) == 40
    assert not set(color_train) & set(color_test) and not set(spatial_train) & set(spatial_test)
    assert 10 <= len(color_test) <= 20 and 10 <= len(spatial_test) <= 20
    colours = {}
    for prompt in color_train:  # "[color] [fruit/vegetable]", each item in at least 3 colours
        colour, item = prompt.split(" ", 1)
        colours.setdefault(item, set()).add(colour)
    assert all(len(c) >= 3 for c in colours.values()), colours
    predicates = (" on the left of ", " on the right of ", " under ", " on ")
    for prompt in spatial_train + spatial_test:  # "[object] [predicate] [object]"
        assert sum(p in prompt for p in predicates[:3]) + (" on " in prompt and " of " not in prompt) == 1, prompt
    assert all(sum(p in prompt for prompt in spatial_train) >= 10 for p in predicates)


def test_paper_defaults_and_tiny_preset():
    paper = b2_diffurl.parse_args([])
    assert paper.num_steps == 20 and paper.prompts == "b2_template1"  # the released template-1 lists
    assert b2_diffurl.parse_args(["--tiny", "--epochs", "3"]).epochs == 3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-branches", "1"], "--num-branches 1 must be >= 2"),
        (["--sample-batch-size", "7"], "--sample-batch-size 7 is not a multiple of --num-branches 5"),
        (["--first-interval-fraction", "0"], "--first-interval-fraction 0.0 must be in (0, 1]"),
        (["--negative-threshold", "0.6"], "--negative-threshold 0.6 must not exceed --positive-threshold 0.5"),
        (["--history-stages", "-1"], "--history-stages -1 must be >= 0"),
    ],
)
def test_bad_method_flags_are_rejected(flags, message):
    with pytest.raises(SystemExit) as error:
        b2_diffurl.check_args(b2_diffurl.parse_args(flags), 1)
    assert str(error.value).startswith("error: " + message), error.value


# ---------------------------------------------------------------------------------------------- end to end
def test_shared_run_trains_only_the_interval_steps(finished_runs):
    """The shared 2-stage run (conftest.run_flags), T = 4: stage 0 trains the last 3 steps, stage 1 all 4."""
    run = finished_runs("b2_diffurl.py")
    metrics = read_jsonl(run / "metrics.jsonl")
    first = b2_diffurl.first_interval_steps(4, 0.7)
    for stage, m in enumerate(metrics):
        tau = b2_diffurl.split_step(stage, 2, 4, first)
        assert m["interval_steps"] == tau and m["branch_step"] == 4 - tau
        assert 0 <= m["kept_samples"] <= 4  # 2 groups of 4 branches: at most 2 each
        # the step indices the update actually fed to the UNet: exactly the interval T - tau .. T - 1
        assert m["trained_step_indices"] == (list(range(4 - tau, 4)) if m["kept_samples"] else [])
        assert 0 <= m["clipfrac"] <= 1 and m["approx_kl"] >= 0
    assert [m["interval_steps"] for m in metrics] == [3, 4]
    assert sum(m["kept_samples"] for m in metrics) > 0
    evaluations = read_jsonl(run / "eval.jsonl")
    assert [e["epoch"] for e in evaluations] == [0, 2]
    for e in evaluations:
        assert "unseen_reward_mean" not in e  # two.txt has no test twin
        assert 0 < e["seen_diversity"] <= 2  # 1 - cos over distinct images
    assert json.load(open(run / "args.json"))["num_branches"] == 4


def test_both_ablations_train_every_sample_on_every_step(run_flags, tmp_path):
    flags = with_values(run_flags["b2_diffurl.py"], epochs="1", train_batch_size="8", samples_per_update="8")
    run_script(
        "b2_diffurl.py", [*flags, "--no-bpt", "--no-branch", "--inner-epochs", "1", "--run-name", "ddpo"], tmp_path
    )
    (m,) = read_jsonl(tmp_path / "ddpo" / "metrics.jsonl")
    assert m["kept_samples"] == 8 and m["branch_step"] is None  # DDPO: no branching, no selection
    assert m["interval_steps"] == 4 and m["trained_step_indices"] == [0, 1, 2, 3]
    assert np.isfinite(m["loss"]) and m["loss"] != 0.0


def test_a_stage_that_keeps_no_sample_makes_no_update(run_flags, tmp_path):
    """With a sparse reward every branch of every group can score the same (z = 0 for all): Eq. 5 keeps nothing and
    the stage must pass without an update (it stopped with a traceback on shapes_binary, seed 5)."""
    flags = with_values(run_flags["b2_diffurl.py"], epochs="1")
    flags += ["--positive-threshold", "1e9", "--negative-threshold", "-1e9", "--run-name", "none"]  # keep nothing
    run_script("b2_diffurl.py", flags, tmp_path)
    (m,) = read_jsonl(tmp_path / "none" / "metrics.jsonl")
    assert m["kept_samples"] == 0 and m["loss"] == 0.0 and m["trained_step_indices"] == []
    lora = lora_tensors(tmp_path / "none" / "checkpoints" / "epoch_0001")
    assert all(not tensor.any() for name, tensor in lora.items() if "lora_B" in name)  # B = 0: the pretrained UNet


def test_the_paper_presets_step_as_the_release_does():
    """hu-zijing/B2-DiffuRL run_train.py: one accelerate counter across both inner epochs, a step per 64
    micro-batches of 2 (128 trajectories), the last partial window never stepped: 6 steps a stage for 416 kept
    trajectories, where stepping each inner epoch's remainder made 8."""
    import b2_diffurl

    args = b2_diffurl.parse_args(["--preset", "b2-template1"])
    assert args.update_schedule == "released" and args.inner_epochs == 2
    window = args.samples_per_update // args.train_batch_size  # 64 micro-batches
    micro_batches = 416 // args.train_batch_size  # 208 an inner epoch
    released = b2_diffurl.update_ends(micro_batches, 2, window, "released")
    assert len(released) == 6 and (1, 47) in released  # the 4th step straddles the inner epochs: 208 + 48 = 256
    assert max(released) == (1, 175)  # 384 of 416 micro-batches stepped, the last 32 dropped
    assert len(b2_diffurl.update_ends(micro_batches, 2, window, "per_inner_epoch")) == 8
    assert all(len(b2_diffurl.update_ends(n // 2, 2, window, "released")) == 6 for n in range(384, 448, 2))
    assert b2_diffurl.parse_args(["--tiny"]).update_schedule == "per_inner_epoch"
