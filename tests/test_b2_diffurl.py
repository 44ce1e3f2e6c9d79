"""b2_diffurl.py: BPT schedule, branch sampling, normalisation and selection, prompt files, and the script end to end."""

import inspect
import json
import os

import numpy as np
import pytest
import torch

import b2_diffurl
import ddpo_diffexp
from conftest import MICRO_FLAGS, ROOT, kill_after_first_checkpoint, lora_tensors, read_jsonl, run_script


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One OpenMP thread for this module's runs and tensors: on 2 cores shared with other jobs, 2 threads spin-wait
    for each other (a 2-stage tiny run, load average 8: 135 s with 2 threads, 28 s with 1); the tiny model gains nothing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # read by run_script and passed on by the resume test's Popen
        yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- copies
@pytest.mark.parametrize(
    "name",
    [
        "ddim_step_with_logprob",
        "clipped_policy_loss",
        "epoch_seed",
        "save_image_grid",
        "save_checkpoint",
        "last_checkpoint",
        "keep_lines_before",
        "stop_on_non_finite",
    ],
)
def test_shared_helpers_are_verbatim_copies_of_the_template(name):
    assert inspect.getsource(getattr(b2_diffurl, name)) == inspect.getsource(getattr(ddpo_diffexp, name))


def test_shared_arguments_keep_the_template_order():
    template_fields = list(ddpo_diffexp.Args.__dataclass_fields__)
    shared = template_fields[: template_fields.index("resume") + 1]
    assert list(b2_diffurl.Args.__dataclass_fields__)[: len(shared)] == shared


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
    prompt_embeds = b2_diffurl.encode_prompts(
        tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, ["a cat", "a red apple"]
    )
    null_embeds = b2_diffurl.encode_prompts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, [""])
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
    prompt_embeds = b2_diffurl.encode_prompts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, ["a cat", "a dog"])
    null_embeds = b2_diffurl.encode_prompts(tiny_pipeline.tokenizer, tiny_pipeline.text_encoder, [""])
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


# ---------------------------------------------------------------------------------------------- normalisation, selection
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
    # processes keep 5 and 2 rows; batches of 2 -> 3 micro batches each; 2 micro batches per update
    counts = [b2_diffurl.kept_rows_in_update([5, 2], u, 2, 3, 2) for u in range(2)]
    assert counts == [6, 1] and sum(counts) == 7


def test_mean_pairwise_distance():
    assert b2_diffurl.mean_pairwise_distance(torch.ones(4, 8)) == pytest.approx(0.0, abs=1e-6)
    assert b2_diffurl.mean_pairwise_distance(torch.eye(3)) == pytest.approx(1.0)
    pair = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])  # opposite directions, any lengths: 1 - cos = 2
    assert b2_diffurl.mean_pairwise_distance(pair) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------- prompts, flags
def test_prompt_files_follow_the_paper_templates():
    folder = os.path.join(ROOT, "prompts")
    load = lambda name: b2_diffurl.load_prompts(os.path.join(folder, name))
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
    assert b2_diffurl.parse_args([]).num_steps == 20 and b2_diffurl.parse_args(["--tiny", "--epochs", "3"]).epochs == 3


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


def test_bad_input_is_one_line_before_any_model_loads(tmp_path):
    result = run_script("b2_diffurl.py", ["--model", "no-such/model", "--num-branches", "1"], tmp_path, check=False)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode != 0 and lines == [lines[-1]] and lines[-1].startswith("error: --num-branches 1"), (
        result.stderr
    )


# ---------------------------------------------------------------------------------------------- end to end
def run_flags(prompt_file, *extra, **values):
    """MICRO_FLAGS with 2 prompts, one sampling batch of 2 groups x 4 branches, 2 eval images per prompt (for the
    diversity), evaluation first and last only, no unseen set: the fewest UNet calls (CPU time is the test's cost)."""
    flags = list(MICRO_FLAGS)
    del flags[flags.index("--eval-unseen-prompts") : flags.index("--eval-unseen-prompts") + 2]
    values = {
        "prompts": prompt_file,
        "sample_batch_size": "8",
        "eval_images_per_prompt": "2",
        "eval_every": "100",
        **values,
    }
    for name, value in values.items():
        flags[flags.index("--" + name.replace("_", "-")) + 1] = value
    return [*flags, "--num-branches", "4", *extra]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "two.txt"
    path.write_text("red apple\na cat on a sofa\n")
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, prompt_file):
    """One uninterrupted 2-stage run (T = 4: intervals 3 then 4 steps), shared by the end-to-end tests."""
    output = tmp_path_factory.mktemp("runs")
    run_script("b2_diffurl.py", [*run_flags(prompt_file), "--epochs", "2", "--run-name", "full"], output)
    return output / "full"


def test_run_trains_only_the_interval_steps_and_logs_finite_metrics(finished_run):
    metrics = read_jsonl(finished_run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0, 1] and [m["reward_queries"] for m in metrics] == [8, 16]
    for m in metrics:
        for key in ("reward_mean", "reward_std", "loss", "approx_kl", "clipfrac", "seconds"):
            assert np.isfinite(m[key]), (key, m)
    first = b2_diffurl.first_interval_steps(4, 0.7)
    for stage, m in enumerate(metrics):
        tau = b2_diffurl.split_step(stage, 2, 4, first)
        assert m["interval_steps"] == tau and m["branch_step"] == 4 - tau
        assert 0 <= m["kept_samples"] <= 4  # 2 groups of 4 branches: at most 2 each
        # the step indices the update actually fed to the UNet: exactly the interval T - tau .. T - 1
        assert m["trained_step_indices"] == (list(range(4 - tau, 4)) if m["kept_samples"] else [])
    assert [m["interval_steps"] for m in metrics] == [3, 4]
    assert sum(m["kept_samples"] for m in metrics) > 0
    evaluations = read_jsonl(finished_run / "eval.jsonl")
    assert [e["epoch"] for e in evaluations] == [0, 2]
    for e in evaluations:
        assert np.isfinite(e["seen_reward_mean"]) and "unseen_reward_mean" not in e  # two.txt has no twin
        assert 0 <= e["seen_diversity"] <= 2 and e["seen_diversity"] > 0  # 1 - cos over distinct images
    assert (finished_run / "samples" / "eval_seen_epoch_0002.png").exists()
    assert json.load(open(finished_run / "args.json"))["num_branches"] == 4
    assert sorted(os.listdir(finished_run / "checkpoints")) == ["epoch_0001", "epoch_0002"]


def test_lora_loads_into_a_fresh_pipeline_and_changes_its_output(finished_run, tiny_pipeline):
    def generate():
        return tiny_pipeline(
            ["red apple"],
            num_inference_steps=4,
            guidance_scale=5.0,
            height=32,
            width=32,
            output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images

    before = generate()
    tiny_pipeline.load_lora_weights(str(finished_run / "checkpoints" / "epoch_0002"))
    try:
        assert (generate() - before).abs().max() > 1e-4
    finally:  # the pipeline is shared by the session's tests: give it back without the LoRA
        tiny_pipeline.unload_lora_weights()
    assert torch.equal(generate(), before)


def test_resume_after_interruption_matches_an_uninterrupted_run(finished_run, prompt_file, tmp_path):
    flags = [*run_flags(prompt_file), "--epochs", "2", "--run-name", "full"]
    left = kill_after_first_checkpoint("b2_diffurl.py", flags, tmp_path)
    checkpoints = tmp_path / "full" / "checkpoints"
    assert "epoch_0002" not in left and "epoch_0001" in left, left  # really interrupted mid-run
    run_script("b2_diffurl.py", [*flags, "--resume"], tmp_path)
    resumed, uninterrupted = (
        lora_tensors(checkpoints / "epoch_0002"),
        lora_tensors(finished_run / "checkpoints" / "epoch_0002"),
    )
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6, rtol=0), key
    resumed_metrics, full_metrics = (
        read_jsonl(tmp_path / "full" / "metrics.jsonl"),
        read_jsonl(finished_run / "metrics.jsonl"),
    )
    assert [m["epoch"] for m in resumed_metrics] == [0, 1]  # every stage logged once
    for key in ("reward_mean", "kept_samples", "loss"):  # the reward history came back with the checkpoint
        assert np.allclose([m[key] for m in resumed_metrics], [m[key] for m in full_metrics], atol=1e-6), key
    assert [e["epoch"] for e in read_jsonl(tmp_path / "full" / "eval.jsonl")] == [0, 2]


def test_existing_run_needs_resume(finished_run, prompt_file):
    result = run_script(
        "b2_diffurl.py", [*run_flags(prompt_file), "--run-name", "full"], finished_run.parent, check=False
    )
    assert result.returncode != 0 and "pass --resume" in result.stderr.strip().splitlines()[-1]


def test_both_ablations_train_every_sample_on_every_step(prompt_file, tmp_path):
    flags = run_flags(
        prompt_file,
        "--no-bpt",
        "--no-branch",
        "--epochs",
        "1",
        "--inner-epochs",
        "1",
        train_batch_size="8",
        samples_per_update="8",
    )
    run_script("b2_diffurl.py", [*flags, "--run-name", "ddpo"], tmp_path)
    (m,) = read_jsonl(tmp_path / "ddpo" / "metrics.jsonl")
    assert m["kept_samples"] == 8 and m["branch_step"] is None  # DDPO: no branching, no selection
    assert m["interval_steps"] == 4 and m["trained_step_indices"] == [0, 1, 2, 3]
    assert np.isfinite(m["loss"]) and m["loss"] != 0.0
