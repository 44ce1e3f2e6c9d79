"""The house rules a reader relies on: imports point one way, and every cross-reference in a script resolves.

- No import cycle between the project's modules, and common.py imports none of them.
- Every "deviation N" names an item of the module docstring's "Deviations and assumptions" list.
- Every "Eq. N" names an equation of a paper: a bare "Eq. N" is the script's own paper (the first of its
  "Papers" list), anything else says whose ("DiffExp Eq. 7", "B2-DiffuRL's Eq. 4"). The equation numbers are
  read from the papers' text in ../shared/papers.
"""

import ast
import os
import re

import pytest

from conftest import ROOT

PAPERS = os.path.join(os.path.dirname(ROOT), "shared", "papers")
SCRIPTS = ["ddpo_diffexp.py", "alignprop_diffexp.py", "b2_diffurl.py", "ddpo_coca.py"]
MODULES = sorted(name for name in os.listdir(ROOT) if name.endswith(".py"))
# the paper whose equations a bare "Eq. N" means, per file (a file not listed must qualify every Eq. tag)
OWN_PAPER = {
    "ddpo_diffexp.py": "DiffExp",
    "alignprop_diffexp.py": "DiffExp",
    "b2_diffurl.py": "B2-DiffuRL",
    "ddpo_coca.py": "CoCA",
    "common.py": "DiffExp",
}
PAPER_TEXT = {"DiffExp": "diffexp_paper.txt", "B2-DiffuRL": "b2_diffurl_paper.txt", "CoCA": None}  # CoCA: no text
EQUATION_TAG = re.compile(r"(?:\b(DiffExp|B2-DiffuRL|CoCA|DDPO|AlignProp)(?:'s)? )?\bEqs?\. (\d+)(?:-(\d+))?")
DEVIATION_TAG = re.compile(r"\bdeviations? (\d+)((?:(?:, | and | or )\d+)*)")


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def project_imports(name):
    """The project modules that `name` imports, at the top or inside a function."""
    modules = {module[:-3] for module in MODULES}
    found = set()
    for node in ast.walk(ast.parse(read(name))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & modules


def test_common_imports_nothing_of_the_project_and_there_is_no_cycle():
    graph = {name[:-3]: project_imports(name) for name in MODULES}
    assert graph["common"] == set(), graph["common"]

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        for imported in graph[module]:
            visit(imported, [*path, module])

    for module in graph:
        visit(module, [])


def paper_equations(paper):
    """The equation numbers of a paper, from the "(N)" / "\\tag{N}" labels at the end of its lines."""
    numbers = set()
    with open(os.path.join(PAPERS, PAPER_TEXT[paper])) as f:
        for line in f:
            for match in re.finditer(r"\((\d{1,2})\)\s*\$*\s*$|\\tag\{(\d+)\}", line):
                numbers.add(int(match.group(1) or match.group(2)))
    return numbers


def deviation_items(source):
    docstring = ast.get_docstring(ast.parse(source)) or ""
    if "Deviations" not in docstring:
        return set()
    section = docstring[docstring.index("Deviations") :].split("\n\n")[0]
    return {int(number) for number in re.findall(r"^  (\d+)\. ", section, flags=re.M)}


@pytest.mark.parametrize("name", [*SCRIPTS, "shapes_world.py"])
def test_every_deviation_reference_resolves(name):
    source = read(name)
    items = deviation_items(source)
    assert items == set(range(1, len(items) + 1)) and items, f"{name}: the deviation list is numbered 1..N"
    for line_number, line in enumerate(source.splitlines(), 1):
        for match in DEVIATION_TAG.finditer(line):
            numbers = [int(match.group(1))] + [int(n) for n in re.findall(r"\d+", match.group(2))]
            for number in numbers:
                assert number in items, f"{name}:{line_number}: 'deviation {number}' is not in the list {sorted(items)}"


def test_the_deviation_parser_reads_numbers_and_lists():
    matches = DEVIATION_TAG.findall("see deviation 3; deviations 1 and 4; deviations 2, 5 or 6")
    assert matches == [("3", ""), ("1", " and 4"), ("2", ", 5 or 6")]


@pytest.mark.parametrize("name", MODULES)
def test_every_equation_tag_names_an_equation_of_its_paper(name):
    for line_number, line in enumerate(read(name).splitlines(), 1):
        for match in EQUATION_TAG.finditer(line):
            paper = match.group(1) or OWN_PAPER.get(name)
            where = f"{name}:{line_number}: {match.group(0)!r}"
            assert paper is not None, f"{where}: say whose equation it is (e.g. 'DiffExp Eq. 7')"
            assert PAPER_TEXT.get(paper), f"{where}: no text of {paper} to check equation numbers against"
            numbers = range(int(match.group(2)), int(match.group(3) or match.group(2)) + 1)
            missing = set(numbers) - paper_equations(paper)
            assert not missing, f"{where}: {paper} has no equation {sorted(missing)}"


def test_the_papers_equation_labels_are_read():
    assert paper_equations("DiffExp") == set(range(1, 9))  # Eq. 1-8 of DiffExp
    assert {1, 2, 4, 5, 6} <= paper_equations("B2-DiffuRL")


# ---------------------------------------------------------------------------------------------- reader first
RUN_MANAGEMENT_BANNER = "# Run management:"  # the banner after main() under which run management stands
SHARED_FROM = "# " + "-" * 88 + " the same in every script"  # the text from here to the end is one copy (test_copies)
LIMITS = dict(lines=1000, main_starts_before=550, main=220, run_management=300)


def layout(name):
    """The reader-first measures of a method script: its length, where main() starts and how long it is, and the run
    management's lines: the banner's section to the end of the file, less the PRESETS table (the experiments, whose
    values PRESETS.md sources), plus main()'s statements that call a run-management function."""
    source = read(name)
    lines = source.splitlines()
    tree = ast.parse(source)
    main = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main")
    banner = next(number for number, line in enumerate(lines, 1) if line.startswith(RUN_MANAGEMENT_BANNER)) - 1
    managed = {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.lineno > banner
    }  # fmt: skip
    presets = next(node for node in tree.body if isinstance(node, ast.Assign) and node.lineno > banner
                   and any(getattr(target, "id", None) == "PRESETS" for target in node.targets))  # fmt: skip
    calls = set()
    for node in ast.walk(main):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in managed:
            statement = next(s for s in ast.walk(main) if isinstance(s, ast.stmt) and not hasattr(s, "body")
                             and s.lineno <= node.lineno <= s.end_lineno)  # fmt: skip
            calls |= set(range(statement.lineno, statement.end_lineno + 1))
    run_management = len(lines) - banner + 1 - (presets.end_lineno - presets.lineno + 1) + len(calls)
    return dict(lines=len(lines), main_starts=main.lineno, main=main.end_lineno - main.lineno + 1,
                run_management=run_management, banner=banner)  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_method_comes_first_and_run_management_last(name):
    """Issue 31: main() early and short, run management after it under one banner, every script short enough to read."""
    measured = layout(name)
    assert measured["main_starts"] < LIMITS["main_starts_before"], measured
    assert measured["main"] <= LIMITS["main"], measured
    assert measured["banner"] > measured["main_starts"], measured
    assert SHARED_FROM in read(name), f"{name}: the shared run management starts with {SHARED_FROM!r}"
