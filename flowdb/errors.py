"""Every error flowdb raises on purpose derives from FlowdbError and says what to do about it."""

from __future__ import annotations

from dataclasses import dataclass


class FlowdbError(Exception):
    """Root of flowdb's errors. The message is meant for the user, never a traceback.

    The message is worded for the command line. Where what to do differs for an HTTP API caller (a flag
    there is a body field here), `http` says it in HTTP terms and the API answers with that (`for_http`).
    """

    def __init__(self, *args: object, http: str | None = None) -> None:
        super().__init__(*args)
        self.http = http

    @property
    def for_http(self) -> str:
        """The message as an HTTP API caller should read it."""
        return self.http if self.http is not None else str(self)


@dataclass(frozen=True)
class Located:
    """One problem at a place in a file: printed as FILE:LINE:COL: message."""

    file: str
    line: int
    col: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.message}"


class DefinitionError(FlowdbError):
    """A process definition (or agents file) is invalid; carries every problem found."""

    def __init__(self, problems: list[Located]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class DefinitionConflict(FlowdbError):
    """A definition pins a version that already exists with other content."""


class NotFound(FlowdbError):
    """A process, instance, step or other object that was named does not exist."""


class InputError(FlowdbError):
    """Process inputs given at start do not match the process's declared inputs. `in_file` says it for
    a line of an inputs file (JSON lines: a missing input is a key to add to the line's object),
    `in_form` for the web UI's start form (a field to fill in)."""

    def __init__(self, *args: object, http: str | None = None, in_file: str | None = None,
                 in_form: str | None = None) -> None:
        super().__init__(*args, http=http)
        self.in_file = in_file if in_file is not None else str(self)
        self.in_form = in_form if in_form is not None else str(self)


class IdempotencyConflict(FlowdbError):
    """An idempotency key was reused with other inputs or another process (or version)."""


class IdempotencyInProgress(FlowdbError):
    """Another start with the same idempotency key has not committed yet: retry shortly to get its instance."""

    retry_after_seconds = 1


class TemplateError(FlowdbError):
    """A template or condition failed to render or evaluate at run time."""


class TemplateLimitError(TemplateError):
    """A template or condition passed a limit (time, output size, size of one value).

    The message names the limit, its value and the setting that changes it. Running the template again
    would hit the same limit, so a step failing with it is not retried.
    """


class TemplateTimeout(TemplateLimitError):
    """A template or condition ran longer than its time limit (FLOWDB_TEMPLATE_TIMEOUT_SECONDS)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"the template ran longer than the {seconds:g} s time limit "
                         "(FLOWDB_TEMPLATE_TIMEOUT_SECONDS)")


class TemplateMemoryError(TemplateLimitError):
    """The worker's memory grew past FLOWDB_TEMPLATE_MAX_MEMORY_BYTES while a template ran. The growth is
    the whole process's (an agent's thread may have allocated at the same time), so unlike the other
    limits a step failing with it is retried."""

    retryable = True


class AgentConfigError(FlowdbError):
    """The agents file is missing, malformed, or names an agent that cannot be loaded."""


class StepFailure(FlowdbError):
    """Raised by handlers (and agents) to fail a step. Retried unless retryable is False."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class NonRetryableError(StepFailure):
    """Raise from an agent to fail its step at once, without further attempts."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


# The error types the HTTP and MCP backends fail a step with (its error.type, for on_failure and, later,
# on_error and retry.non_retryable). Each keeps StepFailure's `retryable`.
class AgentUnreachable(StepFailure):
    """The agent's endpoint could not be reached or did not answer in time (retried)."""


class AgentRefused(StepFailure):
    """The agent or its platform refused the request: an answer with `retryable: false`, a 4xx, a
    rejected key (not retried, unless the answer said it may be)."""


class AgentReplyInvalid(StepFailure):
    """The agent answered something that is not the protocol's reply (not retried)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


class AgentFailed(StepFailure):
    """The agent's platform reported an error that may pass (retried, unless it said otherwise)."""
