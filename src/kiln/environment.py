"""The one place kiln reads environment variables (prefix ``KILN_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "KILN_"
# The most intra-op threads kiln asks an engine for (``--threads``, ``threads=``, ``KILN_NUM_THREADS``): far past
# any machine's useful count (threads beyond the cores only oversubscribe them), yet low enough that a typo
# such as 100000 is refused at once instead of hanging while the runtime starts that many threads.
MAX_THREADS = 1024


def _default_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kiln"


class Settings(BaseSettings):
    """Process-wide settings; ``KILN_CACHE_DIR=/tmp/k kiln demo`` overrides a field."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    cache_dir: Path = Field(default_factory=_default_cache_dir, description="trained zoo models, compile caches")
    num_threads: int | None = Field(
        default=None, ge=1, le=MAX_THREADS, description="engine intra-op threads (default: physical cores)"
    )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings, read once; a variable kiln cannot use is a :class:`~kiln.errors.SettingError` naming it
    and what it accepts (the CLI's one line, exit 2), not pydantic's report."""
    try:
        return Settings()
    except ValidationError as exc:
        from kiln._pydantic import pydantic_problem
        from kiln.errors import SettingError

        err = exc.errors()[0]
        variable = ENV_PREFIX + str(err["loc"][0]).upper() if err["loc"] else ENV_PREFIX + "*"
        problem = pydantic_problem(err)
        if err["loc"] and err["loc"][0] == "num_threads":
            problem = f"must be a whole number of threads from 1 to {MAX_THREADS}, not {err.get('input')!r}"
        raise SettingError(variable, problem) from None
