"""Failures a long GPU run meets, on each of the four scripts: bad flags, failed starts, NaN, resume, disk full.

Each test states the behaviour a user expects. Most run a script's own functions in-process (the code that
guards a run is a verbatim copy in every script, tests/test_copies.py); the few that need the whole script start
it as a user would, and stop before the models load where the behaviour allows it.
"""

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import MICRO_FLAGS, ROOT, SCRIPTS, read_jsonl, run_script, with_values

MODULES = {script: importlib.import_module(script[:-3]) for script in SCRIPTS}


def problems(script, flags, num_processes=1):
    """The error line check_args gives for `flags` (on top of --tiny), or None."""
    module = MODULES[script]
    try:
        module.check_args(module.parse_args(["--tiny", *flags]), num_processes)
    except SystemExit as stop:
        return str(stop.code)
    return None


class MainProcess:
    """The things the guards ask of accelerate's Accelerator, for calling them without one (no fp16 loss scaler)."""

    is_main_process = True
    scaler = None
    print = staticmethod(print)
    clip_grad_norm_ = staticmethod(torch.nn.utils.clip_grad_norm_)
    unwrap_model = staticmethod(lambda model: model)
    wait_for_everyone = staticmethod(lambda: None)


# ---------------------------------------------------------------------------------------------- flags
BAD_FLAGS = [
    (["--samples-per-epoch", "0"], "error: --samples-per-epoch 0 must be >= 1"),
    (["--sample-batch-size", "0"], "error: --sample-batch-size 0 must be >= 1"),
    (["--train-batch-size", "0"], "error: --train-batch-size 0 must be >= 1"),
    (["--samples-per-update", "0"], "error: --samples-per-update 0 must be >= 1"),
    (["--learning-rate", "-0.001"], "error: --learning-rate -0.001 must be > 0"),
    (["--learning-rate", "inf"], "error: --learning-rate inf must be finite"),
    (["--cfg-high", "nan"], "error: --cfg-high nan must be finite"),
    (["--adam-betas", "0.9", "nan"], "error: --adam-betas 0.9 nan must be finite"),
    (["--weight-decay", "-1"], "error: --weight-decay -1.0 must be >= 0"),
    (["--adam-betas", "0.9", "1.0"], "error: --adam-betas 0.9 1.0 must both be in [0, 1)"),
    (["--max-grad-norm", "-1"], "error: --max-grad-norm -1.0 must be > 0"),
    (["--max-grad-norm", "nan"], "error: --max-grad-norm nan must be finite"),
    (["--report-to", "mlflow"], "error: --report-to mlflow must be none, tensorboard or wandb"),
    (["--seed", "-3"], "error: --seed -3 must be >= 0"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(flags) for flags, _ in BAD_FLAGS])
def test_every_bad_flag_is_one_error_line_naming_it(script, flags, message):
    error = problems(script, flags)
    assert error is not None and error.startswith(message) and "\n" not in error, error


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s != "alignprop_diffexp.py"])
def test_the_clip_range_must_be_positive(script):
    assert problems(script, ["--clip-range", "0"]).startswith("error: --clip-range 0.0 must be > 0")


@pytest.mark.parametrize("script", SCRIPTS)
def test_batch_sizes_that_do_not_divide_over_the_processes_spell_out_the_arithmetic(script):
    error = problems(script, ["--samples-per-update", "20"], num_processes=2)
    assert "--samples-per-update 20 is not a multiple of --train-batch-size" in error, error
    assert "x 2 processes = " in error and "(20 = " in error, error


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("preset", ["--tiny", "--shapes"])
def test_presets_divide_over_one_and_two_processes(script, preset):
    """The README's `accelerate launch --multi_gpu --num_processes 2 <script> --tiny` must start."""
    module = MODULES[script]
    for num_processes in (1, 2):
        module.check_args(module.parse_args([preset]), num_processes)  # no SystemExit


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_binary_prompt_file_is_one_error_line(script, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes(bytes(range(128, 256)))
    assert problems(script, ["--prompts", str(path)]) == f"error: prompt file '{path}' is not UTF-8 text"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_relative_prompt_file_resolves_the_same_in_every_script(script, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the project folder: prompts/ is found beside the scripts
    assert problems(script, ["--prompts", "prompts/spatial_train.txt", "--reward", "jpeg_compressibility"]) in (
        None,
        "error: --reward jpeg_compressibility is not differentiable; AlignProp backpropagates through the reward, "
        "choose one of aesthetic, pickscore, clipscore, imagereward, hpsv2, hpsv2.1, shapes_learned or an ensemble "
        "of them",
    )


# flags that accelerate's Accelerator(...) rejects with a traceback of its own (bf: on a GPU; on a CPU the scripts
# hand it "no"): the scripts must check them first
FLAGS_ACCELERATE_REJECTS = [["--report-to", "tensorbaord"], ["--mixed-precision", "bf"]]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags", FLAGS_ACCELERATE_REJECTS, ids=" ".join)
def test_a_flag_is_checked_before_accelerate_is_built(script, flags, tmp_path):
    result = run_script(script, ["--tiny", *flags], tmp_path, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {' '.join(flags)} must be"), (
        result.stderr
    )
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------- failed starts
def run_main(script, flags, output_dir):
    """main() in this process, as `python <script> <flags>` runs it; returns the SystemExit code (None: finished)."""
    module = MODULES[script]
    try:
        module.main(module.parse_args([*flags, "--output-dir", str(output_dir)]))
    except SystemExit as stop:
        return stop.code
    return None


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_precision_is_one_error_line_on_a_gpu_too(script, tmp_path, monkeypatch):
    """On a GPU the scripts hand --mixed-precision to Accelerator(...) as given (on a CPU all but bf16 become "no")."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    code = run_main(script, ["--tiny", "--mixed-precision", "bf"], tmp_path)
    assert code.startswith("error: --mixed-precision bf must be fp16, bf16 or no"), code


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_start_that_cannot_load_its_model_writes_nothing(script, run_flags, tmp_path):
    """One error line and no run folder: the corrected rerun is not blocked by 'run folder exists'. (As a user
    starts it, the same line exits with code 2: test_scripts.py.)"""
    code = run_main(script, [*run_flags[script], "--model", "does/not/exist"], tmp_path)
    assert code.startswith("error: cannot load the model 'does/not/exist'") and "\n" not in code, code
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_model_is_named_before_a_folder_that_has_checkpoints(script, run_flags, tmp_path):
    """`--tiny --model tiny-sd` on a folder with checkpoints: the mistake to fix is the model, not the folder."""
    (tmp_path / "full" / "checkpoints" / "epoch_0001").mkdir(parents=True)
    code = run_main(script, [*run_flags[script], "--model", "does/not/exist", "--run-name", "full"], tmp_path)
    assert code.startswith("error: cannot load the model 'does/not/exist'") and "\n" not in code, code


def test_a_hub_reward_that_cannot_load_names_the_offline_rewards_of_the_run():
    from worlds import offline_rewards

    shapes, tiny, plain = offline_rewards(tiny=False, shapes=True), offline_rewards(True, False), offline_rewards(0, 0)
    assert "--reward shapes, shapes_binary or shapes_learned" in shapes and "--tiny" not in shapes  # two presets
    assert "--reward aesthetic, pickscore, clipscore, imagereward, hpsv2 or hpsv2.1" in tiny and "shapes" not in tiny
    assert "--tiny" in plain and "--shapes" in plain and "shapes_learned" in plain


def unreachable_hub(monkeypatch, tmp_path):
    """An empty hub cache and a hub that does not answer, as a machine without network meets them."""
    import huggingface_hub
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise ConnectionError("[Errno 111] Connection refused")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub, "model_info", no_network)


def test_a_shapes_run_whose_hub_reward_cannot_load_names_the_shapes_rewards(monkeypatch, tmp_path):
    unreachable_hub(monkeypatch, tmp_path)
    monkeypatch.setattr(MODULES["ddpo_diffexp.py"], "load_pipeline", lambda *args: None)  # loaded before the reward
    code = run_main("ddpo_diffexp.py", ["--shapes", "--reward", "pickscore"], tmp_path / "runs")
    assert code.startswith("error: cannot load the reward 'pickscore': yuvalkirstain/PickScore_v1 is neither in "), code
    assert code.endswith("--reward shapes, shapes_binary or shapes_learned.") and "\n" not in code, code
    assert not (tmp_path / "runs").exists()


def test_a_cached_hub_reward_does_not_ask_the_hub(monkeypatch, tmp_path):
    from common import check_hub_reachable

    unreachable_hub(monkeypatch, tmp_path)
    snapshot = tmp_path / "hub" / "models--org--reward" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--reward" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--reward" / "refs" / "main").write_text("abc123")
    check_hub_reachable(["org/reward"], "the reward 'x'")  # no SystemExit: it loads from the cache
    with pytest.raises(SystemExit, match=r"^error: cannot load the reward 'x': org/other is neither in the local"):
        check_hub_reachable(["org/reward", "org/other"], "the reward 'x'")


def test_a_hub_reward_that_cannot_be_reached_fails_at_once_in_one_line(tmp_path):
    """No network (a hub address that refuses connections), an empty cache, HF_HUB_OFFLINE unset: huggingface_hub
    would retry every file for ~30 s with a log line per try; the load stops within a few seconds, in one line."""
    child = (
        "import time, torch, worlds\n"
        "for spec in ('pickscore', 'aesthetic'):\n"
        "    start = time.time()\n"
        "    try:\n"
        "        worlds.load_reward(spec, 'cpu', torch.float32)\n"
        "    except SystemExit as stop:\n"
        "        print(f'{time.time() - start:.1f} {stop.code}')\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    env |= dict(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path), PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=60)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines) == 2 and result.stderr == "", (result.stdout, result.stderr[-3000:])
    for line in lines:
        seconds, message = line.split(" ", 1)
        assert float(seconds) < 5 and message.startswith("error: cannot load the reward '"), line
        assert "--tiny" in message and "--shapes" in message, line  # a run on a real model: either offline world


def test_a_run_folder_without_a_checkpoint_is_reused(tmp_path):
    """A folder that a failed start left (no checkpoint) is started afresh: its old log lines are dropped."""
    run = tmp_path / "full"
    (run / "samples").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"epoch": 0, "reward_mean": 123.0}\n')
    (run / "args.json").write_text("{}")
    assert run_main("ddpo_diffexp.py", [*MICRO_FLAGS, "--epochs", "1", "--run-name", "full"], tmp_path) is None
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [0] and metrics[0]["reward_mean"] != 123.0
    assert json.load(open(run / "args.json"))["epochs"] == 1
    assert (run / "run.lock").read_text() == str(os.getpid())  # held until this process exits


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_of_a_folder_without_a_checkpoint_says_so(script, run_flags, tmp_path):
    (tmp_path / "full").mkdir()
    code = run_main(script, [*run_flags[script], "--run-name", "full", "--resume"], tmp_path)
    assert code == f"error: --resume: no checkpoint that loads in {tmp_path / 'full'}"


# ---------------------------------------------------------------------------------------------- resume
def copy_of(finished_run, tmp_path):
    shutil.copytree(finished_run, tmp_path / "full")
    return tmp_path / "full"


def snapshot(folder):
    """Every file under `folder` with its bytes, to show that nothing changed."""
    return {
        os.path.relpath(os.path.join(root, name), folder): open(os.path.join(root, name), "rb").read()
        for root, _, names in os.walk(folder)
        for name in names
    }


@pytest.mark.parametrize("script", SCRIPTS)
def test_resuming_a_finished_run_is_a_no_op(script, finished_runs, run_flags, tmp_path, capsys):
    run = copy_of(finished_runs(script), tmp_path)
    before = snapshot(run)
    assert run_main(script, [*run_flags[script], "--run-name", "full", "--resume"], tmp_path) is None
    assert "is complete (2 of 2 epochs); nothing to do" in capsys.readouterr().out
    assert snapshot(run) == before  # eval.jsonl keeps its last line; nothing else is touched either


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_refuses_changed_flags_that_define_the_run(script, finished_runs, run_flags, tmp_path):
    run = copy_of(finished_runs(script), tmp_path)
    flags = [*run_flags[script], "--run-name", "full", "--resume", "--lora-rank", "8", "--seed", "5"]
    code = run_main(script, flags, tmp_path)
    assert code.startswith(f"error: --resume with other flags than {run}: --lora-rank 8 (was 4); --seed 5 (was 0)")
    assert "only --eval-every, --save-every, --report-to may change" in code and "\n" not in code


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_with_another_number_of_epochs_is_refused(script, finished_runs, run_flags, tmp_path):
    """--epochs defines the run (DiffExp explores in its first 3/4, B2-DiffuRL's stages follow it): a resume that
    changes it is refused in one line naming it; --eval-every, --save-every and --report-to may change."""
    run = copy_of(finished_runs(script), tmp_path)
    flags = [*run_flags[script], "--run-name", "full", "--resume", "--eval-every", "5", "--save-every", "3"]
    module = MODULES[script]
    checkpoint, _ = module.load_last_checkpoint(str(run), MainProcess)
    module.check_resume(module.parse_args([*flags, "--report-to", "tensorboard"]), str(run), checkpoint)  # no exit
    with pytest.raises(SystemExit) as stop:
        module.check_resume(module.parse_args([*flags, "--epochs", "9"]), str(run), checkpoint)
    code = str(stop.value.code)
    assert code.startswith(f"error: --resume with other flags than {run}: --epochs 9 (was 2) (only "), code
    assert "\n" not in code


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_corrupt_last_checkpoint_falls_back_to_the_one_before(script, finished_runs, tmp_path, capsys):
    run = copy_of(finished_runs(script), tmp_path)
    module = MODULES[script]
    last = run / "checkpoints" / "epoch_0002" / "training_state.pt"
    last.write_bytes(last.read_bytes()[:100])  # truncated, as by a crash of the disk rather than of the run
    folder, state = module.load_last_checkpoint(str(run), MainProcess)
    assert folder == str(run / "checkpoints" / "epoch_0001") and state["epoch"] == 1
    assert "warning: checkpoint" in capsys.readouterr().out
    (run / "checkpoints" / "epoch_0001" / "pytorch_lora_weights.safetensors").write_bytes(b"not safetensors")
    assert module.load_last_checkpoint(str(run), MainProcess) == (None, {})
    with pytest.raises(SystemExit, match="^error: --resume: no checkpoint that loads in "):
        module.check_resume(module.parse_args(MICRO_FLAGS), str(run), None)
    (run / "args.json").unlink()
    with pytest.raises(SystemExit, match="^error: --resume: cannot read .*args.json"):
        module.check_resume(module.parse_args(MICRO_FLAGS), str(run), str(run / "checkpoints" / "epoch_0001"))


def lock_holder(path):
    """Another process that holds the lock on `path` as a run does (flock, its pid in the file), until killed."""
    code = (
        "import fcntl, os, sys, time\n"
        "lock = open(sys.argv[1], 'a+')\n"
        "fcntl.flock(lock, fcntl.LOCK_EX)\n"
        "lock.truncate(0), lock.write(str(os.getpid())), lock.flush(), print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_run_lock_is_exclusive_and_a_stale_one_is_taken_over(script, tmp_path):
    module = MODULES[script]
    lock = tmp_path / "run.lock"
    holder = lock_holder(lock)
    try:
        with pytest.raises(SystemExit, match=f"is held by process {holder.pid}"):
            module.lock_run(str(lock))
    finally:
        holder.kill()  # as kill -9: the OS ends its lock, and its pid stays in the file
        holder.wait()
    module.lock_run(str(lock))  # its process is gone: the lock is stale and taken over
    assert lock.read_text() == str(os.getpid())
    with pytest.raises(SystemExit, match=f"is held by process {os.getpid()}"):
        module.lock_run(str(lock))  # held, by a live process (this one): a second run of the folder stops


def test_a_second_run_of_a_locked_folder_stops_in_one_line(finished_runs, run_flags, tmp_path):
    run = copy_of(finished_runs("ddpo_diffexp.py"), tmp_path)
    holder = lock_holder(run / "run.lock")
    try:
        shutil.rmtree(run / "checkpoints" / "epoch_0002")  # an unfinished run: it would go on
        flags = [*run_flags["ddpo_diffexp.py"], "--run-name", "full", "--resume"]
        code = run_main("ddpo_diffexp.py", flags, tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert code == f"error: {run / 'run.lock'} is held by process {holder.pid}, which is running this folder already"
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [0, 1]  # its logs untouched


# ---------------------------------------------------------------------------------------------- NaN, disk full
@pytest.mark.parametrize("script", SCRIPTS)
def test_non_finite_gradients_or_parameters_stop_before_they_are_applied_or_saved(script, capsys):
    module = MODULES[script]
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    parameter.grad = torch.tensor([1.0, float("nan"), 0.0])
    with pytest.raises(SystemExit) as stop:
        module.optimizer_step(MainProcess, optimizer, [parameter], 1.0, 3, 0)
    assert stop.value.code == 1 and torch.equal(parameter.detach(), torch.ones(3))  # the step was not applied
    assert "error: epoch 3: non-finite gradient norm (nan)" in capsys.readouterr().err
    optimizer = torch.optim.SGD([parameter], lr=1e38)  # an update that overflows the parameters
    parameter.grad = torch.full((3,), 10.0)
    with pytest.raises(SystemExit):
        module.optimizer_step(MainProcess, optimizer, [parameter], 100.0, 4, 0)
    assert "error: epoch 4: non-finite LoRA parameters after the update" in capsys.readouterr().err
    parameter.data.fill_(1.0)
    parameter.grad = torch.full((3,), 2.0)
    assert module.optimizer_step(MainProcess, torch.optim.SGD([parameter], lr=0.1), [parameter], 1.0, 0, 0)[0] > 0


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_nan_reward_stops_the_run_and_the_last_checkpoint_is_finite(script, run_flags, tmp_path, monkeypatch, capsys):
    """The training reward turns NaN in epoch 1: the run stops there, and epoch 0's checkpoint is the last one."""
    module = MODULES[script]
    flags = with_values(run_flags[script], epochs="3")
    args = module.parse_args([*flags, "--eval-every", "100", "--output-dir", str(tmp_path), "--run-name", "nan"])
    load_reward, calls = module.load_reward, []
    calls_per_epoch = 1 if script == "b2_diffurl.py" else 2  # the shared micro runs' training reward calls

    def reward_that_turns_nan(name, *more, **keywords):
        reward = load_reward(name, *more, **keywords)

        def forward(images, prompts):
            calls.append(len(prompts))
            return reward(images, prompts) * (float("nan") if len(calls) > calls_per_epoch else 1.0)

        forward.differentiable = reward.differentiable
        return forward

    monkeypatch.setattr(module, "load_reward", reward_that_turns_nan)
    monkeypatch.setattr(module, "run_evaluation", lambda *arguments: None)  # its reward calls would count too
    with pytest.raises(SystemExit) as stop:
        module.main(args)
    assert stop.value.code == 1
    assert "error: epoch 1: non-finite" in capsys.readouterr().err
    checkpoints = sorted(os.listdir(tmp_path / "nan" / "checkpoints"))
    assert checkpoints == ["epoch_0001"], checkpoints  # saved after epoch 0; epoch 1 never reached its save
    state = torch.load(tmp_path / "nan" / "checkpoints" / "epoch_0001" / "training_state.pt", weights_only=False)
    assert all(torch.isfinite(tensor).all() for tensor in state["lora"].values())


def test_a_nan_evaluation_is_written_as_null_not_as_bare_nan(tmp_path):
    path = tmp_path / "eval.jsonl"
    for module in MODULES.values():
        module.append_jsonl(str(path), dict(epoch=0, seen_reward_mean=float("nan"), per_process=[1.0, float("inf")]))
    lines = path.read_text().splitlines()
    assert len(lines) == len(MODULES)
    for line in lines:
        assert json.loads(line) == {"epoch": 0, "seen_reward_mean": None, "per_process": [1.0, None]}


@pytest.fixture(scope="module")
def unet_with_lora():
    from common import add_lora
    from worlds import load_pipeline

    unet = load_pipeline("tiny", "cpu", torch.float32).unet
    return unet, torch.optim.AdamW(add_lora(unet, 4))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one_and_leaves_no_tmp(
    script, finished_runs, unet_with_lora, tmp_path, monkeypatch, capsys
):
    run = copy_of(finished_runs(script), tmp_path)
    before = snapshot(run / "checkpoints")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)  # the training state is written after the LoRA file
    with pytest.raises(SystemExit) as stop:
        MODULES[script].save_checkpoint(MODULES[script].Args(epochs=3), MainProcess, str(run), 2, *unet_with_lora)
    assert stop.value.code == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "No space left on device" in line and "the previous checkpoint is intact" in line
    assert snapshot(run / "checkpoints") == before  # epoch_0001 and epoch_0002 whole, no epoch_0003(.tmp)


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_tracker_that_is_not_installed_is_one_error_line(script, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert problems(script, ["--report-to", "wandb"]) == (
        "error: --report-to wandb needs the wandb package: pip install wandb"
    )
