"""Shared test fixtures: the project root on sys.path, a tiny pipeline, and a runner for the scripts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_ASSETS = os.path.join(os.path.dirname(ROOT), "shared", "assets")
sys.path.insert(0, ROOT)

# The smallest run that still exercises every part of a script: 4 steps, 2 batches of 4, evaluation and a
# checkpoint every epoch.
MICRO_FLAGS = [
    "--tiny",
    "--num-steps",
    "4",
    "--samples-per-epoch",
    "8",
    "--sample-batch-size",
    "4",
    "--train-batch-size",
    "4",
    "--samples-per-update",
    "4",
    "--eval-every",
    "1",
    "--eval-images-per-prompt",
    "1",
    "--save-every",
    "1",
    "--prompts",
    "unseen_animals",
    "--eval-unseen-prompts",
    "unseen_animals",
]


@pytest.fixture(scope="session")
def tiny_pipeline():
    from worlds import load_pipeline

    return load_pipeline("tiny", "cpu", torch.float32)


def run_script(script, flags, tmp_path, launcher=(), check=True, timeout=600):
    """Run a method script as a user would; returns the CompletedProcess."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1" if launcher else os.environ.get("OMP_NUM_THREADS", ""),
    )
    if not env["OMP_NUM_THREADS"]:
        del env["OMP_NUM_THREADS"]
    command = [*launcher, os.path.join(ROOT, script)] if launcher else [sys.executable, os.path.join(ROOT, script)]
    result = subprocess.run(
        [*command, "--output-dir", str(tmp_path), *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
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
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), "--output-dir", str(tmp_path), *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = tmp_path / run_name / "checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "epoch_0001").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return sorted(os.listdir(checkpoints))
