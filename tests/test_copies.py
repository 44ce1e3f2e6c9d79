"""Helpers that several scripts need but the design keeps out of common.py are verbatim copies: keep them so."""

import ast
import os

import pytest

from conftest import ROOT

SCRIPTS = ["ddpo_diffexp.py", "alignprop_diffexp.py", "b2_diffurl.py", "ddpo_coca.py"]
DDPO_FAMILY = ["ddpo_diffexp.py", "b2_diffurl.py", "ddpo_coca.py"]
# helper -> the scripts that must define it (identically)
COPIES = {
    "ddim_step_with_logprob": DDPO_FAMILY,
    "clipped_policy_loss": DDPO_FAMILY,
    "save_image_grid": SCRIPTS,
    "save_checkpoint": SCRIPTS,
    "last_checkpoint": SCRIPTS,
    "keep_lines_before": SCRIPTS,
    "stop_on_non_finite": SCRIPTS,
    "epoch_seed": SCRIPTS,
}


def functions(script):
    with open(os.path.join(ROOT, script)) as f:
        tree = ast.parse(f.read())
    return {node.name: ast.dump(node) for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("helper", sorted(COPIES))
def test_helper_copies_are_identical(helper):
    definitions = {script: functions(script).get(helper) for script in COPIES[helper]}
    missing = [script for script, body in definitions.items() if body is None]
    assert not missing, f"{helper} is missing from {missing}"
    reference = definitions[COPIES[helper][0]]
    drifted = [script for script, body in definitions.items() if body != reference]
    assert not drifted, f"{helper} in {drifted} differs from {COPIES[helper][0]}: copy it verbatim"


def test_scripts_share_args_order_and_section_banners():
    """The shared Args fields come first, in the same order, and the six banners appear in the same order."""

    def shared_fields(script):
        with open(os.path.join(ROOT, script)) as f:
            tree = ast.parse(f.read())
        args = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args")
        return [node.target.id for node in args.body if isinstance(node, ast.AnnAssign)]

    def banners(script):  # the title line under each "# ====" rule
        with open(os.path.join(ROOT, script)) as f:
            lines = [line.strip() for line in f]
        return [
            below.lstrip("# ").split(":")[0]
            for rule, below in zip(lines, lines[1:])
            if rule.startswith("# ====") and below.startswith("# ") and below[2:3].isdigit()
        ]

    reference_fields = shared_fields("ddpo_diffexp.py")
    shared = reference_fields[: reference_fields.index("resume") + 1]
    reference_banners = banners("ddpo_diffexp.py")
    assert reference_banners == [
        "1. Setup",
        "2. Sample",
        "3. Reward",
        "4. Advantage and loss",
        "5. Update",
        "6. Log, evaluate, checkpoint",
    ]
    for script in SCRIPTS[1:]:
        assert shared_fields(script)[: len(shared)] == shared, script
        assert banners(script) == reference_banners, script
