"""Settings from the environment (FLOWDB_ prefix); command-line flags override them."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATABASE_URL = "sqlite:///flowdb.sqlite3"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLOWDB_", extra="ignore")

    database_url: str = DEFAULT_DATABASE_URL
    redis_url: str | None = None
    agents: str | None = None
    lease_seconds: float = Field(default=30.0, gt=0)
    poll_seconds: float = Field(default=1.0, gt=0)
    claim_batch: int = Field(default=32, ge=1, le=1000)


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment with the non-None overrides (command-line flags) applied."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**given)  # type: ignore[arg-type]
