"""Process inputs: coerce what the user gave (`--input k=v` text, or JSON values) to declared types."""

from __future__ import annotations

import json
from typing import Any

from flowdb.errors import InputError
from flowdb.models import InputSpec

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
            if isinstance(value, int | float):
                return value
            if isinstance(value, str) and from_text:
                return float(value.strip())
        elif kind == "boolean":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and from_text and value.strip().lower() in _BOOLS:
                return _BOOLS[value.strip().lower()]
        elif kind in ("object", "array"):
            parsed = json.loads(value) if isinstance(value, str) and from_text else value
            if kind == "object" and isinstance(parsed, dict):
                return parsed
            if kind == "array" and isinstance(parsed, list):
                return parsed
    except (ValueError, json.JSONDecodeError):
        pass
    shown = value if isinstance(value, str) else json.dumps(value)
    raise InputError(f"input {name!r} must be {_article(kind)} {kind}, got {shown!r}")


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


def validate_inputs(declared: dict[str, InputSpec], given: dict[str, Any], *,
                    from_text: bool = False) -> dict[str, Any]:
    """The instance's inputs: defaults filled in, types checked; InputError names every problem."""
    problems = []
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        problems.append(f"unknown input(s) {', '.join(unknown)} (declared inputs: {known})")
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
            problems.append(f"missing input {name!r} ({spec.type}); give it with --input {name}=VALUE")
    if problems:
        raise InputError("; ".join(problems))
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
