"""What ``kiln bench`` measures, as one validated config object."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kiln.errors import SpecError

Scenario = Literal["single-stream", "offline", "server", "multi-stream"]


class BenchConfig(BaseModel):
    """Variants × batch sizes × scenarios; timing rules; where the load comes from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: list[str] = Field(default_factory=lambda: ["reference", "chosen"],
                                description="'reference', 'chosen', variant ids, or ['all']")  # fmt: skip
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    scenarios: list[Scenario] = Field(default_factory=lambda: list[Scenario](["single-stream", "offline"]))
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1, description="engine intra-op threads; default physical cores")
    warmup_iters: int = Field(default=5, ge=0)
    min_time_s: float = Field(default=1.0, gt=0)
    min_iters: int = Field(default=10, ge=1)
    max_iters: int = Field(default=100_000, ge=1)
    repeats: int = Field(default=3, ge=1)
    spread_warning: float = Field(default=0.15, gt=0, description="warn when (max-min)/median of repeats exceeds it")
    # server and multi-stream scenarios (through the dynamic batcher)
    server_qps: float | None = Field(default=None, gt=0)
    find_max_qps: bool = False
    slo_ms: float = Field(default=20.0, gt=0)
    scenario_seconds: float = Field(default=3.0, gt=0)
    stream_fps: float = Field(default=30.0, gt=0)
    max_batch_size: int = Field(default=32, ge=1)
    max_queue_delay_ms: float = Field(default=1.0, ge=0)

    @classmethod
    def from_options(cls, **options: Any) -> BenchConfig:
        """Validate user options (CLI or API) into a config, raising SpecError naming the option."""
        try:
            return cls.model_validate(options)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise SpecError(f"bench option {'.'.join(map(str, err['loc']))}: {err['msg']}") from None

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive integers, e.g. 1,2,4,8")
        return sorted(set(v))

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one variant: reference, chosen, all, or an id")
        return list(dict.fromkeys(v))
