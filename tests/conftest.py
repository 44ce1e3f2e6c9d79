"""Shared test fixtures: the project root on sys.path, a tiny pipeline, a runner for the scripts (forked from
tests/script_server.py, which imports the libraries once), and one short finished run of each script that every
test file reads (a run costs seconds; each script runs it once)."""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ASSETS = os.path.join(os.path.dirname(ROOT), "shared", "assets")
sys.path.insert(0, ROOT)

SCRIPTS = ["ddpo_diffexp.py", "alignprop_diffexp.py", "b2_diffurl.py", "ddpo_coca.py"]


def require_asset(path):
    """A file of ../shared/assets: CI has them all (a missing one fails there); elsewhere the test is skipped."""
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI must have ../shared/assets")
        pytest.skip(f"{path} is absent (../shared/assets is beside the project in CI)")
    return path


# The smallest run that still exercises every part of a script: 4 steps, 2 batches of 4, evaluation and a
# checkpoint every epoch.
MICRO_FLAGS = (
    "--tiny --num-steps 4 --samples-per-epoch 8 --sample-batch-size 4 --train-batch-size 4 --samples-per-update 4 "
    "--eval-every 1 --eval-images-per-prompt 1 --save-every 1 --prompts unseen_animals "
    "--eval-unseen-prompts unseen_animals"
).split()


def with_values(flags, **values):
    """`flags` with the values of some flags replaced: with_values(MICRO_FLAGS, eval_every="2")."""
    flags = list(flags)
    for name, value in values.items():
        flags[flags.index("--" + name.replace("_", "-")) + 1] = value
    return flags


def b2_flags(prompt_file):
    """B2-DiffuRL's micro run: 2 prompts without an unseen twin, one sampling batch of 2 groups x 4 branches, 2
    evaluation images per prompt (for the diversity), evaluation first and last only."""
    flags = with_values(MICRO_FLAGS, prompts=prompt_file, sample_batch_size="8", eval_images_per_prompt="2")
    flags = with_values(flags, eval_every="100")
    del flags[flags.index("--eval-unseen-prompts") : flags.index("--eval-unseen-prompts") + 2]
    return [*flags, "--num-branches", "4"]


@pytest.fixture(scope="session")
def run_flags(tmp_path_factory):
    """Per script, the flags of its shared 2-epoch run. DiffExp explores in the first half: epoch 0, not 1."""
    prompt_file = tmp_path_factory.mktemp("prompts") / "two.txt"
    prompt_file.write_text("red apple\na cat on a sofa\n")
    diffexp = ["--diffexp", "--explore-fraction", "0.5", "--epochs", "2"]
    return {
        "ddpo_diffexp.py": [*MICRO_FLAGS, *diffexp],
        "alignprop_diffexp.py": [*MICRO_FLAGS, *diffexp],  # tiny aesthetic reward; per_step truncation: 1-4 of 4 steps
        "b2_diffurl.py": [*b2_flags(str(prompt_file)), "--epochs", "2"],  # T = 4: intervals of 3, then 4 steps
        # two CoCA windows of 2 steps; evaluated before the first and after the last epoch only (the later flag wins)
        "ddpo_coca.py": [*MICRO_FLAGS, "--similarity-window", "2", "--eval-every", "100", *diffexp],
    }


@pytest.fixture(scope="session")
def finished_runs(tmp_path_factory, run_flags):
    """finished_runs(script) -> the folder of its uninterrupted run with `run_flags[script]` (run on first use).

    What the run printed is beside its folder, in stdout.txt and stderr.txt (files, as under nohup or a batch system).
    """
    folders = {}

    def finished_run(script):
        if script not in folders:
            output = tmp_path_factory.mktemp("runs")
            result = run_script(script, [*run_flags[script], "--run-name", "full"], output)
            (output / "stdout.txt").write_text(result.stdout)
            (output / "stderr.txt").write_text(result.stderr)
            folders[script] = output / "full"
        return folders[script]

    return finished_run


@pytest.fixture(scope="session")
def tiny_pipeline():
    from worlds import load_pipeline

    return load_pipeline("tiny", "cpu", torch.float32)


ENVIRONMENT = dict(os.environ)  # the session's, before any test patches it


def script_environment(processes=1, base=None):
    """Offline, with a fixed number of OpenMP threads: the thread count changes the order of float sums, so a run
    and its resumed twin must use the same one. Several processes get one thread each, since 2 processes of 2
    threads on 2 cores spin-wait for each other (on a loaded machine a tiny run took 135 s with 2 threads, 28 s
    with 1)."""
    threads = 1 if processes > 1 else min(2, os.cpu_count() or 1)
    base = os.environ if base is None else base
    return dict(base, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads))


class ScriptServer:
    """The client of tests/script_server.py: runs `python script flags` as forks of one process that imported the
    libraries once (3-4 s saved per run). Started on first use, stopped with the session."""

    def __init__(self):
        self.process = None
        self.environment = None

    def serves(self, env):
        """Whether a run with environment `env` can be forked: the server's, up to the thread count."""
        if self.process is None:
            self.environment = script_environment(base=ENVIRONMENT)
            self.process = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "tests", "script_server.py")],
                cwd=ROOT,
                env=self.environment,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                bufsize=0,  # unbuffered bytes: readline() takes one reply and leaves the next for select()
            )
            atexit.register(self.stop)
            assert json.loads(self.process.stdout.readline()) == {"ready": True}, "tests/script_server.py failed"
        differs = {key for key in env.keys() | self.environment.keys() if env.get(key) != self.environment.get(key)}
        # pytest names the running test in PYTEST_CURRENT_TEST; torch sets TORCHINDUCTOR_CACHE_DIR in this process
        # when a test loads its compiler (read only when compiling)
        return differs <= {"OMP_NUM_THREADS", "PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}

    def start(self, command, env, stdout, stderr):
        """Fork `command` ([python, script, *flags]), its outputs in the files `stdout`, `stderr`; returns its pid."""
        request = dict(argv=command[1:], cwd=ROOT, env=env, stdout=str(stdout), stderr=str(stderr))
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        return json.loads(self.process.stdout.readline())["pid"]

    def finished(self, timeout=0.0):
        """Whether the run started last has ended (its return code is waiting), after at most `timeout` seconds."""
        return bool(select.select([self.process.stdout], [], [], timeout)[0])

    def wait(self, pid, timeout):
        """The return code of the run `pid` (killed after `timeout` seconds, as subprocess.run does)."""
        if not self.finished(timeout):
            os.kill(pid, signal.SIGKILL)
            json.loads(self.process.stdout.readline())
            raise subprocess.TimeoutExpired(pid, timeout)
        return json.loads(self.process.stdout.readline())["returncode"]

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)


SCRIPT_SERVER = ScriptServer()


def run_script(script, flags, tmp_path, launcher=(), check=True, timeout=600):
    """Run a method script as a user would (forked from tests/script_server.py unless `launcher` starts it, e.g.
    `accelerate launch`); returns a CompletedProcess with its return code, stdout and stderr."""
    command = [*launcher, os.path.join(ROOT, script)] if launcher else [sys.executable, os.path.join(ROOT, script)]
    command += ["--output-dir", str(tmp_path), *flags]
    env = script_environment(processes=2 if launcher else 1)
    if not launcher and SCRIPT_SERVER.serves(env):
        with tempfile.TemporaryDirectory() as outputs:
            stdout, stderr = os.path.join(outputs, "stdout"), os.path.join(outputs, "stderr")
            returncode = SCRIPT_SERVER.wait(SCRIPT_SERVER.start(command, env, stdout, stderr), timeout)
            with open(stdout) as out, open(stderr) as err:
                result = subprocess.CompletedProcess(command, returncode, out.read(), err.read())
    else:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def lora_tensors(folder):
    """The LoRA tensors of a checkpoint folder, as saved for `load_lora_weights`."""
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def kill_after_first_checkpoint(script, flags, tmp_path, run_name="full"):
    """Start a run and SIGKILL it as soon as its first checkpoint exists, as a preempted job (no clean-up).

    Returns the names of the checkpoints it left.
    """
    command = [sys.executable, os.path.join(ROOT, script), "--output-dir", str(tmp_path), *flags]
    env = script_environment()
    assert SCRIPT_SERVER.serves(env), "the suite's environment is the script server's (see ScriptServer.serves)"
    pid = SCRIPT_SERVER.start(command, env, os.devnull, os.devnull)
    checkpoints = tmp_path / run_name / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "epoch_0001").exists() and not SCRIPT_SERVER.finished(0.02) and time.time() < deadline:
        pass
    if not SCRIPT_SERVER.finished():  # still running: killed as a preempted job is
        os.kill(pid, signal.SIGKILL)
    SCRIPT_SERVER.wait(pid, timeout=60)
    return sorted(os.listdir(checkpoints))


# One run per architecture family on the tiny SDXL with a reward ensemble: tests/test_sdxl.py checks the SDXL side
# (the reward rises, the LoRA loads into StableDiffusionXLPipeline), tests/test_scripts.py the ensemble's logs.
ENSEMBLE_RUNS = {
    # and tensorboard's event file (tests/test_scripts.py)
    "alignprop_diffexp.py": (
        "hpsv2+aesthetic+0.5*pickscore",
        ["--diffexp", "--epochs", "3", "--report-to", "tensorboard"],
    ),
    # a non-differentiable member, and bf16 weights (tests/test_half_precision.py)
    "ddpo_diffexp.py": (
        "2*aesthetic+jpeg_compressibility",
        ["--diffexp", "--epochs", "1", "--mixed-precision", "bf16"],
    ),
}


@pytest.fixture(scope="session")
def sdxl_ensemble_runs(tmp_path_factory):
    """sdxl_ensemble_runs(script) -> the folder of its tiny-sdxl run on ENSEMBLE_RUNS[script] (run on first use)."""
    folders = {}

    def sdxl_ensemble_run(script):
        if script not in folders:
            reward, extra = ENSEMBLE_RUNS[script]
            flags = with_values(MICRO_FLAGS, eval_every="3", save_every="3")
            output = tmp_path_factory.mktemp("sdxl")
            run_script(script, [*flags, "--model", "tiny-sdxl", "--reward", reward, *extra, "--run-name", "r"], output)
            folders[script] = output / "r"
        return folders[script]

    return sdxl_ensemble_run
