"""The corpus of invalid definitions (tests/invalid/): each file has one defect and is refused with it.

Each corpus file starts with `# expect: LINE:COL: TEXT`: the problem must be reported at that place
(1-based), with TEXT in its message. `flowdb validate` must say so in FILE:LINE:COL lines and exit 1;
`flowdb deploy` must refuse it too and write nothing, on both databases.

The CLI is run as a real process per file; the runs of a test go side by side to keep it quick.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import func, select

from flowdb.db.tables import events, process_definitions, process_instances, step_instances
from flowdb.models import STEP_TYPES
from flowdb.steptypes.registry import STEP_TYPES as RUNNABLE

from conftest import EXAMPLES, Database, flowdb_cli

CORPUS_DIR = Path(__file__).resolve().parent / "invalid"
CORPUS = sorted(CORPUS_DIR.glob("*.yaml"))
EXPECT = re.compile(r"# expect: (\d+):(\d+): (.+)")
Result = subprocess.CompletedProcess[str]


@dataclass(frozen=True)
class Expected:
    line: int
    col: int
    text: str


def expected(path: Path) -> Expected:
    first = path.read_text(encoding="utf-8").partition("\n")[0]
    match = EXPECT.fullmatch(first.strip())
    assert match, f"{path.name}: the first line must be '# expect: LINE:COL: TEXT', not {first!r}"
    return Expected(int(match[1]), int(match[2]), match[3])


def plain_env() -> dict[str, str]:
    """The environment without FLOWDB_ settings (no agents file, database or Redis from outside)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLOWDB_")}


def problem_lines(path: Path, result: Result) -> list[str]:
    """The stderr lines, each checked to be FILE:LINE:COL: message (the file as it was named)."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.splitlines()
    assert lines, f"{path.name}: nothing on stderr"
    shape = re.compile(re.escape(str(path)) + r":[1-9][0-9]*:[1-9][0-9]*: \S.*")
    for line in lines:
        assert shape.fullmatch(line), f"{path.name}: not FILE:LINE:COL: message: {line!r}"
    return lines


def assert_reported(path: Path, lines: list[str]) -> None:
    want = expected(path)
    prefix = f"{path}:{want.line}:{want.col}: "
    assert any(line.startswith(prefix) and want.text in line for line in lines), (
        f"{path.name}: expected {want.line}:{want.col} with {want.text!r}, got:\n" + "\n".join(lines))


def test_the_corpus_is_complete() -> None:
    assert len(CORPUS) >= 24
    for path in CORPUS:
        want = expected(path)
        lines = path.read_text(encoding="utf-8").splitlines() or [""]
        # Positions are checked for real: past line 1 (the comment) unless the file has nothing else.
        assert want.line > 1 or len(lines) == 1, f"{path.name}: put the defect after line 1"
        assert want.line <= len(lines), f"{path.name}: line {want.line} is past the end of the file"
        assert want.col <= len(lines[want.line - 1]) + 1, f"{path.name}: column {want.col} is past the line"


def split_by_file(files: list[Path], result: Result) -> dict[Path, Result]:
    """One run over many files, as if each file had had its own run: its lines of stdout and stderr."""
    def of(text: str, path: Path) -> str:
        return "".join(line for line in text.splitlines(keepends=True) if line.startswith(f"{path}:"))

    return {path: subprocess.CompletedProcess(result.args, result.returncode, of(result.stdout, path),
                                              of(result.stderr, path)) for path in files}


@pytest.fixture(scope="module")
def validated() -> dict[Path, Result]:
    # One run for the whole corpus (validate checks every file it is given and reports each one's problems).
    result = flowdb_cli("validate", *map(str, CORPUS), env=plain_env())
    assert "Traceback" not in result.stderr and result.stdout == "", result.stdout + result.stderr
    return split_by_file(CORPUS, result)


@pytest.mark.parametrize("path", CORPUS, ids=lambda path: path.stem)
def test_validate_reports_the_defect_where_it_is(path: Path, validated: dict[Path, Result]) -> None:
    result = validated[path]
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    lines = problem_lines(path, result)
    assert_reported(path, lines)
    assert len(lines) == 1, f"{path.name} has one defect, so one problem is expected:\n" + "\n".join(lines)


def test_deploy_refuses_every_invalid_file_and_writes_nothing(db: Database) -> None:
    # One run: deploy checks every file before it writes anything, and reports each file's problems.
    results = split_by_file(CORPUS, flowdb_cli("deploy", *map(str, CORPUS), env=db.cli_env()))
    for path, result in results.items():
        assert result.returncode == 1, f"{path.name}: {result.stdout}{result.stderr}"
        assert "deployed" not in result.stdout
        assert_reported(path, problem_lines(path, result))
    with db.engine.connect() as conn:
        for table in (process_definitions, process_instances, step_instances, events):
            assert conn.execute(select(func.count()).select_from(table)).scalar_one() == 0, table.name
    # The same command and database do store a valid definition: the refusals above were real.
    valid = flowdb_cli("deploy", str(EXAMPLES / "simple-report.yaml"), env=db.cli_env())
    assert valid.returncode == 0, valid.stderr
    with db.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(process_definitions)).scalar_one() == 1


EXAMPLE_FILES = sorted(path for path in EXAMPLES.glob("*.yaml") if path.name != "agents.yaml")
NOT_RUNNABLE = sorted(set(STEP_TYPES) - set(RUNNABLE.names()))


def steps_of_types(path: Path, types: list[str]) -> list[tuple[int, int, str]]:
    """(line, col, type) of each step of one of `types`, found in the text: where its `- ` item starts."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)type: *['\"]?([a-z_]+)['\"]? *$", line)
        if not match or match[2] not in types:
            continue
        indent = len(match[1])
        start = next(i for i in range(number, -1, -1) if lines[i][indent - 2:indent] == "- ")
        found.append((start + 1, indent + 1, match[2]))
    return found


def test_the_examples_that_cannot_run_yet_are_known() -> None:
    # conditional-flow and reviewed-report use human_approval, which has no handler yet.
    if "human_approval" in NOT_RUNNABLE:
        for name in ("conditional-flow.yaml", "reviewed-report.yaml"):
            assert steps_of_types(EXAMPLES / name, ["human_approval"]), name


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda path: path.stem)
def test_spec_example_validates(path: Path) -> None:
    result = flowdb_cli("validate", str(path), env=plain_env())
    not_runnable = steps_of_types(path, NOT_RUNNABLE)
    if not not_runnable:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{path}: ok ("), result.stdout
        assert result.stderr == ""
        return
    assert result.returncode == 1, result.stdout
    lines = problem_lines(path, result)
    assert len(lines) == len(not_runnable), "\n".join(lines)
    for line_no, col, step_type in not_runnable:
        prefix = f"{path}:{line_no}:{col}: "
        assert any(line.startswith(prefix) and f"type {step_type!r}" in line and "cannot run yet" in line
                   for line in lines), f"expected {prefix}... {step_type} cannot run yet, got:\n" + "\n".join(lines)
