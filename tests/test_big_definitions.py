"""Definitions of any reasonable size validate in seconds and never crash (issue 20, points 11 and 13).

A 1,000-step chain once crashed the recursive cycle search (a traceback from `flowdb validate`, a 500
from the API) and a 10,000-step definition without a single alias was refused as a "billion laughs".
Now the checks are iterative, the YAML node cap counts only what aliases add, and plain size has
limits of its own (bytes, steps, nesting), each with its own message. The CLI runs as a real process;
the API is the real server (tests/apiserver.py) on both databases.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from bench.definitions import chain, fan
from flowdb.definitions import MAX_STEPS, CompiledStep, _Precedence, parse_definition
from flowdb.errors import DefinitionError
from flowdb.models import AgentTask
from flowdb.yamlsafe import MAX_ALIASES, MAX_BYTES, MAX_DEPTH, MAX_EXPANDED_NODES, load_yaml

from apiserver import ApiServer
from conftest import ROOT, flowdb_cli

Result = subprocess.CompletedProcess[str]
YAML = {"content-type": "application/yaml"}
CLI_SECONDS = 300  # a bound for a hang, far above the seconds these take


def plain_env() -> dict[str, str]:
    """The environment without FLOWDB_ settings (no agents file, database or Redis from outside)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("FLOWDB_")}


def validate(*paths: Path) -> Result:
    """`flowdb validate` without an agents file: its warning (one line per valid file that names
    agents, tests/test_unservable.py) is left out of stderr here."""
    result = flowdb_cli("validate", *map(str, paths), env=plain_env(), timeout=CLI_SECONDS)
    kept = [line for line in result.stderr.splitlines(keepends=True) if ": warning: no agents file found" not in line]
    result.stderr = "".join(kept)
    return result


def refused(path: Path, result: Result) -> list[str]:
    """The problems `flowdb validate` printed for a file it refused: FILE:LINE:COL lines, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith(f"{path}:") for line in lines), result.stderr
    return lines


def problems_of(text: str, filename: str = "big.yaml") -> list[str]:
    with pytest.raises(DefinitionError) as caught:
        parse_definition(text, filename)
    return [str(problem) for problem in caught.value.problems]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("big")
    texts = {"chain-1000": chain(1000), "chain-10000": chain(10_000), "fan-10000": fan(10_000),
             "cycle-10000": chain(10_000, cycle=True)}
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(text, encoding="utf-8")
    return paths


# --- the CLI -------------------------------------------------------------------------------------

def test_a_chain_of_1000_steps_validates(files: dict[str, Path]) -> None:
    result = validate(files["chain-1000"])
    assert (result.returncode, result.stderr) == (0, ""), result.stderr[-3000:]
    assert result.stdout == f"{files['chain-1000']}: ok (chain-1000, 1000 steps)\n"


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["chain-10000", "fan-10000"])
def test_10000_steps_validate(files: dict[str, Path], shape: str) -> None:
    assert MAX_STEPS == 10_000
    assert files[shape].stat().st_size > 1_000_000  # past the old 1 MB limit, under MAX_BYTES
    result = validate(files[shape])
    assert (result.returncode, result.stderr) == (0, ""), result.stderr[-3000:]
    assert result.stdout == f"{files[shape]}: ok ({shape}, 10000 steps)\n"


@pytest.mark.slow
def test_a_cycle_of_10000_steps_is_reported_where_it_closes(files: dict[str, Path]) -> None:
    path = files["cycle-10000"]
    lines = refused(path, validate(path))
    assert lines == [f"{path}:8:20: steps form a cycle: s0 -> s1 -> s2 -> s3 -> s4 -> ... (9990 more steps) -> "
                     "s9995 -> s9996 -> s9997 -> s9998 -> s9999 -> s0 (each runs after the one before it); "
                     "remove one of these dependencies"]


def test_a_short_cycle_is_shown_whole() -> None:
    text = chain(11, cycle=True, name="eleven")
    steps = " -> ".join(f"s{i}" for i in range(11))
    assert problems_of(text) == [f"big.yaml:8:20: steps form a cycle: {steps} -> s0 (each runs after the one "
                                 "before it); remove one of these dependencies"]


def test_a_template_reading_a_later_step_is_refused_in_a_long_chain() -> None:
    # s1500 reads s2500, which runs after it; the last step reads s0, which runs long before it (fine).
    text = chain(3000).replace('"Go on from {{ steps.s1499.output }}"', '"Go on from {{ steps.s2500.output }}"')
    line = text.splitlines().index("    - id: s1500") + 4  # its message
    assert problems_of(text) == [f"big.yaml:{line}:16: step 's1500' uses steps.s2500 but does not run after it; "
                                 "add 's2500' to its depends_on"]


@pytest.mark.slow
def test_unknown_dependencies_among_many_steps_list_a_few_names_and_stay_quick() -> None:
    # Every one of 2,000 steps depends on a misspelt step: each is reported, listing 20 known steps,
    # and "did you mean" stops when its budget is spent (instead of minutes of comparisons).
    lines = ["process:", "  name: typos", "  steps:"]
    for i in range(2000):
        lines.append(f'    - {{id: step{i}, type: agent_task, agent: w, message: "x", depends_on: [stepp{i}]}}')
    began = time.monotonic()
    found = problems_of("\n".join(lines) + "\n")
    assert time.monotonic() - began < 60  # a hang bound: it takes about a second
    known = ", ".join(f"step{i}" for i in range(20)) + ", ... (1980 more)"
    assert len(found) == 2000
    first, last = lines[3].index("stepp") + 1, lines[-1].index("stepp") + 1
    assert found[0] == (f"big.yaml:4:{first}: step 'step0' depends on unknown step 'stepp0' (did you mean "
                        f"'step0'?); known steps: {known}")
    assert found[-1] == (f"big.yaml:2003:{last}: step 'step1999' depends on unknown step 'stepp1999'; known steps: "
                         f"{known}")


def test_precedence_agrees_with_a_plain_search_on_random_graphs() -> None:
    rng = random.Random(20)
    for _ in range(30):
        count = rng.randint(2, 60)
        ids = [f"n{i}" for i in range(count)]
        rng.shuffle(ids)  # file order is not the topological order
        steps = {sid: CompiledStep(AgentTask(id=sid, type="agent_task", agent="a", message="m")) for sid in ids}
        for later in range(1, count):  # edges only from earlier to later in `rank`: no cycle
            for earlier in rng.sample(range(later), min(later, rng.randint(0, 3))):
                steps[f"n{later}"].parents.append(f"n{earlier}")
                steps[f"n{earlier}"].children.append(f"n{later}")
        order = _Precedence(steps)
        for sid in steps:
            ancestors: set[str] = set()
            todo = list(steps[sid].parents)
            while todo:
                parent = todo.pop()
                if parent not in ancestors:
                    ancestors.add(parent)
                    todo.extend(steps[parent].parents)
            assert {ref for ref in steps if order.runs_before(ref, sid)} == ancestors, sid


# --- YAML and size limits --------------------------------------------------------------------------

def test_a_large_document_without_aliases_is_not_a_billion_laughs() -> None:
    items = 3 * MAX_EXPANDED_NODES
    data, _ = load_yaml("a: [" + ", ".join(["x"] * items) + "]\n", "big.yaml")
    assert data == {"a": ["x"] * items}


def test_aliases_may_add_up_to_the_node_cap() -> None:
    def doc(items: int, uses: int) -> str:
        return f"a: &a [{', '.join(['x'] * items)}]\nb: [{', '.join(['*a'] * uses)}]\n"

    # Each use of the 200-node anchor (the list and its 199 items) adds 200 nodes: 100 uses add 20,000.
    data, positions = load_yaml(doc(199, 100), "a.yaml")
    assert len(data["b"]) == 100 and data["b"][99] == ["x"] * 199
    assert positions.value_at(("b", 99, 198)) == (1, 8 + 3 * 198)  # where the anchor's item is written
    with pytest.raises(DefinitionError) as caught:
        load_yaml(doc(200, 100), "a.yaml")
    assert [str(p) for p in caught.value.problems] == [
        f"a.yaml:2:4: YAML aliases expand too far: this value expands to 20101 nodes, 20100 of them through "
        f"aliases, and aliases may add at most {MAX_EXPANDED_NODES} (a 'billion laughs'?); write them out"]


def test_a_billion_laughs_is_refused_quickly() -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in "bcdefghi":
        before = chr(ord(level) - 1)
        lines.append(f"{level}: &{level} [{', '.join([f'*{before}'] * 9)}]")
    began = time.monotonic()
    with pytest.raises(DefinitionError) as caught:
        load_yaml("\n".join(lines) + "\n", "bomb.yaml")
    assert time.monotonic() - began < 5  # a hang bound: it takes milliseconds
    # e is the first value past the cap: 9 uses of d (7,381 nodes each) add 66,429 nodes.
    assert [str(p) for p in caught.value.problems] == [
        "bomb.yaml:5:4: YAML aliases expand too far: this value expands to 66430 nodes, 66429 of them through "
        f"aliases, and aliases may add at most {MAX_EXPANDED_NODES} (a 'billion laughs'?); write them out"]


def test_recursive_aliases_and_too_many_aliases_are_refused() -> None:
    with pytest.raises(DefinitionError) as caught:
        load_yaml("a:\n  b: &loop\n    - c: [1, *loop]\n", "loop.yaml")
    assert [str(p) for p in caught.value.problems] == [
        "loop.yaml:2:6: recursive YAML alias: this anchor is used inside its own value; write the value out instead"]
    uses = ", ".join(["*a"] * (MAX_ALIASES + 1))
    with pytest.raises(DefinitionError) as caught:
        load_yaml(f"a: &a 1\nb: [{uses}]\n", "many.yaml")
    assert [str(p) for p in caught.value.problems] == [
        f"many.yaml:1:4: YAML aliases are used more than {MAX_ALIASES} times (this anchor is one of those used); "
        "write the values out instead"]


def test_an_empty_value_is_reported_at_its_key() -> None:
    # libyaml gives a plain scalar the style '' where PyYAML gives None: an empty value still points at its key.
    text = "process:\n  name: x\n  steps:\n    - id: a\n      type: agent_task\n      agent:\n      message: hi\n"
    assert problems_of(text, "empty.yaml") == ["empty.yaml:6:7: agent in step 'a': expected text, got nothing (null)"]


def test_nesting_is_bounded_even_through_aliases() -> None:
    # The document's mapping is one level: 99 lists inside it make 100, one more is too many.
    data, _ = load_yaml("a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n", "deep.yaml")
    assert data is not None
    with pytest.raises(DefinitionError) as caught:
        load_yaml("a: " + "[" * MAX_DEPTH + "]" * MAX_DEPTH + "\n", "deep.yaml")
    assert [str(p) for p in caught.value.problems] == [
        f"deep.yaml:1:{3 + MAX_DEPTH}: the YAML is nested more than {MAX_DEPTH} levels deep; flatten it"]
    # 60 levels under an anchor, used 50 levels deep: fine in the text, too deep once expanded.
    text = "a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 50 + "*a" + "]" * 50 + "\n"
    with pytest.raises(DefinitionError) as caught:
        load_yaml(text, "deep.yaml")
    assert [str(p) for p in caught.value.problems] == [
        f"deep.yaml:2:13: the YAML is nested more than {MAX_DEPTH} levels deep once its aliases are expanded; "
        "flatten it"]


def test_nesting_100000_levels_deep_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text("process: " + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    assert refused(path, validate(path)) == [
        f"{path}:1:{10 + MAX_DEPTH - 1}: the YAML is nested more than {MAX_DEPTH} levels deep; flatten it"]


@pytest.mark.slow
def test_a_file_past_the_byte_limit_is_refused_with_its_own_message(tmp_path: Path) -> None:
    body = chain(3, name="padded")
    at_limit = tmp_path / "at-limit.yaml"
    at_limit.write_text(body + "#" * (MAX_BYTES - len(body) - 1) + "\n", encoding="utf-8")
    assert at_limit.stat().st_size == MAX_BYTES
    past = tmp_path / "past-limit.yaml"
    past.write_text(body + "#" * (MAX_BYTES - len(body)) + "\n", encoding="utf-8")
    accepted = validate(at_limit)
    assert (accepted.returncode, accepted.stderr) == (0, "")
    assert accepted.stdout == f"{at_limit}: ok (padded, 3 steps)\n"
    assert refused(past, validate(past)) == [
        f"{past}:1:1: the file is {MAX_BYTES + 1} bytes, larger than the limit of {MAX_BYTES} bytes; shorten it "
        "or split the process into smaller ones"]


@pytest.mark.slow
def test_more_than_max_steps_is_refused_with_its_own_message(tmp_path: Path) -> None:
    lines = ["process:", "  name: too-many", "  steps:"]
    lines += [f'    - {{id: s{i}, type: agent_task, agent: w, message: "x"}}' for i in range(MAX_STEPS + 1)]
    path = tmp_path / "too-many.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert refused(path, validate(path)) == [
        f"{path}:3:3: the process has {MAX_STEPS + 1} steps, more than the limit of {MAX_STEPS}; split it into "
        "smaller processes"]


@pytest.mark.slow
def test_numbers_that_crashed_validation_are_read_or_refused(tmp_path: Path) -> None:
    def process(version: str) -> str:
        return f"process:\n  name: numbers\n  version: {version}\n  steps:\n" \
               '    - {id: a, type: agent_task, agent: w, message: "x"}\n'

    leading_zero = tmp_path / "leading-zero.yaml"  # was int('09', 8): ValueError; YAML 1.2 reads 9
    leading_zero.write_text(process("09"), encoding="utf-8")
    assert parse_definition(process("09")).process.version == 9
    assert parse_definition(process("017")).process.version == 17  # not octal 15 (YAML 1.1)
    cases = {"long": ("1" * 5000, "3:12: bad YAML value '1111111111111111111111111111111111111111': the number "
                                  "is 5000 characters long, more than 100; put it in quotes if it is text"),
             "int-tag": ("!!int abc", "3:12: bad YAML value 'abc': invalid literal for int() with base 10: 'abc'"),
             "bool-tag": ("!!bool maybe", "3:12: bad YAML value 'maybe': expected true or false")}
    paths = {}
    for name, (version, _) in cases.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(process(version), encoding="utf-8")
    accepted = validate(leading_zero)
    assert (accepted.returncode, accepted.stderr) == (0, "")
    assert accepted.stdout == f"{leading_zero}: ok (numbers, 1 steps)\n"
    result = validate(*paths.values())
    assert (result.returncode, result.stdout) == (1, "") and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [f"{paths[name]}:{problem}" for name, (_, problem) in cases.items()]


def test_an_unexpected_error_is_one_line_per_file(tmp_path: Path) -> None:
    # A bug in flowdb itself (simulated: the loader raises) is still one line naming the file, exit 1.
    path = tmp_path / "any.yaml"
    path.write_text(chain(2), encoding="utf-8")
    script = ("import sys, flowdb.cli as cli\n"
              "def broken(path):\n    raise RuntimeError('boom\\non two lines')\n"
              "cli.load_definition_file = broken\n"
              "sys.argv = ['flowdb', 'validate', sys.argv[1]]\n"
              "cli.main()\n")
    result = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                            env=plain_env(), cwd=ROOT, timeout=CLI_SECONDS)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"{path}: flowdb could not check this file (RuntimeError: boom on two lines); "
                             "please report it\n")


# --- the API -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_api_takes_big_definitions_and_refuses_a_long_cycle(api_server: ApiServer) -> None:
    with httpx.Client(base_url=api_server.url, headers=api_server.auth("admin"), timeout=CLI_SECONDS) as http:
        created = http.post("/v1/definitions", content=chain(1000), headers=YAML)  # was a 500 (RecursionError)
        assert created.status_code == 201, created.text
        assert (created.json()["name"], created.json()["version"]) == ("chain-1000", 1)
        cycle = http.post("/v1/definitions?filename=cycle.yaml", content=chain(MAX_STEPS, cycle=True), headers=YAML)
        assert cycle.status_code == 422, cycle.text
        assert [e["location"] for e in cycle.json()["errors"]] == [
            "cycle.yaml:8:20: steps form a cycle: s0 -> s1 -> s2 -> s3 -> s4 -> ... (9990 more steps) -> s9995 -> "
            "s9996 -> s9997 -> s9998 -> s9999 -> s0 (each runs after the one before it); remove one of these "
            "dependencies"]
        assert http.get("/v1/definitions").json()["items"][0]["name"] == "chain-1000"  # the cycle wrote nothing
        assert len(http.get("/v1/definitions").json()["items"]) == 1


@pytest.mark.slow
def test_healthz_answers_while_a_10000_step_definition_is_posted(api_server: ApiServer) -> None:
    # Parsing and compiling 10,000 steps takes seconds: in a worker thread, so the event loop keeps
    # answering. Before, /healthz waited for the whole parse.
    text = fan(MAX_STEPS)
    assert len(text.encode()) > 1_048_576  # past the old default body limit too
    answer: list[httpx.Response] = []

    def post() -> None:
        with httpx.Client(base_url=api_server.url, headers=api_server.auth("admin"), timeout=CLI_SECONDS) as http:
            answer.append(http.post("/v1/definitions", content=text, headers=YAML))

    poster = threading.Thread(target=post)
    probes: list[float] = []
    with httpx.Client(base_url=api_server.url, timeout=CLI_SECONDS) as http:
        poster.start()
        while poster.is_alive():
            began = time.monotonic()
            health = http.get("/healthz")
            if poster.is_alive():  # answered while the definition was being parsed or stored
                probes.append(time.monotonic() - began)
            assert health.status_code == 200, health.text
            time.sleep(0.05)
    poster.join()
    assert answer[0].status_code == 201, answer[0].text
    assert (answer[0].json()["name"], answer[0].json()["version"]) == ("fan-10000", 1)
    assert len(probes) >= 5, probes
    assert max(probes) < 2.0, probes  # a hang bound: the parse alone takes several seconds
    with httpx.Client(base_url=api_server.url, headers=api_server.auth("operator"), timeout=30) as http:
        stored = http.get("/v1/definitions/fan-10000/versions/1").json()
    assert len(stored["parsed"]["steps"]) == MAX_STEPS and stored["source"] == text
