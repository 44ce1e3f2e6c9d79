"""A fork server for the tests' script runs: import the libraries once, then fork a child per `python script.py`.

Why: a tiny run of a method script takes 5-10 s on 2 idle cores, and 3-4 s of that is importing torch, diffusers,
transformers, peft and accelerate; the suite runs about 40 of them. This process imports them once (it runs no
torch op, so no OpenMP thread pool exists for a fork to break) and waits for requests on stdin. For each one it
forks a child, a fresh copy of a process that has only imported modules, which becomes `python script.py flags`:
its own argv, working directory, environment, torch thread count, stdin (/dev/null), stdout and stderr (files),
the script executed as __main__, atexit handlers run, and the exit code a Python process would return (a
traceback and 1 for an uncaught exception, SystemExit's code otherwise). The runs are bit-identical to ordinary
subprocesses (the same metrics and LoRA tensors; tests/test_scripts.py compares the two).

Protocol, one JSON object a line: a request {"argv", "cwd", "env", "stdout", "stderr"} is answered by {"pid"}
at once and by {"returncode"} when the child ends (killed by signal N: -N, as subprocess reports it). conftest.py
starts the server with the environment of the runs and falls back to ordinary subprocesses for a run whose
environment differs in anything but OMP_NUM_THREADS, PYTEST_CURRENT_TEST and TORCHINDUCTOR_CACHE_DIR
(huggingface_hub and others read theirs at import; see ScriptServer.serves), and for multi-process launches.
"""

import atexit
import json
import os
import runpy
import sys
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preload():
    """What the scripts import before their first line of work: the libraries behind the project's modules."""
    sys.path.insert(0, ROOT)
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import tyro  # noqa: F401
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection  # noqa: F401

    import common

    common.pipeline_classes()  # StableDiffusionPipeline and StableDiffusionXLPipeline: most of the import time
    sys.path.remove(ROOT)


def run_child(request, reply_fd):
    """In the forked child: become `python argv[0] argv[1:]` and never return."""
    import torch

    code = 1
    try:
        os.close(reply_fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # the libraries read OMP_NUM_THREADS when they were loaded, in the server: set the run's count here
        torch.set_num_threads(int(request["env"].get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        for fd, path, flags in (
            (0, os.devnull, os.O_RDONLY),
            (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
            (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        ):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as `python script.py` sets it
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as stop:  # what the interpreter does with it at the top level
            if stop.code is None or isinstance(stop.code, int):
                code = stop.code or 0
            else:
                print(stop.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def serve():
    # torch and its libraries start 2 idle helper threads at import; a fork copies only this one, as a DataLoader
    # worker's does (Python 3.12+ warns about any fork of a multi-threaded process)
    warnings.filterwarnings("ignore", message=r"This process .* is multi-threaded", category=DeprecationWarning)
    reply_fd = os.dup(1)  # replies go to the original stdout; anything else printed goes to stderr
    os.dup2(2, 1)
    preload()
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(reply_fd, b'{"ready": true}\n')
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request, reply_fd)
        os.write(reply_fd, (json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        os.write(reply_fd, (json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())


if __name__ == "__main__":
    serve()
