"""Templates are bounded (issue 20, points 3-5): compiling evaluates nothing, a render stops at its output,
value, time and memory limits, and the sandbox holds against the published Jinja escapes.

Pure Python except where a real process is the point: `flowdb validate` and `flowdb serve` run under an
address-space limit (like `ulimit -v 2000000`), and the memory test renders in a limited child process.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import flowdb.expressions as expressions
from flowdb.bounded import BoundedRunner, Result
from flowdb.errors import TemplateError, TemplateLimitError, TemplateTimeout
from flowdb.expressions import StepView, TemplateLimits, compile_condition, compile_template, limits, set_limits
from flowdb.settings import Settings
from flowdb.tokens import create_token

from apiserver import serve_process
from conftest import Database, address_space_limit, flowdb_cli

ULIMIT_V = 2_000_000 * 1024  # `ulimit -v 2000000` (KiB)
LIMIT = "past the 1,000,000-byte limit (FLOWDB_TEMPLATE_MAX_BYTES)"
LIMIT_RE = re.escape(LIMIT)
NESTED_LOOPS = ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
                "{% endfor %}{% endfor %}{% endfor %}")


@pytest.fixture(autouse=True)
def default_limits() -> Iterator[None]:
    set_limits(TemplateLimits())
    yield
    set_limits(TemplateLimits())


def render(source: str, context: dict[str, Any] | None = None) -> str:
    return compile_template(source).render(context if context is not None else {})


def failure(source: str, context: dict[str, Any] | None = None) -> TemplateError:
    with pytest.raises(TemplateError) as caught:
        render(source, context)
    return caught.value


# -- The sandbox holds (point 5: CVE-2025-27516 and the escapes before it) ------------------------------------

SECRET = "flowdb-secret-7f3a91"
ESCAPES = [
    # CVE-2025-27516: |attr('format') handed out str.format unsandboxed (Jinja2 < 3.1.6)
    "{{ ('{0.__init__.__globals__[os].environ[FLOWDB_SMTP_PASSWORD]}'|attr('format'))(cycler(1)) }}",
    "{{ ('{a.__init__.__globals__[os].environ}'|attr('format_map'))({'a': joiner()}) }}",
    # CVE-2016-10745 / CVE-2019-10906: str.format and format_map reading attributes
    "{{ '{0.__init__.__globals__[os].environ}'.format(cycler(1)) }}",
    "{{ '{a.__init__.__globals__[os].environ}'.format_map({'a': namespace()}) }}",
    "{{ '{0.__class__.__mro__[1].__subclasses__}'.format(inputs) }}",
    # CVE-2024-56326: a stored reference to str.format, called later
    "{% set f = '{0.__init__.__globals__[os].environ}'.format %}{{ f(cycler(1)) }}",
    "{{ (['{0.__init__.__globals__[os].environ}']|map(attribute='format')|first)(joiner()) }}",
    # |attr to dunder attributes, .__class__ and friends
    "{{ cycler(1)|attr('__init__')|attr('__globals__') }}",
    "{{ (inputs|attr('__class__')).__mro__ }}",
    "{{ inputs.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ steps.a.__class__ }}",
    "{% for x in [1] %}{{ loop.__class__.__init__.__globals__ }}{% endfor %}",
    # cycler / joiner / namespace (the classes and their instances), self, lipsum
    "{{ cycler.__init__.__globals__.os.environ }}",
    "{{ cycler(1).__init__.__globals__.os.environ }}",
    "{{ cycler(1).next.__func__.__globals__ }}",
    "{{ joiner().__init__.__globals__.os.environ }}",
    "{{ namespace.__init__.__globals__.os.environ }}",
    "{{ namespace(a=1)._Namespace__attrs }}",
    "{{ self.__init__.__globals__ }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.environ }}",
    "{{ lipsum.__globals__.os.environ }}",
    "{{ '%s' % cycler(1).__init__.__globals__ }}",
    "{{ 'x'.format.__globals__ }}",
    "{{ dict.fromkeys }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_fail_with_a_template_error_and_leak_nothing(source: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWDB_SMTP_PASSWORD", SECRET)
    context = {"inputs": {"topic": "x"}, "steps": {"a": StepView.of({"id": "a", "output": {}})}, "process": {}}
    with pytest.raises(TemplateError) as caught:  # not any other exception
        render(source, context)
    assert SECRET not in str(caught.value)
    assert "environ" not in str(caught.value).split("failed: ", 1)[1]


def test_the_sandbox_refuses_methods_outside_its_allowlist() -> None:
    assert str(failure("{{ 'a'.encode() }}")) == (
        "template \"{{ 'a'.encode() }}\" failed: access to attribute 'encode' of 'str' object is unsafe.")
    assert str(failure("{{ 1 .to_bytes(10000000000, 'big') }}")).endswith(
        "failed: access to attribute 'to_bytes' of 'int' object is unsafe.")
    assert str(failure("{{ 'x'.translate({120: 'y'}) }}")).endswith(
        "failed: access to attribute 'translate' of 'str' object is unsafe.")
    assert str(failure("{{ dict.fromkeys(range(3)) }}")).endswith(
        "failed: access to attribute 'fromkeys' of 'type' object is unsafe.")
    assert str(failure("{{ lipsum(3) }}")) == "template '{{ lipsum(3) }}' failed: 'lipsum' is undefined"


# -- Compiling evaluates nothing (point 4) -------------------------------------------------------------------

@pytest.mark.parametrize("source, folded, rendered", [
    ("{{ 'ab' * 3 }}", "ababab", "ababab"),
    ("{{ 'x'|upper }}", "'X'", "X"),
    ("{{ [1, 2]|join('+') }}", "'1+2'", "1+2"),
    ("{{ 'a' ~ 'b' }}", "'ab'", "ab"),
    ("{% if 1 + 1 == 2 %}two{% endif %}", "True", "two"),
    ("{{ 'q' * 2 if 3 > 2 else 'r' }}", "'qq'", "qq"),
    ("{% autoescape 1 + 1 == 2 %}{{ '<' }}{% endautoescape %}", "&lt;", "&lt;"),
])
def test_compiling_folds_no_constant(source: str, folded: str, rendered: str) -> None:
    code = expressions._ENV.compile(source, raw=True)
    assert folded not in code
    assert render(source) == rendered


def test_a_condition_is_compiled_without_evaluating_it() -> None:
    code = expressions._ENV.compile("{% set result = 'ab' * 3 == 'ababab' %}", raw=True)
    assert "call_binop(context, '*', 'ab', 3)" in code and "result = True" not in code
    condition = compile_condition("{{ 'a' * 10000000000 }} == 'b'")
    with pytest.raises(TemplateLimitError) as caught:
        condition.evaluate({})
    assert str(caught.value) == ("condition \"{{ 'a' * 10000000000 }} == 'b'\" failed: '*' would build a value of "
                                 f"10,000,000,000 characters, {LIMIT}")


def test_templates_that_cannot_be_compiled_say_why() -> None:
    with pytest.raises(ValueError, match=r"^template does not parse: it is nested too deeply$"):
        compile_template("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}")
    with pytest.raises(ValueError, match=r"^template does not parse: a number in it has too many digits$"):
        compile_template("{{ " + "9" * 5000 + " }}")
    with pytest.raises(ValueError, match=r"^condition is not a valid expression \(it is nested too deeply\)$"):
        compile_condition("1" + " + 1" * 20000)
    # Code is generated on first render, not at compile: what the generator cannot take is refused
    # when parsing (Python's own indentation limit broke at 100 nested {% if %} before).
    for blocks in (21, 40, 100):
        with pytest.raises(ValueError, match=rf"^template does not parse: its {{% %}} blocks nest {blocks} deep, "
                                             "more than 20$"):
            compile_template("{% if x %}" * blocks + "y" + "{% endif %}" * blocks)
    with pytest.raises(ValueError, match=r"^template does not parse: it is nested too deeply$"):
        compile_template("{{ x" + "|upper" * 160 + " }}")  # the code generator gives up at about 190
    assert compile_template("{{ x" + "|upper" * 140 + " }}").render({"x": "a"}) == "A"
    assert compile_template("{% for a in x %}" * 20 + "y" + "{% endfor %}" * 20).render({"x": [1]}) == "y"
    assert compile_template("{% if x %}" * 20 + "y" + "{% endif %}" * 20).render({"x": True}) == "y"


HOSTILE_DEFINITIONS = {
    "repeat": "message: \"{{ 'a' * 10000000000 }}\"",
    "tower": "message: \"{{ 9 ** 9 ** 9 ** 9 }} {{ 9 ** 99999999 % 7 }}\"",  # the second one takes minutes folded
    "range": "message: \"{{ range(10**9)|list }}\"",
    "center": "message: \"{{ 'x'|center(9999999999) }}\"",
    "if": "message: \"{% if 'x'*10**10 %}x{% endif %}\"",
    "condition": "message: hi\n      condition: \"'a' * 10000000000 == 'b'\"",
}


def _definition(name: str, step: str) -> str:
    return f"process:\n  name: {name}\n  steps:\n    - id: a\n      type: agent_task\n      agent: noop\n      {step}\n"


GATEWAY = textwrap.dedent("""\
    process:
      name: gateway
      steps:
        - {id: a, type: agent_task, agent: noop, message: hi}
        - id: g
          type: gateway
          gateway_type: exclusive
          depends_on: [a]
          routes:
            - {condition: "{{ 'a' * 10000000000 }} == 'b'", next: b}
            - {default: true, next: c}
        - {id: b, type: agent_task, agent: noop, message: hi}
        - {id: c, type: agent_task, agent: noop, message: "{% autoescape 'a' * 10000000000 %}x{% endautoescape %}"}
      output:
        on_success:
          - {type: log, message: "{{ 'a' * 10000000000 }}"}
    """)


def _hostile_files(folder: Path) -> dict[str, str]:
    texts = {name: _definition(name, step) for name, step in HOSTILE_DEFINITIONS.items()}
    texts["gateway"] = GATEWAY
    for name, text in texts.items():
        (folder / f"{name}.yaml").write_text(text)
    return texts


@pytest.mark.slow
def test_validate_evaluates_no_template_under_a_memory_limit(tmp_path: Path) -> None:
    texts = _hostile_files(tmp_path)
    files = [str(tmp_path / f"{name}.yaml") for name in texts]
    started = time.monotonic()
    result = flowdb_cli("validate", *files, memory_limit=ULIMIT_V, timeout=60)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    # nothing but the warning that no agents file was found (tests/test_unservable.py)
    assert all(": warning: no agents file found" in line for line in result.stderr.splitlines()), result.stderr
    steps = {"gateway": 4}
    assert result.stdout.splitlines() == [f"{tmp_path / name}.yaml: ok ({name}, {steps.get(name, 1)} steps)"
                                          for name in texts]
    assert elapsed < 30  # compiled, not evaluated: the folded power alone takes minutes


@pytest.mark.slow
def test_api_accepts_the_definitions_without_evaluating_them(db: Database, tmp_path: Path) -> None:
    texts = _hostile_files(tmp_path)
    _, token = create_token(db.engine, "admin@example.com", "admin")
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/yaml"}
    with serve_process(db.cli_env(), tmp_path / "serve.log", preexec_fn=address_space_limit(ULIMIT_V)) as served:
        for name, text in texts.items():
            started = time.monotonic()
            response = httpx.post(served.url + "/v1/definitions", content=text, headers=headers, timeout=60)
            elapsed = time.monotonic() - started
            assert response.status_code == 201, (name, response.text, served.output()[-2000:])
            assert (response.json()["name"], response.json()["version"]) == (name, 1)
            assert elapsed < 10, name
        assert httpx.get(served.url + "/healthz", timeout=10).status_code == 200
        assert served.proc.poll() is None


# -- Bounded values and output (point 3) ---------------------------------------------------------------------

@pytest.mark.parametrize("source, reason", [
    ("{{ 'a' * 10000000000 }}", f"'*' would build a value of 10,000,000,000 characters, {LIMIT}"),
    ("{{ [0] * 10000000 }}", f"'*' would build a value of 10,000,000 items, {LIMIT}"),
    ("{{ ('a' * 1000000) + 'b' }}", f"'+' would build a value of 1,000,001 characters, {LIMIT}"),
    ("{{ ('a' * 1000000) ~ 'b' }}", f"'~' would build a value of 1,000,001 characters, {LIMIT}"),
    ("{{ 9 ** (9 ** (9 ** 9)) }}", "'**' would make a number of about 1,228,093,894 bits; numbers in templates are "
                                   "limited to 65,536 bits (about 19,700 digits)"),
    ("{{ 2 ** 100000 }}", "'**' would make a number of about 100,000 bits; numbers in templates are limited to "
                          "65,536 bits (about 19,700 digits)"),
    ("{{ range(10**9)|list }}", "range() would count 1,000,000,000 numbers; a range in a template counts at most "
                                "100,000"),
    ("{{ 'x'|center(9999999999) }}", f"|center would build a value of 9,999,999,999 characters, {LIMIT}"),
    ("{{ 'x'.center(9999999999) }}", f"str.center would build a value of 9,999,999,999 characters, {LIMIT}"),
    ("{{ 'x'.ljust(9999999999) }}", f"str.ljust would build a value of 9,999,999,999 characters, {LIMIT}"),
    ("{{ 'x'.rjust(9999999999, '-') }}", f"str.rjust would build a value of 9,999,999,999 characters, {LIMIT}"),
    ("{{ '7'.zfill(9999999999) }}", f"str.zfill would build a value of 9,999,999,999 characters, {LIMIT}"),
    ("{{ ('\t' * 1000).expandtabs(10000000) }}",
     f"str.expandtabs would build a value of 10,000,001,000 characters, {LIMIT}"),
    ("{{ ('a' * 1000).replace('a', 'b' * 100000) }}",
     f"str.replace would build a value of 100,000,000 characters, {LIMIT}"),
    ("{{ ('a' * 100000)|replace('a', 'b' * 100) }}", f"|replace would build a value of 10,000,000 characters, {LIMIT}"),
    ("{{ ('x' * 1000000).join(['a'] * 1000) }}", f"str.join would build a value of 999,001,000 characters, {LIMIT}"),
    ("{{ (['a'] * 10000)|join('x' * 100000) }}", f"|join would build a value of 999,910,000 characters, {LIMIT}"),
    ("{{ '%*s' % (10000000000, 'a') }}", f"'%' formatting would build a value of 10,000,000,003 characters, {LIMIT}"),
    ("{{ '%10000000000s' % 'a' }}", f"'%' formatting would build a value of 10,000,000,013 characters, {LIMIT}"),
    ("{{ '%.1000000000f' % 1.0 }}", f"'%' formatting would build a value of 2,000,000,673 characters, {LIMIT}"),
    ("{{ ('%(a)s' * 100000) % {'a': 'x' * 1000} }}",
     f"'%' formatting would build a value of 1,001,000 characters, {LIMIT}"),
    ("{{ '{:>10000000000}'.format(1) }}", f"str.format would build a value of 10,000,000,015 characters, {LIMIT}"),
    ("{{ '{:.1000000000f}'.format(1.0) }}", f"str.format would build a value of 2,000,000,675 characters, {LIMIT}"),
    ("{{ '{0}{0}{0}{0}{0}{0}'.format('x' * 200000) }}",
     f"str.format would build a value of 1,000,018 characters, {LIMIT}"),
    ("{{ '%10000000000s'|format('a') }}", f"|format would build a value of 10,000,000,013 characters, {LIMIT}"),
    ("{{ 'x'|indent(10000000000, true) }}", f"|indent would build a value of 20,000,000,001 characters, {LIMIT}"),
    ("{{ ('a b ' * 100000)|wordwrap(1, wrapstring='x' * 1000) }}",
     f"|wordwrap would build a value of 400,401,000 characters, {LIMIT}"),
    ("{{ [1]|tojson(indent=10000000000) }}", f"|tojson would build a value of 20,000,000,008 characters, {LIMIT}"),
    ("{{ [1]|batch(10000000000, 'x')|list }}", f"|batch would build a value of 10,000,000,000 items, {LIMIT}"),
    ("{{ [1]|slice(10000000000)|list }}", f"|slice would build a value of 10,000,000,000 lists, {LIMIT}"),
    ("{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}", "the rendered text passed the 1,000,000-byte "
                                                                 "limit (FLOWDB_TEMPLATE_MAX_BYTES)"),
    ("{% set x %}{% for i in range(100000) %}{{ 'y' * 1000000 }}{% endfor %}{% endset %}{{ x|length }}",
     "the output of a macro or block passed the 1,000,000-byte limit (FLOWDB_TEMPLATE_MAX_BYTES)"),
    ("{% macro m(s) %}{% for i in range(100000) %}{{ s }}{% endfor %}{% endmacro %}{{ m('z' * 100)|length }}",
     "the output of a macro or block passed the 1,000,000-byte limit (FLOWDB_TEMPLATE_MAX_BYTES)"),
])
def test_each_amplifying_operation_is_refused_before_it_runs(source: str, reason: str) -> None:
    error = failure(source)
    assert type(error) is TemplateLimitError
    assert str(error) == f"template {source!r} failed: {reason}"


@pytest.mark.parametrize("source, pattern", [
    # a value that repeats the same parts: [x, x] nested 60 times is 2**60 parts as text or for == / hash()
    ("{% set ns = namespace(a=[1]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}",
     rf"rendering a value as JSON would build a value of [\d,]+ characters, {LIMIT_RE}"),
    ("{% set ns = namespace(a=[1], b=[1]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}"
     "{% set ns.b = [ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
     rf"comparing would walk 13,835,058,055,282,163,706 parts of a value that repeats the same parts, {LIMIT_RE}"),
    ("{% set ns = namespace(a=(1,)) %}{% for i in range(60) %}{% set ns.a = (ns.a, ns.a) %}{% endfor %}"
     "{{ {ns.a: 1} }}",
     rf"comparing would walk 13,835,058,055,282,163,706 parts of a value that repeats the same parts, {LIMIT_RE}"),
    ("{% set ns = namespace(a=[1]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}"
     "{{ ns.a|string }}", rf"\|string would build a value of [\d,]+ characters, {LIMIT_RE}"),
    ("{% set ns = namespace(a=[1]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}"
     "{{ [ns.a]|unique|list }}",
     rf"\|unique would walk 13,835,058,055,282,163,710 parts of a value that repeats the same parts, {LIMIT_RE}"),
    ("{% set ns = namespace(a=(1,)) %}{% for i in range(60) %}{% set ns.a = (ns.a, ns.a) %}{% endfor %}"
     "{{ dict([(ns.a, 1)]) }}",
     rf"calling dict\(\) would walk [\d,]+ parts of a value that repeats the same parts, {LIMIT_RE}"),
    ("{{ ([[1] * 100000] * 100000)|sum(start=[]) }}", rf"\|sum would build a value of [\d,]+ items, {LIMIT_RE}"),
    ("{% set x = 10 ** 4000 %}{{ x * x * x * x * x * x }}",
     r"'\*' would make a number of about 66,439 bits; numbers in templates are limited to 65,536 bits "
     r"\(about 19,700 digits\)"),
])
def test_values_that_repeat_their_parts_are_measured_before_use(source: str, pattern: str) -> None:
    error = failure(source)
    assert type(error) is TemplateLimitError
    assert re.fullmatch(f"template {re.escape(repr(source))} failed: {pattern}", str(error)), str(error)


@pytest.mark.slow
def test_a_large_value_from_the_instance_is_still_compared_and_sorted() -> None:
    items = [{"name": f"item {i}", "tags": ["a", "b"]} for i in range(60000)]  # ~1.7 MB as text, no sharing
    context = {"inputs": {"items": items, "same": [dict(i) for i in items]}}
    assert render("{{ inputs['items'] == inputs.same }} {{ (inputs['items']|sort(attribute='name'))[0].name }}",
                  context) == "True item 0"


def test_the_limits_come_from_set_limits() -> None:
    set_limits(TemplateLimits(max_bytes=2048))
    assert str(failure("{{ 'a' * 3000 }}")) == ("template \"{{ 'a' * 3000 }}\" failed: '*' would build a value of "
                                                "3,000 characters, past the 2,048-byte limit "
                                                "(FLOWDB_TEMPLATE_MAX_BYTES)")
    assert render("{{ 'a' * 2048 }}") == "a" * 2048
    assert str(failure("{{ 'é' * 1500 }}")) == ("template \"{{ 'é' * 1500 }}\" failed: the rendered text passed "
                                                "the 2,048-byte limit (FLOWDB_TEMPLATE_MAX_BYTES)")  # UTF-8 bytes


def test_limits_are_read_from_settings() -> None:
    settings = Settings.model_construct(template_max_bytes=5000, template_timeout_seconds=2.5,
                                        template_max_memory_bytes=64 * 2**20)
    assert TemplateLimits.from_settings(settings) == TemplateLimits(5000, 2.5, 64 * 2**20)
    assert (Settings().template_max_bytes, Settings().template_timeout_seconds,
            Settings().template_max_memory_bytes) == (1_000_000, 1.0, 256 * 2**20)
    assert limits() == TemplateLimits()


# -- Ordinary templates render exactly as before ------------------------------------------------------------

ORDINARY = [
    ("Write about {{inputs.topic}} using {{steps.research.output}}",
     'Write about bees using {"summary": "bees", "facts": ["a", "b"], "score": 3}'),
    ("{{ steps.research.summary }} / {{ steps.research.status }} / {{ steps.research.output.facts }}",
     'bees / completed / ["a", "b"]'),
    ("{% for f in steps.research.output.facts %}{{ loop.index }}:{{ f|upper }} {% endfor %}", "1:A 2:B "),
    ("{{ steps.research.output.facts|join(', ') }} {{ inputs.topic|center(8)|replace(' ', '.') }}", "a, b ..bees.."),
    ("{{ '%s has %d facts (%.1f)'|format(inputs.topic, 2, 2.5) }} {{ '%05.1f%%' % 3.14159 }}",
     "bees has 2 facts (2.5) 003.1%"),
    ("{{ '{} / {:>6} / {n:03d}'.format(inputs.topic, 'x', n=7) }}", "bees /      x / 007"),
    ("{{ 'a' ~ 1 ~ [1, 2] ~ none }} {{ inputs.topic * 2 }} {{ [1] * 3 }} {{ 2 ** 10 }} {{ 7 % 3 }}",
     "a1[1, 2]None beesbees [1, 1, 1] 1024 1"),
    ("{{ {'k': [1, 2]} }} {{ (1, 2) }} {{ namespace(a=1).a }} {{ dict(x=1)|tojson }}", '{"k": [1, 2]} (1, 2) 1 '
                                                                                     '{"x": 1}'),
    ("{% set ns = namespace(s='') %}{% for i in range(3) %}{% set ns.s = ns.s ~ i %}{% endfor %}{{ ns.s }}", "012"),
    ("{% macro m(x) %}<{{ x }}>{% endmacro %}{{ m(1) }}{% set b %}in{{ 2 }}{% endset %}{{ b }}", "<1>in2"),
    ("{{ 'line1\nline2'|indent(2, true) }}|{{ 'aaa bbb ccc'|wordwrap(4) }}", "  line1\n  line2|aaa\nbbb\nccc"),
    ("{{ [3, 1, 2]|sort|list }} {{ [[1], [2]]|sum(start=[]) }} {{ [1, 2, 3]|batch(2, 0)|list }}",
     "[1, 2, 3] [1, 2] [[1, 2], [3, 0]]"),
    ("{{ steps.research.output.score >= 3 and 'a' in steps.research.output.facts }} {{ [1, 2] == [1, 2] }}",
     "True True"),
    ("{{ 'x'.upper() }}{{ ' y '.strip() }}{{ 'a,b'.split(',') }}{{ 'ab'.startswith('a') }}{{ 'x'.zfill(3) }}",
     'Xy["a", "b"]True00x'),
    ("{{ steps.research.output|dictsort|first }} {{ steps.research.output.get('score') }} {{ 10|filesizeformat }}",
     "('facts', ['a', 'b']) 3 10 Bytes"),
    ("{{ 9 ** 9 ** 9 ** 9 }}", str(((9**9) ** 9) ** 9)),  # Jinja's ** is left-associative: 696 digits
]


@pytest.mark.parametrize("source, expected", ORDINARY)
def test_ordinary_templates_render_as_before(source: str, expected: str) -> None:
    record = {"id": "research", "status": "completed", "output": {"summary": "bees", "facts": ["a", "b"], "score": 3}}
    context = {"inputs": {"topic": "bees"}, "steps": {"research": StepView.of(record)}, "process": {}}
    assert render(source, context) == expected


def test_conditions_evaluate_as_before() -> None:
    context = {"steps": {"a": StepView.of({"output": {"score": 81, "tags": ["x"]}})}, "inputs": {"n": "2"}}
    assert compile_condition("{{ steps.a.output.score }} >= 80").evaluate(context) is True
    assert compile_condition("'x' in steps.a.tags and inputs.n|int * 2 == 4").evaluate(context) is True
    assert compile_condition("{{ steps.a.output.score }} > 90 or {{ inputs.n }} == '3'").evaluate(context) is False


# -- Time: BoundedRunner (point 3) ----------------------------------------------------------------------------

def _render_threads(name: str) -> list[threading.Thread]:
    """The render threads (not the watchdog) of the BoundedRunner called `name`."""
    return [t for t in threading.enumerate() if t.name.startswith(f"{name}-") and not t.name.endswith("-watchdog")]


def _cpu_seconds(thread: threading.Thread) -> float:
    assert thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


@pytest.mark.slow
def test_a_runaway_render_times_out_while_the_event_loop_keeps_running() -> None:
    template = compile_template(NESTED_LOOPS)
    runner = BoundedRunner(name="runaway")

    async def scenario() -> tuple[TemplateTimeout, float, int, bool]:
        loop = asyncio.get_running_loop()
        ticks = 0
        signalled = asyncio.Event()
        loop.add_signal_handler(signal.SIGUSR1, signalled.set)

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def send_signal() -> None:
            await asyncio.sleep(0.2)
            os.kill(os.getpid(), signal.SIGUSR1)

        ticker, sender = asyncio.create_task(tick()), asyncio.create_task(send_signal())
        started = time.monotonic()
        with pytest.raises(TemplateTimeout) as caught:
            await runner.run(lambda: template.render({}), 1.0)
        elapsed = time.monotonic() - started
        fired = signalled.is_set()  # the handler ran while the render held its thread
        ticker.cancel()
        await sender
        loop.remove_signal_handler(signal.SIGUSR1)
        return caught.value, elapsed, ticks, fired

    error, elapsed, ticks, fired = asyncio.run(scenario())
    assert str(error) == "the template ran longer than the 1 s time limit (FLOWDB_TEMPLATE_TIMEOUT_SECONDS)"
    assert isinstance(error, TemplateLimitError)
    assert 1.0 <= elapsed < 5
    assert ticks >= 10
    assert fired
    [thread] = _render_threads("runaway")
    before = _cpu_seconds(thread)
    time.sleep(0.5)
    assert _cpu_seconds(thread) - before < 0.05  # interrupted: the thread waits for work, it does not spin
    runner.close()


def test_each_call_of_a_batch_has_its_own_deadline_and_result() -> None:
    slow, ok = compile_template(NESTED_LOOPS), compile_template("hi {{ inputs.n }}")

    def fail() -> str:
        raise ValueError("boom")

    runner = BoundedRunner()
    calls: list[Callable[[], str]] = [lambda: ok.render({"inputs": {"n": 1}}), lambda: slow.render({}),
                                      lambda: ok.render({"inputs": {"n": 2}}), fail, lambda: slow.render({}),
                                      lambda: ok.render({"inputs": {"n": 3}})]
    started = time.monotonic()
    results = asyncio.run(runner.run_each(calls, 0.3))
    assert time.monotonic() - started < 5
    assert [r.value for r in results] == ["hi 1", None, "hi 2", None, None, "hi 3"]
    assert [type(r.error).__name__ for r in results] == ["NoneType", "TemplateTimeout", "NoneType", "ValueError",
                                                         "TemplateTimeout", "NoneType"]
    assert str(results[1].error) == ("the template ran longer than the 0.3 s time limit "
                                     "(FLOWDB_TEMPLATE_TIMEOUT_SECONDS)")
    with pytest.raises(ValueError, match=r"^boom$"):
        results[3].get()
    assert results[5].get() == "hi 3"
    assert runner.abandoned_threads == 0
    runner.close()


def test_the_default_timeout_is_the_limit_and_the_runner_runs_on_its_own_thread() -> None:
    set_limits(TemplateLimits(timeout_seconds=0.2))
    runner = BoundedRunner()
    assert runner.run_sync(lambda: threading.current_thread().name) == "flowdb-render-1"
    with pytest.raises(TemplateTimeout, match=r"^the template ran longer than the 0.2 s time limit"):
        runner.run_sync(lambda: compile_template(NESTED_LOOPS).render({}))
    assert runner.run_each_sync([]) == []
    assert runner.run_each_sync([lambda: 1, lambda: 2]) == [Result(1), Result(2)]
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.run_sync(lambda: 1)


@pytest.mark.slow
def test_a_call_stuck_in_c_code_is_abandoned_and_a_fresh_thread_serves_the_next() -> None:
    runner = BoundedRunner(grace_seconds=0.2, name="stuck")
    started = time.monotonic()
    with pytest.raises(TemplateTimeout):
        runner.run_sync(lambda: time.sleep(3), 0.2)  # sleep() is C: the interrupt waits until it returns
    assert time.monotonic() - started < 2
    assert runner.abandoned_threads == 1
    assert runner.run_sync(lambda: threading.current_thread().name) == "stuck-2"
    [stuck] = [t for t in threading.enumerate() if t.name == "stuck-1"]
    stuck.join(10)
    assert not stuck.is_alive()  # once its C call returned, the interrupt landed and the thread ended
    assert [t.name for t in _render_threads("stuck")] == ["stuck-2"]
    runner.close()


def test_cancelling_the_caller_interrupts_the_render() -> None:
    runner = BoundedRunner()
    template = compile_template(NESTED_LOOPS)

    async def scenario() -> str:
        task = asyncio.create_task(runner.run(lambda: template.render({}), 60))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await asyncio.wait_for(runner.run(lambda: "next"), 5)

    assert asyncio.run(scenario()) == "next"
    assert runner.abandoned_threads == 0
    runner.close()


@pytest.mark.slow
def test_interrupts_never_land_in_the_wrong_call() -> None:
    """Calls past their deadline alternate with calls that return at once: every slow call times out and
    every quick one returns its own value (an interrupt meant for a slow call never lands in the next)."""
    runner = BoundedRunner(grace_seconds=0.5)

    def call(index: int) -> Callable[[], int]:
        def run() -> int:
            if index % 2:  # far past its deadline (the watchdog interrupts it there, even on a busy machine)
                end = time.perf_counter() + 2
                while time.perf_counter() < end:
                    pass
            return index
        return run

    results = runner.run_each_sync([call(i) for i in range(60)], 0.05)
    for index, result in enumerate(results):
        if index % 2:
            assert isinstance(result.error, TemplateTimeout), (index, result)
        else:
            assert (result.error, result.value) == (None, index)
    assert runner.run_sync(lambda: "after") == "after"
    assert runner.abandoned_threads == 0
    runner.close()


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="the memory guard reads /proc/self/statm")
def test_a_render_that_keeps_allocating_is_stopped_at_the_memory_limit() -> None:
    set_limits(TemplateLimits(max_memory_bytes=64 * 2**20))
    template = compile_template("{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
                                "{% set ns.l = [ns.l, 'x' * 1000000] %}{% endfor %}")
    runner = BoundedRunner()
    with pytest.raises(TemplateLimitError) as caught:
        runner.run_sync(lambda: template.render({}), 30)
    runner.close()
    assert str(caught.value) == ("the worker's memory grew by more than 64 MiB while the template ran "
                                 "(FLOWDB_TEMPLATE_MAX_MEMORY_BYTES)")


MEMORY_CHILD = """
import json, sys
from flowdb.bounded import BoundedRunner
from flowdb.expressions import compile_template
sources = json.loads(sys.argv[1])
results = BoundedRunner().run_each_sync([lambda s=s: compile_template(s).render({}) for s in sources], 1.0)
print(json.dumps([[type(r.error).__name__, str(r.error)] for r in results]))
"""


@pytest.mark.slow
def test_the_nastiest_templates_fail_at_a_limit_within_bounded_memory() -> None:
    sources = [
        "{{ 'a' * 10000000000 }}",
        "{{ 9 ** (9 ** (9 ** 9)) }}",
        NESTED_LOOPS,
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x"
        "{% endfor %}{% endfor %}{% endfor %}",
        "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}{% set ns.l = [ns.l, 'x' * 1000000] %}"
        "{% endfor %}",
        "{% set x %}{% for i in range(100000) %}{{ 'y' * 1000000 }}{% endfor %}{% endset %}",
        "{% set ns = namespace(a=[1]) %}{% for i in range(60) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}"
        "{{ ns.a }}",
        "{{ ([[1] * 100000] * 100000)|sum(start=[]) }}",
        "{{ '{:>10000000000}'.format(1) }}",
    ]
    result = subprocess.run([sys.executable, "-c", MEMORY_CHILD, json.dumps(sources)], capture_output=True,
                            text=True, timeout=120, preexec_fn=address_space_limit(ULIMIT_V))
    assert result.returncode == 0, result.stderr
    outcomes = json.loads(result.stdout)
    assert [kind for kind, _ in outcomes] == ["TemplateLimitError", "TemplateLimitError", "TemplateTimeout",
                                              "TemplateLimitError", "TemplateMemoryError", "TemplateLimitError",
                                              "TemplateLimitError", "TemplateLimitError", "TemplateLimitError"]
    assert outcomes[2][1] == "the template ran longer than the 1 s time limit (FLOWDB_TEMPLATE_TIMEOUT_SECONDS)"
    assert outcomes[3][1].endswith("failed: the rendered text passed the 1,000,000-byte limit "
                                   "(FLOWDB_TEMPLATE_MAX_BYTES)")
    assert outcomes[4][1] == ("the worker's memory grew by more than 256 MiB while the template ran "
                              "(FLOWDB_TEMPLATE_MAX_MEMORY_BYTES)")
