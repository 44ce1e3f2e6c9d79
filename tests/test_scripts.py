"""What every method script promises, tested on each of the four through one parametrisation.

Each script's shared 2-epoch run (conftest.finished_runs) must write finite metrics, grids and checkpoints whose
LoRA loads into a diffusers pipeline; a run killed after its first checkpoint and resumed must end with the
same LoRA as the uninterrupted one; a bad flag must stop the script with one error line before any model loads;
and two processes must hold identical LoRA after their all-reduced updates. Method-specific checks of the same
runs live in each script's own test file.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from common import load_prompts
from conftest import (
    MICRO_FLAGS,
    ROOT,
    SCRIPT_SERVER,
    SCRIPTS,
    kill_after_first_checkpoint,
    lora_tensors,
    read_jsonl,
    run_script,
    script_environment,
)

EPOCHS = 2  # of every shared run (conftest.run_flags)


@pytest.mark.parametrize("script", SCRIPTS)
def test_run_writes_finite_metrics_grids_and_checkpoints(script, finished_runs):
    run = finished_runs(script)
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(EPOCHS))
    assert [m["reward_queries"] for m in metrics] == [8 * (epoch + 1) for epoch in range(EPOCHS)]
    for m in metrics:
        for key in ("reward_mean", "reward_std", "loss", "grad_norm", "seconds"):
            assert np.isfinite(m[key]), (key, m)
    evaluations = read_jsonl(run / "eval.jsonl")
    assert evaluations[0]["epoch"] == 0 and evaluations[-1]["epoch"] == EPOCHS  # before training and after it
    assert all(np.isfinite(e["seen_reward_mean"]) for e in evaluations)
    assert [e["reward_queries"] for e in evaluations] == [8 * e["epoch"] for e in evaluations]
    # the image count behind each mean, for the summary's standard error std / sqrt(n)
    run_args = json.load(open(run / "args.json"))
    expected_images = len(load_prompts(run_args["prompts"])) * run_args["eval_images_per_prompt"]
    assert all(e["seen_images"] == expected_images for e in evaluations), (expected_images, evaluations)
    assert (run / "samples" / f"eval_seen_epoch_{EPOCHS:04d}.png").exists()
    assert run_args["epochs"] == EPOCHS
    assert sorted(os.listdir(run / "checkpoints")) == [f"epoch_{epoch:04d}" for epoch in range(1, EPOCHS + 1)]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_log_file_gets_plain_lines_not_progress_bars(script, finished_runs):
    """Written to files (nohup, a batch system's log), a run draws no progress bar, whose every redraw would stay
    in the file: stdout is one line per epoch, the evaluation lines and the closing line. (Read as text, a bar's
    carriage returns have become line ends; its rate, "it/s" or "s/it", and its "%|" remain.)"""
    folder = finished_runs(script).parent
    stdout, stderr = (folder / "stdout.txt").read_text(), (folder / "stderr.txt").read_text()
    for fragment in ("\r", "it/s", "s/it", "%|"):
        assert fragment not in stdout and fragment not in stderr, (fragment, stderr[-2000:])
    lines = stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == [f"epoch {e}" for e in range(EPOCHS)]
    assert all(line.startswith(("epoch ", "eval epoch ", "done in ")) for line in lines), lines


@pytest.mark.parametrize("script", SCRIPTS)
def test_lora_loads_into_a_fresh_pipeline_and_changes_its_output(script, finished_runs, tiny_pipeline):
    def generate():
        return tiny_pipeline(
            ["red apple"], num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="pt",
            generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip

    before = generate()
    tiny_pipeline.load_lora_weights(str(finished_runs(script) / "checkpoints" / f"epoch_{EPOCHS:04d}"))
    try:
        assert (generate() - before).abs().max() > 1e-4
    finally:  # the pipeline is shared by the session's tests: give it back without the LoRA
        tiny_pipeline.unload_lora_weights()
    assert torch.equal(generate(), before)


# ddpo_coca.py's resumable state is DDPO's (per-prompt reward statistics through the text-identical
# per_prompt_advantages; its step weights are recomputed every epoch), so its 11 s resume is opt-in (-m slow)
RESUMED = [*SCRIPTS[:3], pytest.param(SCRIPTS[3], marks=pytest.mark.slow)]


@pytest.mark.parametrize("script", RESUMED)
def test_resume_after_interruption_matches_an_uninterrupted_run(script, finished_runs, run_flags, tmp_path):
    flags = [*run_flags[script], "--run-name", "full"]
    left = kill_after_first_checkpoint(script, flags, tmp_path)
    assert left == ["epoch_0001"], left  # really interrupted mid-run
    run_script(script, [*flags, "--resume"], tmp_path)
    last = f"epoch_{EPOCHS:04d}"
    resumed = lora_tensors(tmp_path / "full" / "checkpoints" / last)
    uninterrupted = lora_tensors(finished_runs(script) / "checkpoints" / last)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.allclose(resumed[key], uninterrupted[key], atol=1e-6, rtol=0), key
    resumed_metrics = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    full_metrics = read_jsonl(finished_runs(script) / "metrics.jsonl")
    assert [m["epoch"] for m in resumed_metrics] == list(range(EPOCHS))  # every epoch logged once
    for key in ("reward_mean", "loss"):  # the method's state (reward statistics) came back with the checkpoint
        assert np.allclose([m[key] for m in resumed_metrics], [m[key] for m in full_metrics], atol=1e-6), key
    resumed_evaluations = read_jsonl(tmp_path / "full" / "eval.jsonl")
    assert [e["epoch"] for e in resumed_evaluations] == [
        e["epoch"] for e in read_jsonl(finished_runs(script) / "eval.jsonl")
    ]


def test_a_run_forked_from_the_script_server_is_the_run_of_a_fresh_interpreter(finished_runs, run_flags, tmp_path):
    """run_script forks its runs from tests/script_server.py, which imported the libraries once; a plain
    `python ddpo_diffexp.py` (a fresh interpreter, with the same thread count) must write the same bits."""
    script = "ddpo_diffexp.py"
    assert SCRIPT_SERVER.serves(script_environment())  # the suite's runs are forked (3-4 s faster each)
    command = [sys.executable, os.path.join(ROOT, script), "--output-dir", str(tmp_path), *run_flags[script]]
    command += ["--run-name", "full"]
    subprocess.run(command, cwd=ROOT, env=script_environment(), check=True, capture_output=True)
    last = f"checkpoints/epoch_{EPOCHS:04d}"
    fresh, forked = lora_tensors(tmp_path / "full" / last), lora_tensors(finished_runs(script) / last)
    assert fresh.keys() == forked.keys() and all(torch.equal(fresh[key], forked[key]) for key in fresh)
    for name in ("metrics.jsonl", "eval.jsonl"):
        fresh_lines, forked_lines = read_jsonl(tmp_path / "full" / name), read_jsonl(finished_runs(script) / name)
        for line in (*fresh_lines, *forked_lines):
            line.pop("seconds", None)
        assert fresh_lines == forked_lines, name


@pytest.mark.parametrize("script", SCRIPTS)
def test_existing_run_needs_resume(script, finished_runs, run_flags):
    run = finished_runs(script)
    result = run_script(script, [*run_flags[script], "--run-name", "full"], run.parent, check=False)
    assert result.returncode == 2 and "pass --resume" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_is_one_line_before_any_model_loads(script, tmp_path):
    result = run_script(script, ["--model", "no-such/model", "--reward", "beauty"], tmp_path, check=False)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr  # exit code 2: bad input, as tyro's
    assert lines[0].startswith("error: unknown reward 'beauty'; choose one of aesthetic"), lines
    assert not os.listdir(tmp_path)  # not even the run folder


# the scripts whose updates accumulate over several micro-batches with accelerate's no_sync; B2-DiffuRL's padding
# and CoCA's per-step advantages change nothing in the all-reduce, and each 2-process run costs 8 s
@pytest.mark.parametrize("script", ["ddpo_diffexp.py", "alignprop_diffexp.py"])
def test_two_processes_keep_identical_lora(script, tmp_path):
    # accelerate's --cpu launcher starts one process; --multi_gpu starts 2 (torchrun), which run on CPU via gloo
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    # per process and update: 2 micro-batches of 2, the first backward without all-reduce (no_sync), then with it
    flags = [*MICRO_FLAGS, "--diffexp", "--epochs", "2", "--train-batch-size", "2", "--samples-per-update", "8"]
    if script == "alignprop_diffexp.py":
        flags += ["--truncation", "gaussian"]  # K drawn per trajectory: the processes' graphs differ in length
    run_script(script, [*flags, "--run-name", "ddp"], tmp_path, launcher=launcher)
    metrics = read_jsonl(tmp_path / "ddp" / "metrics.jsonl")
    for m in metrics:
        rank0, rank1 = m["lora_sum_per_process"]
        assert rank0 == rank1, m  # bit-identical replicas after the all-reduced updates
    assert metrics[0]["lora_sum_per_process"] != metrics[1]["lora_sum_per_process"]  # and they did train
    assert metrics[-1]["reward_queries"] == 16  # 8 samples per epoch over 2 processes, not per process


@pytest.mark.parametrize("script", ["ddpo_diffexp.py", "ddpo_coca.py"])
def test_the_released_coca_schedule_steps_once_per_m_backward_passes(script, run_flags, tmp_path, monkeypatch):
    """--backward-passes-per-update M: an optimiser step every M (micro-batch, timestep) backward passes, as the
    released CoCA / DDPO runs named "_100" (M = 32 with batches of 1: 100 steps per epoch); 0 keeps DDPO's."""
    import importlib

    module = importlib.import_module(script[:-3])
    steps = []
    optimizer_step = module.optimizer_step
    monkeypatch.setattr(module, "optimizer_step", lambda *a, **k: steps.append(1) or optimizer_step(*a, **k))

    def optimiser_steps(flags, name):
        steps.clear()
        args = module.parse_args([*run_flags[script], "--epochs", "1", *flags, "--output-dir", str(tmp_path)])
        module.main(replace(args, run_name=name, eval_every=100))
        return len(steps), lora_tensors(tmp_path / name / "checkpoints" / "epoch_0001")

    # 8 samples, batches of 1, T = 4 trained steps: 32 backward passes, an optimiser step every 4 of them
    released, _ = optimiser_steps(["--train-batch-size", "1", "--backward-passes-per-update", "4"], "m4")
    default, lora = optimiser_steps([], "default")  # 8 samples, 4 per update: 2 steps
    same, same_lora = optimiser_steps(["--backward-passes-per-update", "4"], "m-default")  # 4 = 1 batch x 4 steps
    assert (released, default, same) == (8, 2, 2)
    assert all(torch.equal(lora[key], same_lora[key]) for key in lora)  # M = the default's count: the same run
    with pytest.raises(SystemExit, match="--backward-passes-per-update 5 does not divide the epoch's 32 backward"):
        module.check_args(
            module.parse_args([*run_flags[script], "--train-batch-size", "1", "--backward-passes-per-update", "5"]), 1
        )


@pytest.mark.parametrize("script", SCRIPTS)
def test_reward_models_stay_fp32_under_half_precision_weights(script, run_flags, tmp_path, monkeypatch):
    """Frozen weights in bf16 (as --mixed-precision bf16 on a GPU): the rewards load in fp32 unless
    --half-precision-rewards asks for the weights' precision."""
    import importlib

    module = importlib.import_module(script[:-3])

    class HalfPrecisionAccelerator(module.Accelerator):
        @property
        def mixed_precision(self):
            return "bf16"

    loaded = {}

    def record_pipeline(model, device, dtype):
        loaded["pipeline"] = dtype

    def record_reward_and_stop(name, device, dtype, tiny=False, shapes=False):
        loaded["reward"] = dtype
        raise SystemExit("stop: both precisions are known")

    monkeypatch.setattr(module, "Accelerator", HalfPrecisionAccelerator)
    monkeypatch.setattr(module, "load_pipeline", record_pipeline)
    monkeypatch.setattr(module, "load_reward", record_reward_and_stop)
    for flags, reward_dtype in (([], torch.float32), (["--half-precision-rewards"], torch.bfloat16)):
        args = module.parse_args([*run_flags[script], *flags, "--output-dir", str(tmp_path)])
        with pytest.raises(SystemExit, match="^stop"):
            module.main(args)
        assert loaded == {"pipeline": torch.bfloat16, "reward": reward_dtype}, flags


@pytest.mark.parametrize("script", ["alignprop_diffexp.py", "ddpo_diffexp.py"])
def test_an_ensemble_trains_and_logs_each_member(script, sdxl_ensemble_runs):
    """AlignProp backpropagates through all members; DDPO's family also takes non-differentiable ones. The DDPO
    family scores with one text-identical helper (tests/test_copies.py), so ddpo_diffexp.py stands for all three.
    The runs are conftest.ENSEMBLE_RUNS, on the tiny SDXL."""
    import worlds
    from conftest import ENSEMBLE_RUNS

    run = sdxl_ensemble_runs(script)
    members = worlds.reward_members(ENSEMBLE_RUNS[script][0])
    metrics, evaluations = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "eval.jsonl")
    lines = [(m, "reward") for m in metrics] + [(e, p) for e in evaluations for p in ("seen_reward", "unseen_reward")]
    for line, prefix in lines:
        # the ensemble is linear in its members, so its mean is the weighted sum of their normalised means
        expected = sum(
            weight * (line[f"{prefix}_{name}_mean"] - worlds.REWARD_SCALES[name][0]) / worlds.REWARD_SCALES[name][1]
            for weight, name in members
        )
        assert line[f"{prefix}_mean"] == pytest.approx(expected, rel=1e-4, abs=1e-3), (prefix, line)
    assert evaluations[-1]["seen_reward_mean"] != evaluations[0]["seen_reward_mean"]  # the update changed the model


def test_report_to_tensorboard_writes_the_jsonl_numbers_and_the_grids(sdxl_ensemble_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sdxl_ensemble_runs("alignprop_diffexp.py")  # --report-to tensorboard (conftest.ENSEMBLE_RUNS)
    (event_file,) = [name for name in os.listdir(run) if name.startswith("events.out.tfevents")]
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    for tag in (
        "train/reward_mean",
        "train/loss",
        "train/grad_norm",
        "train/reward_hpsv2_mean",
        "eval/seen_reward_mean",
    ):
        assert tag in tags["scalars"], (tag, tags["scalars"])
    assert {"eval/seen_grid", "eval/unseen_grid"} <= set(tags["images"])
    metrics = read_jsonl(run / "metrics.jsonl")
    logged = events.Scalars("train/reward_mean")
    assert [event.step for event in logged] == [m["epoch"] for m in metrics]
    assert [event.value for event in logged] == pytest.approx([m["reward_mean"] for m in metrics], rel=1e-6)
    assert [event.step for event in events.Scalars("eval/seen_reward_mean")] == [0, 3]


def test_grid_captions_wrap_to_show_every_word(tmp_path):
    """A caption takes as many lines as its prompt needs, in the cell's 124 px (save_image_grid and caption_lines
    are text-identical in the four scripts: tests/test_copies.py)."""
    from PIL import ImageDraw

    import ddpo_diffexp

    image = torch.rand(3, 32, 32)
    prompt = "a photo of a red apple on the left of a blue ceramic teapot under a wooden kitchen table"
    short = ddpo_diffexp.save_image_grid(tmp_path / "short.png", [("red apple", 1.0, image)] * 2)
    tall = ddpo_diffexp.save_image_grid(tmp_path / "tall.png", [("red apple", 1.0, image), (prompt, 1.0, image)])
    assert tall.width == short.width and tall.height > short.height
    draw = ImageDraw.Draw(tall)
    lines = ddpo_diffexp.caption_lines(draw, prompt, 124)
    assert " ".join(lines).split() == prompt.split() and len(lines) >= 3  # every word, in order
    assert all(draw.textlength(line) <= 124 for line in lines)
    assert tall.height == 128 + 11 * (len(lines) + 1) + 2  # the prompt's lines and the reward's
    last_line = np.asarray(tall)[128 + 1 + 11 * (len(lines) - 1) : 128 + 1 + 11 * len(lines), 128:256]
    assert (last_line < 128).any()  # the last words are drawn in the second cell
    assert "".join(ddpo_diffexp.caption_lines(draw, "x" * 60, 124)) == "x" * 60  # a long word is broken, not cut
