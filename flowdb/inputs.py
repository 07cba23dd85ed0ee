"""Process inputs: coerce what the user gave (`--input k=v` text, or JSON values) to declared types.

A value keeps its JSON type whichever way it came: `500` is an integer and `0.5` a number both as
`--input amount=500` text and in an API body, so the stored inputs and `{{ inputs.amount }}` read the same.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from flowdb.errors import InputError
from flowdb.models import InputSpec
from flowdb.problems import suggest

_BOOLS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False}


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """`k=v` strings from the command line into a dict (values stay text until typed)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--input {pair!r} is not KEY=VALUE")
        out[key.strip()] = value
    return out


def _coerce(name: str, spec: InputSpec, value: Any, from_text: bool) -> Any:
    kind = spec.type
    try:
        if kind == "string":
            if isinstance(value, str):
                return value
            if from_text:
                return str(value)
        elif kind == "integer":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, str) and from_text:
                return int(value.strip())
            if isinstance(value, float) and value.is_integer():
                return int(value)
        elif kind == "number":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if isinstance(value, float) and math.isfinite(value):  # NaN and infinities are not JSON
                return value
            if isinstance(value, str) and from_text:
                return _number_text(value.strip())
        elif kind == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and from_text and value.strip().lower() in _BOOLS:
                return _BOOLS[value.strip().lower()]
        elif kind in ("object", "array"):
            parsed = json.loads(value, parse_constant=_no_constant) if isinstance(value, str) and from_text else value
            if kind == "object" and isinstance(parsed, dict):
                return parsed
            if kind == "array" and isinstance(parsed, list):
                return parsed
    except (ValueError, json.JSONDecodeError):
        pass
    shown = value if isinstance(value, str) else json.dumps(value)
    raise InputError(f"input {name!r} must be {_article(kind)} {kind}, got {shown!r}")


_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _number_text(text: str) -> int | float:
    """A number written as JSON writes it: `500` is the integer 500 (not 500.0), `0.5` and `5e2` are
    floats; what JSON would refuse (`1_000`, `0500`, `+5`, `nan`) is refused."""
    written = text.strip()
    if not _JSON_NUMBER.fullmatch(written):
        raise ValueError(text)
    number = json.loads(written)
    if isinstance(number, float) and not math.isfinite(number):  # 1e999
        raise ValueError(text)
    return int(number) if isinstance(number, int) else float(number)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def validate_inputs(declared: dict[str, InputSpec], given: dict[str, Any], *,
                    from_text: bool = False) -> dict[str, Any]:
    """The instance's inputs: defaults filled in, types checked; InputError names every problem.

    Its message says how to give a missing input on the command line, its `http` in an API body."""
    problems: list[str] = []  # the same for both front ends
    missing: list[tuple[str, str]] = []  # (name, type)
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        hint = suggest(unknown[0], declared) if len(unknown) == 1 else ""
        problems.append(f"unknown input(s) {', '.join(unknown)}{hint} (declared inputs: {known})")
    result: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in given:
            try:
                result[name] = _coerce(name, spec, given[name], from_text)
            except InputError as exc:
                problems.append(str(exc))
        elif spec.default is not None:
            result[name] = spec.default
        elif spec.required is False:
            result[name] = None
        else:
            missing.append((name, spec.type))
    if problems or missing:
        cli = [f"missing input {name!r} ({kind}); give it with --input {name}=VALUE" for name, kind in missing]
        http = [f"missing input {name!r} ({kind}); give it in the body's inputs object: "
                f'{{"inputs": {{"{name}": ...}}}}' for name, kind in missing]
        in_file = [f'missing input {name!r} ({kind}); add "{name}" to the line\'s object' for name, kind in missing]
        in_form = [f"missing input {name!r} ({kind}); fill in its field" for name, kind in missing]
        raise InputError("; ".join(problems + cli), http="; ".join(problems + http),
                         in_file="; ".join(problems + in_file), in_form="; ".join(problems + in_form))
    return result


def check_defaults(declared: dict[str, InputSpec]) -> list[tuple[str, str]]:
    """(input name, problem) for every default that does not match its declared type."""
    problems = []
    for name, spec in declared.items():
        if spec.default is not None:
            try:
                _coerce(name, spec, spec.default, from_text=False)
            except InputError as exc:
                problems.append((name, f"default of {exc}"))
    return problems
