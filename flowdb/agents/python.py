"""Agents that are Python callables: `python: "package.module:function"` (sync or async)."""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from flowdb.agents.types import AgentReply, AgentRequest, as_reply
from flowdb.errors import AgentConfigError


class PythonBackend:
    key = "python"

    def __init__(self, name: str, target: object) -> None:
        if not isinstance(target, str):
            raise AgentConfigError(f"agent {name!r}: python takes text like 'package.module:function', not {target!r}")
        module_name, sep, attr = target.partition(":")
        if not sep or not module_name or not attr:
            raise AgentConfigError(f"agent {name!r}: python target {target!r} must look like 'package.module:function'")
        self.name = name
        self.target = target
        self._module_name = module_name
        self._attr = attr
        self._function: Callable[..., Any] | None = None

    def load(self) -> Callable[..., Any]:
        if self._function is None:
            try:
                module = importlib.import_module(self._module_name)
            except ImportError as exc:
                raise AgentConfigError(f"agent {self.name!r}: cannot import {self._module_name!r}: {exc}") from None
            except Exception as exc:  # the module itself is broken (a syntax error, a failing import-time check)
                raise AgentConfigError(f"agent {self.name!r}: importing {self._module_name!r} raised "
                                       f"{type(exc).__name__}: {exc}") from None
            function = module
            for part in self._attr.split("."):
                function = getattr(function, part, None)  # type: ignore[assignment]
                if function is None:
                    raise AgentConfigError(f"agent {self.name!r}: {self._module_name!r} has no {self._attr!r}")
            if not callable(function):
                raise AgentConfigError(f"agent {self.name!r}: {self.target!r} is not callable")
            self._function = function
        return self._function

    def check(self) -> None:
        self.load()

    async def call(self, request: AgentRequest) -> AgentReply:
        function = self.load()
        if inspect.iscoroutinefunction(function):
            value = await function(request)
        else:
            # A plain function may block for minutes (network calls); keep the worker's loop free.
            value = await asyncio.to_thread(function, request)
        return as_reply(value, self.name)
