"""Default run names: every command of the README gets a folder of its own, and its --resume finds it again.

A run is written to runs/<default_run_name(...)> unless --run-name is given; two commands that train different
runs must not meet in one folder (the second would stop with "has checkpoints; pass --resume", and --resume would
refuse its other flags).
"""

import importlib
import os
import re
import shlex
from collections import defaultdict


from conftest import ROOT, SCRIPTS

MODULES = {script: importlib.import_module(script[:-3]) for script in SCRIPTS}


def readme_commands():
    """[(script, flags, number of processes)] of every command line in README.md's fenced bash blocks: `python
    <script> ...` and `accelerate launch ... <script> ...` (the launcher's --num_processes is the process count)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), flags=re.DOTALL)
    commands = []
    for line in "".join(blocks).splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] != ["python"] and words[:2] != ["accelerate", "launch"]:
            continue
        position = next((i for i, word in enumerate(words) if word in SCRIPTS), None)
        if position is None:  # python -m pytest, python benchmarks/...
            continue
        launcher = words[:position]
        processes = int(launcher[launcher.index("--num_processes") + 1]) if "--num_processes" in launcher else 1
        commands.append((words[position], words[position + 1 :], processes))
    return commands


def default_name(script, flags, processes):
    module = MODULES[script]
    return module.default_run_name(module.parse_args(flags), processes)


def test_every_readme_command_has_a_run_name_of_its_own_and_its_resume_keeps_it():
    commands = readme_commands()
    assert len(commands) >= 20 and {script for script, _, _ in commands} == set(SCRIPTS), commands
    names = defaultdict(dict)  # script -> {name: the command that has it}
    for script, flags, processes in commands:
        name = default_name(script, flags, processes)
        assert re.fullmatch(r"[A-Za-z0-9._=+-]+", name) and len(name) <= 100, name  # a safe folder name
        command = f"{script} {' '.join(flags)} ({processes} processes)"
        assert name not in names[script], f"{command} and {names[script][name]} share the run name {name}"
        names[script][name] = command
        # the same command resumed, with the flags that may change at a resume changed: the same folder
        later = [*flags, "--resume", "--eval-every", "7", "--save-every", "3", "--output-dir", "elsewhere"]
        assert default_name(script, later, processes) == name, command


def test_a_run_name_says_what_the_run_is():
    module = MODULES["ddpo_diffexp.py"]

    def name(*flags, processes=1):
        return module.default_run_name(module.parse_args(list(flags)), processes)

    assert name() == name("--reward", "aesthetic") == "ddpo_diffexp_seed0"  # the defaults: the same run
    assert name("--shapes") == "ddpo_diffexp_shapes_seed0"
    assert name("--tiny", "--model", "tiny-sdxl") == "ddpo_diffexp_tiny_model=tiny-sdxl_seed0"
    # the flags --diffexp implies are left out; an explicit --no-... that changes the run is not
    assert name("--diffexp") == name("--diffexp", "--dynamic-cfg") == "ddpo_diffexp_diffexp_seed0"
    assert name("--diffexp", "--no-dynamic-cfg") == "ddpo_diffexp_diffexp_no-dynamic-cfg_seed0"
    assert name("--preset", "diffexp-fig4a", "--no-diffexp") == "ddpo_diffexp_diffexp-fig4a_no-diffexp_seed0"
    assert name("--preset", "diffexp-fig4a", "--epochs", "3") == "ddpo_diffexp_diffexp-fig4a_epochs=3_seed0"
    assert name("--tiny", "--reward", "2*aesthetic+jpeg_compressibility", processes=2) == (
        "ddpo_diffexp_tiny_reward=2xaesthetic+jpeg_compressibility_2processes_seed0"
    )
    long = name("--tiny", "--prompts", "/data/" + "x" * 120 + ".txt", "--seed", "4")
    other = name("--tiny", "--prompts", "/data/" + "x" * 121 + ".txt", "--seed", "4")
    assert len(long) == 100 and long.endswith("_seed4") and long != other  # cut, with a hash of the whole
