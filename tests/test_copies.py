"""The four method scripts diff as methods: every block they share is a text-identical copy, comments included.

One table, SHARED_BLOCKS, names each shared block (a function, a section of main, the Args docstrings of the
shared flags, an import line) and the scripts that must hold it. A block that drifts in one script fails with a
unified diff against the first script of its row, so the fix is to copy the block back, verbatim.
"""

import ast
import difflib
import os

import pytest

from conftest import ROOT

SCRIPTS = ["ddpo_diffexp.py", "alignprop_diffexp.py", "b2_diffurl.py", "ddpo_coca.py"]
DDPO_FAMILY = ["ddpo_diffexp.py", "b2_diffurl.py", "ddpo_coca.py"]  # policy gradient: DDIM log-prob, clipped loss
DIFFEXP = ["ddpo_diffexp.py", "alignprop_diffexp.py", "ddpo_coca.py"]  # the scripts with DiffExp's flags
DDPO_UPDATE = ["ddpo_diffexp.py", "ddpo_coca.py"]  # DDPO's own update: per-prompt advantages, K steps

# (kind, name, scripts): kind "function" is a top-level def with its decorators; "section" the text from a
# banner of main to the next marker; "tail" the run-management banner and the text from the line "# ---- ... the
# same in every script" to the end of the file; "args" the docstrings of a group of Args fields; "import" one
# import line.
SHARED_BLOCKS = [
    ("import", "from worlds import", SCRIPTS),
    ("args", "shared", SCRIPTS),
    ("args", "DiffExp", DIFFEXP),
    ("tail", "run management", SCRIPTS),  # from its banner, less PRESETS and the flag rules, to the end of the file
    ("function", "ddim_step_with_logprob", DDPO_FAMILY),
    ("function", "clipped_policy_loss", DDPO_FAMILY),
    ("function", "per_prompt_advantages", DDPO_UPDATE),
    ("function", "trained_steps_per_sample", DDPO_UPDATE),
    ("function", "exploration_settings", DIFFEXP),
    ("function", "diffexp_flag_rules", DIFFEXP),
    ("function", "epoch_seed", SCRIPTS),
    ("function", "caption_lines", SCRIPTS),
    ("function", "save_image_grid", SCRIPTS),
    ("function", "stop_on_non_finite", SCRIPTS),
    ("function", "member_reward_means", SCRIPTS),
    ("function", "process_means", SCRIPTS),
    ("function", "score_in_batches", DDPO_FAMILY),
    ("function", "optimizer_step", SCRIPTS),
    ("function", "grad_norm_summary", SCRIPTS),
    ("function", "run_evaluation", DIFFEXP),
    ("section", "1. Setup", SCRIPTS),
]
RUN_MANAGEMENT_BANNER = "# Run management:"
SHARED_FROM = "# " + "-" * 88 + " the same in every script"
SHARED_ARGS_END = "resume"  # the shared Args fields run from the first field to this one
DIFFEXP_ARGS = ("diffexp", "dynamic_cfg", "prompt_weighting", "cfg_low", "t_thres", "prompt_weight_range")
DIFFEXP_ARGS += ("explore_fraction",)
BANNERS = ["1. Setup", "2. Sample", "3. Reward", "4. Advantage and loss", "5. Update", "6. Log, evaluate, checkpoint"]


def read(script):
    with open(os.path.join(ROOT, script)) as f:
        return f.read()


def args_fields(source):
    """[(field name, source text of its docstring)] of the Args dataclass, in order."""
    tree = ast.parse(source)
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Args").body
    fields = []
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign):
            has_docstring = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            fields.append((node.target.id, ast.get_source_segment(source, following) if has_docstring else None))
    return fields


def block(script, kind, name):
    """The text of one shared block in `script`, or None if the script does not have it."""
    source = read(script)
    lines = source.splitlines(keepends=True)
    if kind == "function":
        for node in ast.parse(source).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                first = min([node.lineno] + [decorator.lineno for decorator in node.decorator_list])
                return "".join(lines[first - 1 : node.end_lineno])
        return None
    if kind == "section":  # from the banner's title line to "# Method-specific setup"
        start = next((i for i, line in enumerate(lines) if line.strip().startswith(f"# {name}:")), None)
        end = next((i for i, line in enumerate(lines) if line.strip() == "# Method-specific setup"), None)
        return None if start is None or end is None else "".join(lines[start:end])
    if kind == "tail":  # the run-management banner (its rule above it too), then the shared text to the end
        start = next((i for i, line in enumerate(lines) if line.startswith(RUN_MANAGEMENT_BANNER)), None)
        shared = next((i for i, line in enumerate(lines) if line.startswith(SHARED_FROM)), None)
        return None if start is None or shared is None else "".join(lines[start - 1 : start + 3] + lines[shared:])
    if kind == "import":
        found = [line for line in lines if line.startswith(name)]
        return found[0] if found else None
    fields = args_fields(source)  # kind == "args"
    names = [field for field, _ in fields]
    if name == "shared":
        selected = fields[: names.index(SHARED_ARGS_END) + 1]
    else:
        selected = [(field, doc) for field, doc in fields if field in DIFFEXP_ARGS]
        if [field for field, _ in selected] != list(DIFFEXP_ARGS):
            return None
    return "".join(f"{field}: {doc}\n" for field, doc in selected)


@pytest.mark.parametrize("kind, name, scripts", SHARED_BLOCKS, ids=[f"{k}:{n}" for k, n, _ in SHARED_BLOCKS])
def test_shared_block_is_text_identical(kind, name, scripts):
    texts = {script: block(script, kind, name) for script in scripts}
    missing = [script for script, text in texts.items() if text is None]
    assert not missing, f"{kind} {name!r} is missing from {missing}"
    reference = scripts[0]
    for script in scripts[1:]:
        if texts[script] != texts[reference]:
            diff = "".join(
                difflib.unified_diff(
                    texts[reference].splitlines(keepends=True),
                    texts[script].splitlines(keepends=True),
                    fromfile=reference,
                    tofile=script,
                )
            )
            pytest.fail(f"{kind} {name!r} in {script} drifted from {reference}; copy it back verbatim:\n{diff}")


def test_the_table_would_catch_a_drifted_comment(tmp_path, monkeypatch):
    """The comparison is of text: a changed comment or docstring inside a shared function is a difference."""
    for script in SCRIPTS[:2]:
        text = read(script)
        if script == SCRIPTS[1]:
            text = text.replace('    """The seed of one (epoch, process)', '    """The seed of an (epoch, process)', 1)
        (tmp_path / script).write_text(text)
    monkeypatch.setitem(globals(), "ROOT", str(tmp_path))
    assert block(SCRIPTS[0], "function", "epoch_seed") != block(SCRIPTS[1], "function", "epoch_seed")
    with pytest.raises(pytest.fail.Exception, match=r"(?s)drifted.*-    \"\"\"The seed of one"):
        test_shared_block_is_text_identical("function", "epoch_seed", SCRIPTS[:2])


def test_shared_args_come_first_in_the_same_order_and_banners_in_the_same_order():
    def banners(script):  # the title line under each "# ====" rule
        lines = [line.strip() for line in read(script).splitlines()]
        return [
            below.lstrip("# ").split(":")[0]
            for rule, below in zip(lines, lines[1:])
            if rule.startswith("# ====") and below.startswith("# ") and below[2:3].isdigit()
        ]

    reference = [field for field, _ in args_fields(read(SCRIPTS[0]))]
    shared = reference[: reference.index(SHARED_ARGS_END) + 1]
    for script in SCRIPTS:
        fields = [field for field, _ in args_fields(read(script))]
        assert fields[: len(shared)] == shared, script
        assert all(doc for _, doc in args_fields(read(script))), f"{script}: every Args field has a docstring"
        assert banners(script) == BANNERS, script
        assert "    # Method-specific arguments\n" in read(script) and "    # Method-specific setup\n" in read(script)
