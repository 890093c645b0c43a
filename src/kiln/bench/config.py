"""What ``kiln bench`` measures, as one validated config object."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kiln.errors import spec_error

Scenario = Literal["single-stream", "offline", "server", "multi-stream"]
DEFAULT_SCENARIOS: list[Scenario] = ["single-stream", "offline"]


class BenchConfig(BaseModel):
    """Variants × batch sizes × scenarios; timing rules; where the load comes from.

    Without ``scenarios``, single-stream and offline run, plus server when ``server_qps`` or
    ``find_max_qps`` asks for it; naming scenarios that leave server out while asking for either is
    refused rather than silently ignored.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    variants: list[str] = Field(default_factory=lambda: ["reference", "chosen"],
                                description="'reference', 'chosen', variant ids, or ['all']")  # fmt: skip
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    scenarios: list[Scenario] = Field(default_factory=lambda: list(DEFAULT_SCENARIOS))
    device: str = "cpu"
    threads: int | None = Field(default=None, ge=1, description="engine intra-op threads; default physical cores")
    warmup_iters: int = Field(default=5, ge=0)
    min_time_s: float = Field(default=1.0, gt=0)
    min_iters: int = Field(default=10, ge=1)
    max_iters: int = Field(default=100_000, ge=1)
    repeats: int = Field(default=3, ge=1)
    spread_warning: float = Field(default=0.15, gt=0, description="warn when (max-min)/median of repeats exceeds it")
    time_budget_s: float | None = Field(default=None, gt=0, description="start no new measurement past this many "
                                        "seconds; what is left is listed as skipped")  # fmt: skip
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
            raise spec_error(exc, "bench option") from None

    @classmethod
    def build(cls, config: BenchConfig | None = None, **overrides: Any) -> BenchConfig:
        """``config`` (or the defaults) with ``overrides`` applied and validated; ``config`` is not changed."""
        if config is None:
            return cls.from_options(**overrides)
        if not overrides:
            return config
        return cls.from_options(**{**config.model_dump(exclude_unset=True), **overrides})

    @model_validator(mode="before")
    @classmethod
    def _server_when_asked(cls, data: Any) -> Any:
        if (
            isinstance(data, dict)
            and data.get("scenarios") is None
            and (data.get("find_max_qps") or data.get("server_qps"))
        ):
            return {**data, "scenarios": [*DEFAULT_SCENARIOS, "server"]}
        return data

    @model_validator(mode="after")
    def _server_options_need_the_server(self) -> BenchConfig:
        if (self.find_max_qps or self.server_qps) and "server" not in self.scenarios:
            asked = "find_max_qps" if self.find_max_qps else f"server_qps={self.server_qps:g}"
            raise ValueError(
                f"{asked} applies to the server scenario, which scenarios={list(self.scenarios)} leaves out; "
                "add 'server' to the scenarios (--scenario server), or leave the scenarios unset"
            )
        return self

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError("batch sizes must be positive integers, e.g. 1,2,4,8")
        return sorted(set(v))

    @field_validator("scenarios")
    @classmethod
    def _scenarios(cls, v: list[Scenario]) -> list[Scenario]:
        return list(dict.fromkeys(v))

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("name at least one variant: reference, chosen, all, or an id")
        return list(dict.fromkeys(v))

    def command(self, model: str, repo: str, version: int | None = None, variants: list[str] | None = None) -> str:
        """The ``kiln bench`` command line that measures this again (``variants``: the ids resolved, so
        a later ``kiln optimize`` choosing another variant does not change what it measures).

        Settings the CLI does not expose are listed after it, as the Python that sets them."""
        import shlex

        default = BenchConfig()
        args = ["kiln", "bench", model, "--repo", repo]
        if version is not None:
            args += ["--version", str(version)]
        args += [
            "--variants",
            ",".join(variants or self.variants),
            "--batch-sizes",
            ",".join(map(str, self.batch_sizes)),
        ]
        for scenario in self.scenarios:
            args += ["--scenario", scenario]
        args += ["--min-time", f"{self.min_time_s:g}", "--repeats", str(self.repeats), "--device", self.device]
        if self.time_budget_s is not None:
            args += ["--time-budget", f"{self.time_budget_s:g}"]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if "server" in self.scenarios:
            args += [*(["--qps", f"{self.server_qps:g}"] if self.server_qps else []),
                     *(["--find-max-qps"] if self.find_max_qps else []), "--slo-ms", f"{self.slo_ms:g}"]  # fmt: skip
        if "multi-stream" in self.scenarios:
            args += ["--fps", f"{self.stream_fps:g}"]
        if {"server", "multi-stream"} & set(self.scenarios):
            args += ["--seconds", f"{self.scenario_seconds:g}"]
        line = " ".join(shlex.quote(a) for a in args)
        api_only = {k: getattr(self, k) for k in _API_ONLY if getattr(self, k) != getattr(default, k)}
        if api_only:
            line += "  # and " + ", ".join(f"{k}={v!r}" for k, v in api_only.items()) + " (Python API only)"
        return line


_API_ONLY = ("warmup_iters", "min_iters", "max_iters", "spread_warning", "max_batch_size", "max_queue_delay_ms")
