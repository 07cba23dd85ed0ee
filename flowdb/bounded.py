"""TEMPORARY stand-in until the bounded runner lands."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any


class BoundedRunner:
    async def run_each(self, jobs: list[Callable[[], Any]], timeout: float) -> list[Any]:
        def all_jobs() -> list[Any]:
            out: list[Any] = []
            for job in jobs:
                try:
                    out.append(job())
                except Exception as exc:
                    out.append(exc)
            return out

        return await asyncio.to_thread(all_jobs)

    def close(self) -> None:
        pass
