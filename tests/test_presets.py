"""Named presets: every one resolves, passes the flag checks (no model loads), and is documented in PRESETS.md."""

import importlib
import os
import re

import pytest

from conftest import ROOT, SCRIPTS

MODULES = {script: importlib.import_module(script[:-3]) for script in SCRIPTS}
CPU_PRESETS = ("tiny", "shapes")  # ours, for 1 or 2 CPU processes; the others are GPU runs (1 or 4 processes)
CASES = [(script, name) for script in SCRIPTS for name in MODULES[script].PRESETS]


@pytest.mark.parametrize("script, name", CASES, ids=[f"{s}:{n}" for s, n in CASES])
def test_every_preset_resolves_and_passes_the_checks(script, name):
    module = MODULES[script]
    args = module.parse_args(["--preset", name])
    assert args.preset == name
    for field, value in module.PRESETS[name].items():
        assert getattr(args, field) == value, (field, getattr(args, field), value)
    for num_processes in (1, 2) if name in CPU_PRESETS else (1, 4):
        module.check_args(args, num_processes)  # no SystemExit


@pytest.mark.parametrize("script", SCRIPTS)
def test_explicit_flags_win_over_a_preset_and_names_are_checked(script):
    module = MODULES[script]
    paper = next(name for name in module.PRESETS if name not in CPU_PRESETS)
    assert module.parse_args(["--preset", paper, "--epochs", "3"]).epochs == 3
    assert module.parse_args(["--tiny"]) == module.parse_args(["--preset", "tiny"])
    with pytest.raises(SystemExit, match=f"^error: unknown preset 'nope'; choose one of tiny, shapes, {paper}"):
        module.parse_args(["--preset", "nope"])
    with pytest.raises(SystemExit, match="are two presets; give one"):
        module.parse_args(["--tiny", "--preset", paper])


def documented_values():
    """{(script, preset, flag): value} from the tables of PRESETS.md."""
    values, script = {}, None
    with open(os.path.join(ROOT, "PRESETS.md")) as f:
        for line in f:
            heading = re.match(r"^## `(\w+\.py)`", line)
            script = heading.group(1) if heading else script
            row = re.match(r"^\| `([\w.-]+)` \| `--([\w-]+)` \| `([^`]*)` \|", line)
            if row:
                values[script, row.group(1), row.group(2).replace("-", "_")] = row.group(3)
    return values


def test_presets_md_lists_every_value_of_every_paper_preset():
    documented = documented_values()
    expected = {
        (script, name, field): str(value)
        for script, name in CASES
        if name not in CPU_PRESETS
        for field, value in MODULES[script].PRESETS[name].items()
    }
    assert documented == expected


# Hub ids that no longer load: a preset naming one fails at its first download.
WITHDRAWN = ("runwayml/stable-diffusion-v1-5",)  # the same weights: stable-diffusion-v1-5/stable-diffusion-v1-5


@pytest.mark.parametrize("script, name", CASES, ids=[f"{s}:{n}" for s, n in CASES])
def test_no_preset_names_a_withdrawn_model(script, name):
    args = MODULES[script].parse_args(["--preset", name])
    assert args.model not in WITHDRAWN, f"{script} --preset {name}: --model {args.model} was withdrawn from the hub"


DIFFEXP_SCRIPTS = [script for script in SCRIPTS if hasattr(MODULES[script].Args, "diffexp")]


@pytest.mark.parametrize("script", DIFFEXP_SCRIPTS)
def test_explicit_strategy_flags_win_over_diffexp(script):
    """--diffexp makes both strategies the defaults; an explicit flag turns one off (DiffExp's Fig. 9 (a) ablation),
    whether --diffexp comes from the command line or from a preset, and --no-diffexp turns a preset's off."""
    module = MODULES[script]

    def strategies(*flags):
        args = module.parse_args(list(flags))
        return args.dynamic_cfg, args.prompt_weighting

    assert strategies("--diffexp") == (True, True)
    assert strategies("--diffexp", "--no-dynamic-cfg") == (False, True)
    assert strategies("--diffexp", "--no-prompt-weighting") == (True, False)
    assert strategies("--no-diffexp", "--dynamic-cfg") == (True, False)
    with_diffexp = [name for name, values in module.PRESETS.items() if values.get("diffexp")]
    for name in with_diffexp:
        assert strategies("--preset", name) == (True, True)
        assert strategies("--preset", name, "--no-prompt-weighting") == (True, False)
        assert strategies("--preset", name, "--no-dynamic-cfg") == (False, True)
        assert strategies("--preset", name, "--no-diffexp") == (False, False)  # the README's baseline
    for name in module.PRESETS.keys() - with_diffexp:  # tiny, shapes, coca-aesthetic, ...: no DiffExp
        assert strategies("--preset", name, "--diffexp", "--no-prompt-weighting") == (True, False)
