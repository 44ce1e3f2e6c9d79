"""Named presets: every one resolves, passes the flag checks (no model loads), and is documented in PRESETS.md."""

import importlib
import os
import re
import shlex

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


def presets_md():
    with open(os.path.join(ROOT, "PRESETS.md")) as f:
        return f.read()


def documented_rows():
    """{(script, preset, field): (the flag as typed, source, what the second source says)} from PRESETS.md's tables."""
    rows, script = {}, None
    for line in presets_md().splitlines():
        heading = re.match(r"^## `(\w+\.py)`", line)
        script = heading.group(1) if heading else script
        row = re.match(r"^\| `([\w.-]+)` \| `(--[^`]*)` \| (.*) \| (.*) \|$", line)
        if row:
            flag = row.group(2).split()[0]
            rows[script, row.group(1), flag[2:].replace("-", "_")] = row.group(2, 3, 4)
    return rows


def test_presets_md_lists_every_value_of_every_paper_preset_as_a_command_line_flag():
    """Every row's flag, typed as written (`--adam-betas 0.9 0.999`, `--diffexp`), sets the preset's value."""
    rows = documented_rows()
    expected = {
        (script, name, field)
        for script, name in CASES
        if name not in CPU_PRESETS
        for field in MODULES[script].PRESETS[name]
    }
    assert set(rows) == expected
    for (script, name, field), (typed, _, _) in rows.items():
        module = MODULES[script]
        assert getattr(module.parse_args(shlex.split(typed)), field) == module.PRESETS[name][field], typed


def test_presets_md_says_what_each_value_was_checked_against():
    """The second-source column names the source and what it says: no bare "yes" (DiffExp released no code, CoCA's
    paper text is not here); DiffExp's training prompts are its Table 1; eta 1 is DDPO's code's."""
    text = presets_md()
    assert "agree?" not in text and "| preset | flag | source | checked against |" in text
    assert "(0.9," not in text  # values as typed, not Python tuples
    for (script, name, field), (typed, source, checked) in documented_rows().items():
        assert checked.split()[0].rstrip(":") not in ("yes", "no", "n/a"), (script, name, field, checked)
        if source.startswith("DiffExp"):  # its text only: the second source is a release, or there is none
            assert "a831a5f" in checked or checked.startswith("nothing: DiffExp"), (script, name, field, checked)
        if name.startswith("coca"):
            assert checked == "nothing: CoCA's paper text is not here", (name, field, checked)
        if typed == "--prompts animal_activities":
            assert "DiffExp Table 1" in source and "Table 2 is the unseen list" in source, source
    ddpo_defaults = text.split("## `ddpo_diffexp.py`")[1].split("| preset |")[0]
    assert "eta 1" in ddpo_defaults.split("kvablack/ddpo-pytorch")[1], "eta 1 comes from DDPO's code"
    assert "`hps_v2_all`" in text and "750" in text  # AlignProp's hps runs train on their own prompts
    with open(os.path.join(ROOT, "ddpo_diffexp.py")) as f:
        assert "prompts of Table 2" not in f.read()


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
