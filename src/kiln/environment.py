"""The one place kiln reads environment variables (prefix ``KILN_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln"


class Settings(BaseSettings):
    """Process-wide settings; ``KILN_CACHE_DIR=/tmp/k kiln demo`` overrides a field."""

    model_config = SettingsConfigDict(env_prefix="KILN_", extra="ignore")

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="trained zoo models, compile caches")
    num_threads: int | None = Field(default=None, ge=1, description="engine intra-op threads (default: physical cores)")
    log_level: str = Field(default="INFO")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
