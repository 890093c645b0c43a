"""Server settings: flags of ``kiln serve`` and environment variables ``KILN_SERVE_*``."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln.logs import LogLevel, log_level_name

MIN_TOKEN_CHARS = 8

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30}  # fmt: skip


def parse_size(value: Any) -> int | None:
    """``512MB``, ``2G``, ``1048576`` -> bytes (binary units)."""
    if value is None or isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{value!r} is not a size; write it like 512MB, 2GB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_engine_threads() -> int:
    """One core fewer than the machine has: the server's own threads need the other (see MEASURED.md)."""
    from kiln.hardware import physical_cores

    return max(1, physical_cores() - 1)


class ServerSettings(BaseSettings):
    """How ``kiln serve`` runs. Every field can be set as ``KILN_SERVE_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="KILN_SERVE_", extra="forbid")

    repo: Path
    host: str = Field(default="127.0.0.1", description="interface to bind; 0.0.0.0 exposes the server")
    http_port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port")
    grpc_port: int | None = Field(default=8001, ge=0, le=65535, description="0 picks a free port; None: no gRPC")
    token: SecretStr | None = Field(default=None, description="bearer token for the model-repository endpoints")
    load_mode: Literal["preload", "lazy"] = Field(
        default="preload", description="preload: load at start; lazy: load a model on its first request"
    )
    models: list[str] = Field(default_factory=list, description="models to preload (default: all)")
    max_memory: int | None = Field(
        default=None, ge=1, description="memory budget for loaded models (models are evicted to fit it)"
    )
    eviction: Literal["lru", "predictive"] = Field(
        default="predictive",
        description="predictive: keep a usage history in the repository (REPO/.kiln/usage.json), evict the "
        "models of least forecast demand x reload time per byte, prefetch (lazy mode) the ones expected within "
        "prefetch_window_s and restore the ones loaded before a restart; lru: evict the least recently used",
    )
    prefetch_window_s: float = Field(
        default=600.0, gt=0, le=7 * 86400, description="how far ahead demand is forecast (on the usage clock)"
    )
    prefetch_interval_s: float = Field(default=5.0, gt=0, description="seconds between two prefetch rounds")
    max_body_bytes: int = Field(default=64 * 2**20, ge=1024)
    shm_max_bytes: int | None = Field(
        default=None, ge=1, description="bytes of system shared memory clients may register; None: 64 x max_body_bytes"
    )
    request_timeout_s: float = Field(default=30.0, gt=0)
    max_inflight_bytes: int | None = Field(
        default=None, ge=1, description="bytes all requests in flight may hold together (503 past it); "
        "None: 16 x max_body_bytes",
    )  # fmt: skip
    max_header_bytes: int = Field(
        default=64 * 2**10, ge=1024, description="largest HTTP request line and headers together (431 past it)"
    )
    header_timeout_s: float = Field(
        default=20.0, gt=0, description="seconds an HTTP request's headers may take to arrive (408 past it)"
    )
    body_timeout_s: float = Field(
        default=20.0, gt=0, description="seconds an HTTP request body may go without a byte arriving (408 past it)"
    )
    keep_alive_s: float = Field(
        default=30.0, gt=0, description="seconds an HTTP connection may stay open without a request in it"
    )
    drain_timeout_s: float = Field(default=30.0, ge=0)
    engine_threads: int = Field(default_factory=default_engine_threads, ge=1)
    cache_max_bytes: int = Field(default=64 * 2**20, ge=0, description="response cache size, shared by all models")
    inline_below_ms: float = Field(
        default=0.0,
        ge=0,
        description="a request that finds the server otherwise idle runs on the event loop's thread when the "
        "model's batches take less than this (saves two thread hand-offs, ~0.1-0.3 ms). Off by default: an "
        "engine that hangs there stalls the whole server, where the batcher's watchdog cannot answer for it",
    )
    processing_threads: int = Field(
        default=2, ge=1, description="threads that decode raw inputs (images, texts) and post-process results"
    )
    ray: bool = Field(default=False, description="run the models' replicas on Ray Serve (kiln[ray])")
    ray_address: str | None = Field(
        default=None, description="Ray cluster to join ('auto', or HOST:PORT); None: start a private local one"
    )
    log_format: Literal["json", "text"] = "json"
    log_level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)")
    access_log: bool = Field(default=False, description="log every request (costs a few µs each)")

    _log_level = field_validator("log_level", mode="before")(log_level_name)

    @field_validator("token")
    @classmethod
    def _real_token(cls, v: SecretStr | None) -> SecretStr | None:
        """An empty token (``--token "$TOKEN"`` with TOKEN unset) would lock every management call out unseen;
        one of a few characters is guessed as fast."""
        if v is not None and len(v.get_secret_value().strip()) < MIN_TOKEN_CHARS:
            raise ValueError(f"must be at least {MIN_TOKEN_CHARS} characters (is the variable you pass set?), or "
                             "leave it out to leave the management endpoints open")  # fmt: skip
        return v

    @field_validator(
        "max_memory",
        "max_body_bytes",
        "max_header_bytes",
        "max_inflight_bytes",
        "cache_max_bytes",
        "shm_max_bytes",
        mode="before",
    )
    @classmethod
    def _size(cls, v: Any) -> Any:
        return parse_size(v)
