"""Settings from the environment (FLOWDB_ prefix); command-line flags override them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from flowdb.errors import FlowdbError

DEFAULT_DATABASE_URL = "sqlite:///flowdb.sqlite3"
FREE_RELEASES = 3  # releases at shutdown not charged, per step (db/claims.py)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWDB_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    agents: str | None = None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a Redis URL starts with redis://, rediss:// or unix:// (e.g. redis://127.0.0.1:6379/0)")
        return value or None
    lease_seconds: float = Field(default=30.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    claim_batch: int = Field(default=32, ge=1, le=1000)
    # Times a stopping worker may give a step back unfinished without charging it an attempt.
    free_releases: int = Field(default=FREE_RELEASES, ge=0)
    # How long a worker that took over a step whose worker died waits for its own steps to finish (the
    # step must run alone) before it hands the step back for another worker.
    suspect_wait_seconds: float = Field(default=60.0, gt=0)
    # How often a worker looks for ready steps whose agent no running worker has (and logs them).
    unservable_check_seconds: float = Field(default=60.0, gt=0)

    # Templates and conditions (flowdb.expressions): each evaluation is bounded in time, and its output and
    # every value it builds in size. Passing a limit fails the step without retry.
    template_timeout_seconds: float = Field(default=1.0, gt=0)
    template_max_bytes: int = Field(default=1_000_000, ge=1024)
    template_max_memory_bytes: int = Field(default=256 * 2**20, ge=2**20)  # growth of the worker while one runs

    # HTTP API (api/, `flowdb serve`).
    # Larger bodies get 413. The default takes the largest definition flowdb accepts (yamlsafe.MAX_BYTES).
    api_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    api_stream_poll_seconds: float = Field(default=0.5, gt=0)  # event stream without Redis
    ui_session_hours: float = Field(default=12.0, gt=0, le=24 * 30)  # a web UI sign-in lasts this long
    # The address people open the web UI at (https://flowdb.example.com), when a proxy in front rewrites Host:
    # a form post must come from it. Unset: from the Host the request names.
    ui_origin: str | None = None

    # Notifications (flowdb.notifications): email over SMTP, Slack incoming webhook.
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_sender: str | None = None
    smtp_tls: Literal["none", "starttls", "ssl"] = "starttls"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    slack_webhook_url: str | None = None
    # Webhook URLs resolving to private, loopback or link-local addresses are refused unless this is set.
    notify_allow_private: bool = False
    notify_attempts: int = Field(default=3, ge=1, le=20)
    notify_backoff_seconds: float = Field(default=1.0, ge=0)
    notify_timeout_seconds: float = Field(default=10.0, gt=0)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment with the non-None overrides (command-line flags) applied; a
    value that does not fit is a FlowdbError naming its variable (one line, never a traceback)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            where = "--db" if field == "database_url" and "database_url" in given else f"FLOWDB_{field.upper()}"
            problems.append(f"{where}={error.get('input')!r}: {error['msg'].removeprefix('Value error, ')}")
        raise FlowdbError("bad setting: " + "; ".join(problems)) from None
