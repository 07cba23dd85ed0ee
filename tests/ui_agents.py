"""Agents for the web UI's browser tests: a writer slow enough that a person (or a test) sees it run,
whose report holds markup that must show as text."""

from __future__ import annotations

import os
import time
from typing import Any

from flowdb import AgentRequest

HOSTILE = "<script>window.__xss = 1</script><img src=x onerror=\"window.__xss = 2\">"


def writer(request: AgentRequest) -> dict[str, Any]:
    time.sleep(float(os.environ.get("FLOWDB_UI_AGENT_SLEEP", "1.5")))
    return {"text": f"Q3 report {HOSTILE}", "output_path": f"reports/{request.instance_id}.md",
            "message": request.message}
