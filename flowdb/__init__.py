"""flowdb: a process engine for AI-agent business processes, with every fact in SQL tables."""

from flowdb.agents.types import AgentBusy, AgentReply, AgentRequest, AgentStillRunning
from flowdb.errors import FlowdbError, NonRetryableError, StepFailure

__version__ = "0.1.0"

__all__ = ["AgentBusy", "AgentReply", "AgentRequest", "AgentStillRunning", "FlowdbError", "NonRetryableError",
           "StepFailure", "__version__"]
