"""Where a problem in a definition is, and how it is worded: FILE:LINE:COL and what to fix.

The locator maps a path in the document (as the models see it) to the line and column where it is
written; the describer turns a Pydantic error into a message in the user's own terms.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from typing import Any

from pydantic import ValidationError

from flowdb.errors import Located
from flowdb.models import ACTION_TYPES, STEP_TYPES, AgentTask, Gateway, HumanApproval, Notification, SubProcess, Timer
from flowdb.yamlsafe import Path, Positions


def sorted_problems(problems: list[Located]) -> list[Located]:
    """In file order, each once."""
    unique = {(p.line, p.col, p.message): p for p in problems}
    return sorted(unique.values(), key=lambda p: (p.line, p.col))


class Locator:
    """Turns a path in the document into FILE:LINE:COL (the nearest known ancestor if need be).

    `at` gives where a field's key is written (for unknown, duplicate and missing fields), `value`
    where its value is (for bad values). Paths are those of the model, where a step's `config:`
    fields stand on the step; `moved` maps them back to where they are written.
    """

    def __init__(self, filename: str, positions: Positions) -> None:
        self.filename = filename
        self.positions = positions
        self.moved: dict[Path, Path] = {}

    def _written(self, path: Path) -> Path:
        for cut in range(len(path), 0, -1):
            target = self.moved.get(path[:cut])
            if target is not None:
                return (*target, *path[cut:])
        return path

    def at(self, path: Path, message: str) -> Located:
        probe = self._written(tuple(path))
        while probe and probe not in self.positions:
            probe = probe[:-1]
        line, col = self.positions.get(probe, (1, 1))
        return Located(self.filename, line, col, one_line(message))

    def value(self, path: Path, message: str) -> Located:
        mark = self.positions.value_at(self._written(tuple(path)))
        if mark is None:
            return self.at(path, message)
        return Located(self.filename, mark[0], mark[1], one_line(message))

    def line_of(self, path: Path) -> int:
        return self.at(path, "").line

    def pydantic(self, exc: ValidationError, data: Any, ignored_steps: Collection[int] = ()) -> list[Located]:
        """The problems of a failed validation; none for the steps in `ignored_steps` (whose fields are
        not all known: their problems would be the consequence of another)."""
        errors = [(loc, error) for loc, error in zip(failed_paths(exc), exc.errors(), strict=True)
                  if not _in_steps(loc, ignored_steps)]
        # A misspelt field is also reported missing; its "did you mean" already says everything.
        misspelt = {(*loc[:-1], hint) for loc, error in errors if error["type"] == "extra_forbidden"
                    for hint in close_matches(str(loc[-1]), _allowed_fields(loc, data))}
        found: list[Located] = []
        for loc, error in errors:
            kind = error["type"]
            if kind == "missing" and loc in misspelt:
                continue
            message = _describe(error, loc, data)
            if kind == "union_tag_invalid":
                found.append(self.value((*loc, "type"), message))
            elif kind in ("extra_forbidden", "missing", "union_tag_not_found"):
                found.append(self.at(loc, message))
            else:
                found.append(self.value(loc, message))
        return sorted_problems(found)


def failed_paths(exc: ValidationError) -> list[Path]:
    """Where each error of a failed validation is, as a path in the document."""
    return [_strip_tags(tuple(error["loc"])) for error in exc.errors()]


def _in_steps(loc: Path, indices: Collection[int]) -> bool:
    return bool(indices) and len(loc) >= 3 and loc[:2] == ("process", "steps") and loc[2] in indices


def one_line(message: str) -> str:
    return " ".join(message.split())


def kind_of(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, str):
        return "text"
    return "a number"


def _strip_tags(loc: tuple[Any, ...]) -> Path:
    """Drop pydantic's union-tag element (`steps, 0, 'agent_task', 'agent'` → `steps, 0, 'agent'`)."""
    out: list[Any] = []
    for index, part in enumerate(loc):
        if part in STEP_TYPES and index >= 1 and isinstance(loc[index - 1], int):
            continue
        if part in ACTION_TYPES and index >= 2 and isinstance(loc[index - 1], int) \
                and loc[index - 2] in ("on_success", "on_failure"):
            continue
        if isinstance(part, str) and part.startswith(("function-", "union[")):
            continue
        out.append(part)
    return tuple(out)


def _step_label(loc: Path, data: Any) -> str | None:
    """"step 'draft'" (or "step #2" when it has no id) when the path is inside a step."""
    if len(loc) >= 3 and loc[:2] == ("process", "steps") and isinstance(loc[2], int):
        try:
            step_id = data["process"]["steps"][loc[2]].get("id")
        except (KeyError, IndexError, TypeError, AttributeError):
            step_id = None
        return f"step {step_id!r}" if isinstance(step_id, str) and step_id else f"step #{loc[2] + 1}"
    return None


def _dotted(parts: Iterable[str | int]) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _where(loc: Path, data: Any) -> str:
    """Where the field at `loc` stands: "in step 'draft'", "in step 'draft' (retry)", "in 'process'"."""
    step = _step_label(loc, data)
    if step is not None:
        rest = _dotted(loc[3:-1])
        return f"in {step}" + (f" ({rest})" if rest else "")
    parent = _dotted(loc[:-1])
    return f"in '{parent}'" if parent else "at the top level"


def _field_label(loc: Path, data: Any) -> str:
    """How a bad value's place is named: "retry.initial_interval in step 'draft'", "process.name"."""
    step = _step_label(loc, data)
    if step is not None:
        rest = _dotted(loc[3:])
        return f"{rest} in {step}" if rest else step
    return _dotted(loc) or "the document"


_STEP_MODELS: dict[str, Any] = {"agent_task": AgentTask, "human_approval": HumanApproval, "gateway": Gateway,
                                "timer": Timer, "sub_process": SubProcess, "notification": Notification}


def _allowed_fields(loc: Path, data: Any) -> list[str]:
    from flowdb import models

    if len(loc) == 4 and loc[:2] == ("process", "steps"):
        try:
            step_type = data["process"]["steps"][loc[2]].get("type")
        except (KeyError, IndexError, TypeError, AttributeError):
            return []
        cls = _STEP_MODELS.get(step_type)
        return sorted(cls.model_fields) if cls else []
    owners: dict[Path, Any] = {("process",): models.Process, (): models.Document}
    cls2 = owners.get(loc[:-1])
    if cls2 is None and len(loc) >= 2 and loc[-2] == "retry":
        cls2 = models.RetryPolicy
    if cls2 is None and len(loc) == 4 and loc[:2] == ("process", "inputs"):
        cls2 = models.InputSpec
    return sorted(cls2.model_fields) if cls2 else []


def _other_types_with(name: str) -> list[str]:
    return [kind for kind, cls in _STEP_MODELS.items() if name in cls.model_fields]


_TYPE_REASONS = {
    "string_type": "expected text",
    "list_type": "expected a list, such as [a, b] or one '- item' per line",
    "dict_type": "expected a mapping of names to values",
    "model_type": "expected a mapping of fields",
    "model_attributes_type": "expected a mapping of fields",
    "int_type": "expected a whole number",
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "bool_type": "expected true or false",
    "bool_parsing": "expected true or false",
}


def shown(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict | list):
        return kind_of(value)
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _reason(error: Any) -> str:
    """What is wrong with a value, in words that say what to write instead."""
    kind = error["type"]
    ctx = error.get("ctx") or {}
    got = f", got {shown(error.get('input'))}"
    if kind in _TYPE_REASONS:
        return _TYPE_REASONS[kind] + got
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}{got}"
    if kind == "greater_than":
        return f"must be more than {ctx.get('gt')}{got}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}{got}"
    if kind == "too_short":
        return f"must list at least {ctx.get('min_length')} item(s)"
    if kind == "string_too_short":
        return "must not be empty"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters long"
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, ")
    return str(error["msg"])


def _describe(error: Any, loc: Path, data: Any) -> str:
    kind = error["type"]
    name = str(loc[-1]) if loc else "document"
    where = _where(loc, data)
    if kind == "extra_forbidden":
        allowed = _allowed_fields(loc, data)
        others = _other_types_with(name) if len(loc) == 4 and loc[:2] == ("process", "steps") else []
        belongs = f" ({name!r} is a field of {' and '.join(others)} steps)" if others else ""
        hint = f"; expected one of: {', '.join(allowed)}" if allowed else ""
        return f"unknown field {name!r} {where}{belongs}{suggest(name, allowed)}{hint}"
    if kind == "missing":
        return f"missing required field {name!r} {where}"
    if kind == "union_tag_invalid" and {"on_success", "on_failure"} & set(loc):
        tag = str(error.get("ctx", {}).get("tag"))
        return f"unknown action type {tag!r}{suggest(tag, ACTION_TYPES)}; expected one of: {', '.join(ACTION_TYPES)}"
    if kind == "union_tag_invalid":
        tag = str(error.get("ctx", {}).get("tag"))
        return f"unknown step type {tag!r}{suggest(tag, STEP_TYPES)}; expected one of: {', '.join(STEP_TYPES)}"
    if kind == "union_tag_not_found":
        return f"missing required field 'type' {_where((*loc, 'type'), data)}; expected one of: " + \
            ", ".join(STEP_TYPES)
    if kind == "model_attributes_type" and _step_label(loc, data) is not None and len(loc) == 3:
        return (f"{_field_label(loc, data)} must be a mapping with id, type and the step type's fields, "
                f"got {shown(error.get('input'))}")
    if kind == "string_pattern_mismatch":
        if name == "id":
            return f"step id {error['input']!r} is not allowed; use letters, digits, '-' and '_'"
        return (f"{_field_label(loc, data)}: {error['input']!r} is not allowed; use lowercase letters, "
                "digits, '-' and '_', starting with a letter or digit")
    if kind == "literal_error":
        return f"{name} {error['input']!r} is not allowed {where}; expected {error['ctx']['expected']}"
    return f"{_field_label(loc, data)}: {_reason(error)}"


def close_matches(name: str, known: Iterable[str]) -> list[str]:
    return difflib.get_close_matches(name, list(known), n=1)


def suggest(name: str, known: Iterable[str]) -> str:
    close = close_matches(name, known)
    return f" (did you mean {close[0]!r}?)" if close else ""
